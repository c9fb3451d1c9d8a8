"""eval.py against independent expectations: a model that knows the next token has perplexity 1, a
uniform one has perplexity V; multiple choice on a bigram model whose log-likelihoods are computed by
hand; BLEU against sacrebleu and hand-computed values; ROUGE-L by hand and by brute force; the
Tang-poem form on hand-written and real poems; the val bpb of train.py's final eval reproduced."""
import itertools
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval as eval_cli
import evaluate as ev
from bpe import Tokenizer
from common import save_checkpoint
from model import ModelConfig, Transformer
from tasks import answer_text, arithmetic_problems


def successor_model(vocab_size=16, scale=100.0):
    """A real Transformer that predicts (token + 1) mod V with certainty: one-hot embeddings, attention and
    MLP outputs zeroed (the residual stream stays the embedding), and an LM head mapping e_i to e_{i+1}."""
    config = ModelConfig(vocab_size=vocab_size, dim=vocab_size, n_layers=1, n_heads=2, n_kv_heads=2,
                         hidden_dim=8, max_seq_len=32)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.eye(vocab_size))
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(scale * torch.eye(vocab_size).roll(1, dims=0))  # row i+1 reads e_i
    return model


def test_a_model_that_always_predicts_the_right_token_has_perplexity_one():
    model = successor_model()
    tokens = np.arange(300) % 16
    token_bytes = torch.full((16,), 2)
    metrics = ev.perplexity(model, tokens, token_bytes, seq_len=32, batch_size=4)
    assert metrics["ppl"] == pytest.approx(1.0, abs=1e-6) and metrics["bpb"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["tokens"] == (299 // 32) * 32  # consecutive whole windows, as train.evaluate
    wrong = ev.perplexity(model, (np.arange(300) * 3) % 16, token_bytes, seq_len=32)
    assert wrong["ppl"] > 1e10  # the same model on a sequence it mispredicts


def test_a_uniform_model_has_perplexity_vocab_size_and_bpb_log2_v_over_bytes():
    model = successor_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    metrics = ev.perplexity(model, np.arange(100) % 16, torch.full((16,), 3), seq_len=20)
    assert metrics["ppl"] == pytest.approx(16.0, rel=1e-5)
    assert metrics["bpb"] == pytest.approx(math.log2(16) / 3, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Multiple choice

def byte_tokenizer():
    """Token id = byte value (no merges), so a choice's tokens are its characters."""
    return Tokenizer({bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})


class BigramModel(torch.nn.Module):
    """logits of the next token depend on the current token only: a (V, V) table of log-probabilities."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(vocab_size=table.size(0), max_seq_len=64)

    def forward(self, idx, targets=None, **_):
        return self.table[idx], None


def bigram_table():
    table = torch.zeros(257, 257)  # uniform rows everywhere else
    a, b, c, d = map(ord, "abcd")
    table[a] = float("-inf")
    table[a, b], table[a, c], table[a, d] = math.log(0.5), math.log(0.4), math.log(0.1)
    table[c] = float("-inf")
    table[c, c], table[c, d] = math.log(0.9), math.log(0.1)
    return table


def test_continuation_logprobs_are_the_hand_computed_sums():
    model, tok = BigramModel(bigram_table()), byte_tokenizer()
    requests = [ev.choice_request(tok, "a", "b"), ev.choice_request(tok, "a", "cccc"), ev.choice_request(tok, "xa", "cd")]
    scores = ev.continuation_logprobs(model, requests, batch_size=2)
    assert scores[0] == (pytest.approx(math.log(0.5)), True)
    assert scores[1] == (pytest.approx(math.log(0.4) + 3 * math.log(0.9)), False)
    assert scores[2] == (pytest.approx(math.log(0.4) + math.log(0.1)), False)


def test_multiple_choice_picks_the_most_likely_choice_and_acc_norm_divides_by_length():
    model, tok = BigramModel(bigram_table()), byte_tokenizer()
    # sums: "b" log .5 = -0.69 beats "cccc" log .4 + 3 log .9 = -1.23; per character "cccc" (-0.31) wins
    items = [{"context": "a", "choices": ["b", "cccc"], "label": 0},
             {"context": "a", "choices": ["b", "cccc"], "label": 1},
             {"context": "a", "choices": ["d", "c", "b"], "label": 2}]
    assert ev.multiple_choice(model, tok, items) == {"mc_acc": 2 / 3, "mc_acc_norm": 2 / 3, "mc_n": 3}


def test_choice_request_moves_trailing_spaces_to_the_choice_as_the_harness_does():
    tok = byte_tokenizer()
    assert ev.choice_request(tok, "ab ", "c") == ([97, 98], [32, 99])
    assert ev.choice_request(tok, "", "c") == ([256], [99])  # an empty context is <|endoftext|>


def test_multiple_choice_rejects_a_label_out_of_range():
    with pytest.raises(ev.EvalError, match="label 2"):
        ev.multiple_choice(BigramModel(bigram_table()), byte_tokenizer(), [{"context": "a", "choices": ["b", "c"], "label": 2}])


# ----------------------------------------------------------------------------------------------------------
# BLEU and ROUGE-L

def test_bleu_hand_computed_values():
    assert ev.corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    # all precisions 1, brevity penalty exp(1 - 8/5)
    assert ev.corpus_bleu(["a b c d e"], ["a b c d e f g h"]) == pytest.approx(100 * math.exp(-0.6))
    # p1..p4 = 4/5, 3/4, 2/3, 1/2
    assert ev.corpus_bleu(["a b c d x"], ["a b c d y"]) == pytest.approx(100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)
    # p3 and p4 have no match: smoothed to 1/(2*3) and 1/(4*2)
    assert ev.corpus_bleu(["a b x c d"], ["a b y c d"]) == pytest.approx(100 * (0.8 * 0.5 / 6 / 8) ** 0.25)
    assert ev.corpus_bleu(["x y z w"], ["a b c d"]) == 0.0
    # clipping: "the" counts at most twice, the most in one reference
    assert ev.corpus_bleu(["the the the the"], [["the cat the", "a the"]], max_n=1) == pytest.approx(100 * 2 / 4)


def test_bleu_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(0)
    vocab = "the a cat dog sat on mat rug is was here there".split()
    hyps = [" ".join(rng.choices(vocab, k=rng.randint(3, 12))) for _ in range(30)]
    refs = [[" ".join(rng.choices(vocab, k=rng.randint(3, 12))) for _ in range(30)] for _ in range(2)]
    ours = ev.corpus_bleu(hyps, [list(pair) for pair in zip(*refs)])
    assert ours == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score, abs=1e-9)
    english = ["The cat sat on the mat.", "There is a dog, here!"], ["The cat is on the mat.", "A dog is here!"]
    assert ev.corpus_bleu(*english) == pytest.approx(sacrebleu.corpus_bleu(english[0], [english[1]]).score, abs=1e-9)
    chinese = ["床前明月光，疑是地上霜。", "举头望明月"], ["床前看月光，疑是地上霜。", "举头望山月，低头思故乡。"]
    assert ev.corpus_bleu(*chinese) == pytest.approx(
        sacrebleu.corpus_bleu(chinese[0], [chinese[1]], tokenize="zh").score, abs=1e-9)


def brute_force_lcs(a, b):
    for k in range(min(len(a), len(b)), 0, -1):
        subsequences = set(itertools.combinations(b, k))
        if any(s in subsequences for s in itertools.combinations(a, k)):
            return k
    return 0


def test_rouge_l_hand_computed_and_lcs_by_brute_force():
    # LCS "the cat on mat" = 4: P = 4/5, R = 4/6
    assert ev.rouge_l_pair("the cat sat on mat", "the cat was on the mat") == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert ev.rouge_l_pair("床前明月光", "床前看月光") == pytest.approx(0.8)   # LCS 床前月光
    assert ev.rouge_l_pair("a b", "c d") == 0.0
    assert ev.rouge_l(["a b", "a b c"], [["x", "a b"], "a b c"]) == pytest.approx(1.0)  # the best reference counts
    rng = random.Random(1)
    for _ in range(50):
        a, b = ([rng.choice("abc") for _ in range(rng.randint(0, 7))] for _ in range(2))
        assert ev.lcs_length(a, b) == brute_force_lcs(a, b)


# ----------------------------------------------------------------------------------------------------------
# Tang-poem form

def test_tang_form_on_hand_written_lines():
    assert ev.has_tang_form("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。")
    assert ev.has_tang_form("朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。")
    assert ev.has_tang_form("白日依山尽 黄河入海流\n欲穷千里目 更上一层楼") is False  # no break between lines
    assert ev.has_tang_form("白日依山尽\n黄河入海流\n欲穷千里目\n更上一层楼")         # newlines break lines
    assert not ev.has_tang_form("床前明月光，疑是地上霜。举头望明月，低头思故乡啊。")   # one line of 6
    assert not ev.has_tang_form("床前明月光，千里江陵一日还。")                       # 5 and 7 mixed
    assert not ev.has_tang_form("床前明月光。")                                       # one line is no poem
    assert not ev.has_tang_form("hello, world.")
    assert ev.poem_lines("春草明年绿，王孙归不归？(明年 一作：年年)") == [5, 5]          # notes are dropped
    assert ev.poem_lines("床前 明月光 (A)，“疑是”地上霜！") == [5, 5]                   # only Han characters count
    assert ev.tang_form(["床前明月光，疑是地上霜。", "床前明月，疑是地上霜。"]) == \
        {"tang_form": 0.5, "tang_lines_5or7": 0.75, "tang_n": 2}


def test_tang_form_on_the_300_tang_poems(data_dir):
    book = json.loads((data_dir / "tang_poems" / "tangshisanbaishou.json").read_text(encoding="utf-8"))
    by_type = {section["type"]: ["\n".join(p["paragraphs"]) for p in section["content"]] for section in book["content"]}
    for regulated in ("五言绝句", "七言绝句", "五言律诗", "七言律诗"):   # quatrains and regulated verse: all in form
        assert all(map(ev.has_tang_form, by_type[regulated])), regulated
    assert not all(map(ev.has_tang_form, by_type["七言古诗"]))           # old-style verse mixes line lengths


def test_poem_body_drops_the_title_and_an_unfinished_line():
    assert ev.poem_body("静夜思\n床前明月光，疑是地上霜。", finished=True) == "床前明月光，疑是地上霜。"
    assert ev.poem_body("静夜思\n床前明月光，疑是地上霜。举头望", finished=False) == "床前明月光，疑是地上霜。"
    assert ev.poem_body("静夜思", finished=True) == ""


# ----------------------------------------------------------------------------------------------------------
# Generation tasks

@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny random model with a bpe.py tokenizer (which reserves the ChatML tokens), saved as train.py does."""
    directory = tmp_path_factory.mktemp("ckpt")
    tokenizer = Tokenizer.train("What is 3 + 5 + 2? The answer is 10. " * 20 + "床前明月光，疑是地上霜。", 300)
    tokenizer.save(directory / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    hidden_dim=64, max_seq_len=128)).eval()
    save_checkpoint(directory, model, tokenizer="tokenizer")
    return directory, model, tokenizer


def test_batched_generation_equals_one_prompt_at_a_time(chat_checkpoint):
    from sample import generate
    _, model, tok = chat_checkpoint
    prompts = [tok.encode_ordinary(t) for t in ["What is", "The answer is 10. What", "床前", "3 + 5"]]
    texts, _ = ev.generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert texts == [tok.decode(generate(model, p, 6, temperature=0)[0].tolist()) for p in prompts]


def test_checked_generation_answers_in_chatml_and_applies_each_checker(chat_checkpoint):
    from chat import prompt_ids
    from sample import generate
    _, model, tok = chat_checkpoint
    conversations = [[{"role": "user", "content": q}] for q in ("What is 3 + 5?", "床前")]
    expected = [tok.decode(generate(model, prompt_ids(tok, c), 10, temperature=0,
                                    stop_tokens=[tok.special_tokens["<|im_end|>"]])[0].tolist()) for c in conversations]
    accuracy, texts, right = ev.checked_generation(model, tok, conversations,
                                                   [lambda t: t == expected[0], lambda t: False], max_new_tokens=10)
    assert texts == expected and right == [True, False] and accuracy == 0.5


def test_arithmetic_prompts_are_chatml_with_k_solved_train_problems(chat_checkpoint):
    from chat import prompt_ids
    _, _, tok = chat_checkpoint
    problems = arithmetic_problems(3, split="test")
    zero = ev.arithmetic_conversations(problems, shots=0)
    assert prompt_ids(tok, zero[0]) == prompt_ids(tok, [{"role": "user", "content": problems[0]["question"]}])
    two = ev.arithmetic_conversations(problems, shots=2)
    shots = arithmetic_problems(2, split="train")
    assert [m["content"] for m in two[1]] == [shots[0]["question"], answer_text(shots[0]), shots[1]["question"],
                                              answer_text(shots[1]), problems[1]["question"]]


def test_arithmetic_accuracy_scores_each_answer_with_the_checker(chat_checkpoint, monkeypatch):
    """Generation replaced by an oracle that answers every other question right: accuracy 0.5."""
    _, model, tok = chat_checkpoint
    seen = []

    def oracle(model, tokenizer, prompts, *args, **kwargs):
        texts = []
        for i, ids in enumerate(prompts):
            question = tokenizer.decode(ids).rsplit("What is ", 1)[1].split("?")[0]
            seen.append(question)
            texts.append(f"The answer is {sum(map(int, question.split(' + '))) + i % 2}.")
        return texts, [True] * len(texts)

    monkeypatch.setattr(ev, "generate_texts", oracle)
    metrics = ev.arithmetic_accuracy(model, tok, n=10, shots=2)
    assert metrics["arith_acc_2shot"] == 0.5 and metrics["arith_n"] == 10
    assert seen == [p["question"][len("What is "):-1] for p in arithmetic_problems(10, split="test")]


def test_reference_generation_metrics(chat_checkpoint, monkeypatch):
    _, model, tok = chat_checkpoint
    records = [{"prompt": "p1", "reference": "the cat sat on the mat"}, {"prompt": "p2", "references": ["x", " a  b c d "]}]
    monkeypatch.setattr(ev, "generate_texts", lambda m, t, prompts, *a, **k: (["the cat sat on the mat", "a b c d"], [True] * 2))
    metrics = ev.reference_generation(model, tok, records)
    assert metrics["gen_exact_match"] == 1.0 and metrics["gen_bleu"] == pytest.approx(100.0)
    assert metrics["gen_rouge_l"] == pytest.approx(1.0) and metrics["gen_n"] == 2


def test_tang_poems_start_from_endoftext_and_judge_the_bodies(chat_checkpoint, monkeypatch):
    _, model, tok = chat_checkpoint
    eot = tok.special_tokens["<|endoftext|>"]
    documents = ["静夜思\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",   # in form
                 "无题\n床前明月光，疑是地上霜。举头望明",                        # cut by the budget: 2 lines of 5
                 "床前明月光，疑是地上霜。"]                                       # the title line only: no body
    calls = []

    def sampled(model, tokenizer, prompts, max_new_tokens, batch_size, stop_tokens, temperature, seed):
        calls.append((prompts, stop_tokens, temperature))
        return documents, [True, False, True]

    monkeypatch.setattr(ev, "generate_texts", sampled)
    metrics = ev.tang_poems(model, tok, n=3)
    assert calls == [([[eot]] * 3, [eot], 0.8)]
    assert metrics["tang_form"] == pytest.approx(2 / 3) and metrics["tang_lines_5or7"] == 1.0 and metrics["tang_n"] == 3


# ----------------------------------------------------------------------------------------------------------
# Prepared splits, raw files and the CLI

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """The first 60 kB of Tiny Shakespeare prepared with a 300-token BPE, and a few train.py steps on it (the
    scripts' main() in this process: tests/test_train.py runs them as commands)."""
    import data.prepare
    import train
    root = tmp_path_factory.mktemp("trained")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60_000]
    (root / "input.txt").write_text(text, encoding="utf-8")
    data.prepare.main(list(map(str, ["--source", root / "input.txt", "--out", root / "data", "--vocab-size", "300"])))
    train.main(list(map(str, ["--data", root / "data", "--out-dir", root / "ckpt", "--model", "tiny", "--seq-len", "32",
                              "--batch-size", "4", "--max-steps", "5", "--warmup-steps", "2", "--sample-tokens", "0",
                              "--eval-interval", "100"])))
    return root, text


def test_bpb_on_a_prepared_split_equals_train_py_final_eval(trained):
    root, text = trained
    summary = json.loads((root / "ckpt" / "summary.json").read_text())
    model, tok = ev.load_for_eval(root / "ckpt")
    ours = ev.split_perplexity(model, tok, root / "data", "val", seq_len=32, batch_size=4)
    assert ours["bpb"] == pytest.approx(summary["val_bpb"], rel=1e-6)
    assert ours["tokens"] == summary["val_tokens"] and ours["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    # the same text as a raw file, tokenized with the checkpoint's tokenizer: the same numbers
    (root / "val.txt").write_text(text[int(len(text) * 0.9):], encoding="utf-8")
    raw = ev.text_perplexity(model, tok, root / "val.txt", seq_len=32, batch_size=4)
    assert raw == pytest.approx(ours, rel=1e-9)


def test_cli_compare_prints_one_table_and_writes_json(trained, capsys):
    import shutil
    root, _ = trained
    ckpt, other = str(root / "ckpt"), str(root / "ckpt_copy")
    shutil.copytree(ckpt, other, dirs_exist_ok=True)
    results = eval_cli.main(["--compare", ckpt, other, "--data", str(root / "data"), "--seq-len", "32",
                       "--max-tokens", "256", "--out", str(root / "results.json")])
    table = capsys.readouterr().out
    assert table.splitlines()[0] == f"| metric | {ckpt} | {other} |"
    bpb_row = next(line for line in table.splitlines() if line.startswith("| val_bpb |"))
    assert bpb_row.count(f"{results[ckpt]['val_bpb']:.4f}") == 2 and "| params |" in table
    assert json.loads((root / "results.json").read_text())[ckpt]["val_tokens"] == 256 == results[ckpt]["val_tokens"]


def test_a_quantized_checkpoint_is_loaded_with_its_quantized_layers(trained, tmp_path):
    quant = pytest.importorskip("quant")
    root, _ = trained
    model, tok = ev.load_for_eval(root / "ckpt")
    quant.quantize_model(model, quant.QuantSpec(method="rtn", bits=4, group_size=0), log=lambda *a: None)
    quant.save_quantized(model, tmp_path, quant.QuantSpec(method="rtn", bits=4, group_size=0), source_dir=root / "ckpt")
    loaded, _ = ev.load_for_eval(tmp_path)
    assert any(isinstance(m, quant.QuantLinear) for m in loaded.modules())
    fp32, _ = ev.load_for_eval(root / "ckpt")
    assert ev.weights_bytes(fp32) == 4 * sum(p.numel() for p in fp32.parameters())  # tied embedding counted once
    assert ev.weights_bytes(loaded) < ev.weights_bytes(fp32) / 2                      # packed 4-bit layers
    data = root / "data"
    assert ev.split_perplexity(loaded, tok, data, seq_len=32) == ev.split_perplexity(model, tok, data, seq_len=32)


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "/nonexistent"], "nothing to evaluate"),
    (["--ckpt", "/nonexistent", "--data", "/nonexistent"], "/nonexistent: no such checkpoint"),
])
def test_cli_errors_are_one_line(argv, message, refused):
    code, err = refused(eval_cli.main, *argv)
    assert code != 0 and message in err


def test_cli_names_the_bad_record(trained, tmp_path, refused):
    root, _ = trained
    (tmp_path / "mc.jsonl").write_text('{"context": "a", "choices": ["b"], "label": 0}\n{"context": "a", "label": 0}\n')
    code, err = refused(eval_cli.main, "--ckpt", root / "ckpt", "--mc", tmp_path / "mc.jsonl")
    assert code == 1 and "mc.jsonl:2: field 'choices' missing" in err
    code, err = refused(eval_cli.main, "--ckpt", root / "ckpt", "--data", tmp_path)
    assert code == 1 and "meta.json not found" in err
