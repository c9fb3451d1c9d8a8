"""Evaluate checkpoints: perplexity and bits per byte, multiple choice, generation tasks, BLEU, ROUGE-L
and the form of generated Tang poems; several checkpoints side by side in one table.

    python eval.py --ckpt out/shakespeare --data data/shakespeare            # val split: loss, ppl, bpb
    python eval.py --ckpt out/shakespeare --text notes.txt                   # any .txt / .jsonl ({"text"})
    python eval.py --ckpt out/base --mc choices.jsonl                        # {"context", "choices", "label"}
    python eval.py --ckpt out/sft --arithmetic 100 --shots 3                 # tasks.py, exact answer check
    python eval.py --ckpt out/sft --gen refs.jsonl                           # {"prompt", "reference"}: EM, BLEU, ROUGE-L
    python eval.py --ckpt out/tang --tang 50                                 # share of poems in 5/7-character form
    python eval.py --compare out/a out/b out/c --data data/shakespeare --out results.json

A checkpoint is a nanollm directory, a quantized one (quant.py --out) or a Hugging Face directory, all
read by common.load_model. The metrics, each a few lines below:
- perplexity = exp(mean nats per token) and bits per byte = total nats / ln 2 / total UTF-8 bytes of
  the predicted tokens, over consecutive non-overlapping windows of the context length: exactly
  train.py's final evaluation (train.evaluate), so `--data` reproduces its val_bpb. A raw file is
  tokenized as data/prepare.py does (each document followed by <|endoftext|>).
- multiple choice, as lm-evaluation-harness scores HellaSwag and ARC: the log-likelihood of each
  choice given the context, log P(choice | context) = sum_i log p(c_i | context, c_<i); `acc` takes the
  argmax of the sum, `acc_norm` the argmax of the sum divided by the choice's length in characters.
- generation tasks: greedy decoding (sample.generate, batched) of prompts in the ChatML template
  (chat.prompt_ids), stopping at <|im_end|>; scored by exact match or by a checker function (the
  verifiable arithmetic of tasks.py, zero- or k-shot with k solved train problems as earlier turns).
- BLEU (Papineni et al. 2002): corpus BLEU-4, clipped n-gram precisions p_n, geometric mean times the
  brevity penalty exp(1 - r/c) when the c hypothesis tokens are fewer than the r reference tokens,
  with sacrebleu's default "exp" smoothing of zero counts; 0-100, as sacrebleu prints it.
- ROUGE-L (Lin 2004): F-measure of the longest common subsequence, 2PR / (P + R) with P = LCS/|hyp|,
  R = LCS/|ref| (best reference), averaged over the pairs; 0-1, as rouge-score reports it.
  Both tokenize text into words, punctuation marks and single Han characters (sacrebleu's zh tokenizer
  splits Chinese the same way), so they work for English and Chinese alike.
- Tang-poem form: a poem's lines are the pieces between newlines and punctuation (，。！？；：、 and
  ASCII ,.!?;:); within a line only Han characters count, and text in parentheses (the corpus's
  editorial notes, "(明年 一作：年年)") is dropped. A poem has the form when it has at least two
  lines and all of them have 5 characters, or all 7 (五言 / 七言). Generated poems are sampled from
  <|endoftext|> (a prepared Tang corpus is `title\\nline\\nline...`), and their first line, the title,
  is left out.
"""
import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import load_model, resolve_device
from train import TrainingError, evaluate, load_split, read_meta, token_byte_lengths

EOT, IM_END = "<|endoftext|>", "<|im_end|>"


class EvalError(ValueError):
    """Bad input (a missing file, a malformed record): one clear line naming the file and the field."""


# ----------------------------------------------------------------------------------------------------------
# Loading

def load_for_eval(path, device="cpu", tokenizer_path=None):
    """(model, tokenizer) of a nanollm, quantized or Hugging Face directory (common.load_model)."""
    from common import check_tokenizer, load_tokenizer
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path}: no such checkpoint")
    tokenizer = load_tokenizer(path, tokenizer_path)
    check_tokenizer(path, tokenizer, tokenizer_path)
    return load_model(path, device=device).eval(), tokenizer


def autocast_for(device: str, dtype: str = "auto"):
    """The autocast context train.py evaluates under: bf16 (fp16 without bf16) on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.startswith("cuda") else "float32"
    amp = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.autocast(device.split(":")[0], dtype=amp) if amp is not None else nullcontext()


def model_device(model) -> str:
    return str(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------------------
# Perplexity and bits per byte

def perplexity(model, tokens: np.ndarray, token_bytes: torch.Tensor, seq_len: int = 0, batch_size: int = 8,
               max_tokens: int = 0, dtype: str = "auto") -> dict:
    """{"loss", "ppl", "bpb", "tokens"} of `tokens` (a 1-D stream): train.evaluate over windows of seq_len
    (default the model's context). token_bytes: (vocab,) UTF-8 bytes per token (train.token_byte_lengths)."""
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise EvalError(f"--seq-len {seq_len} exceeds the model's context of {model.config.max_seq_len} tokens")
    if len(tokens) < seq_len + 1:
        seq_len = len(tokens) - 1  # a short text: one window of all of it
    if seq_len < 1:
        raise EvalError(f"{len(tokens)} token(s): perplexity needs at least two")
    device = model_device(model)
    metrics = evaluate(model, tokens, seq_len, batch_size, device, autocast_for(device, dtype), token_bytes, max_tokens)
    return {key.removeprefix("val_"): value for key, value in metrics.items()}


def check_same_tokenizer(model_tokenizer, data_tokenizer, where: str) -> None:
    if model_tokenizer.ranks != data_tokenizer.ranks or model_tokenizer.special_tokens != data_tokenizer.special_tokens:
        raise EvalError(f"{where}: the data was tokenized with another tokenizer than the checkpoint's")


def split_perplexity(model, tokenizer, data_dir, split: str = "val", **kwargs) -> dict:
    """Perplexity and bpb of a data/prepare.py split; token bytes from the split's own tokenizer, as in train.py."""
    from bpe import Tokenizer
    data_dir = Path(data_dir)
    try:
        meta = read_meta(data_dir)
        tokens = load_split(data_dir, split, meta)
    except TrainingError as e:
        raise EvalError(str(e)) from None
    data_tokenizer = Tokenizer.load(data_dir / meta["tokenizer"])
    if tokenizer is not None:
        check_same_tokenizer(tokenizer, data_tokenizer, str(data_dir / meta["tokenizer"]))
    if meta["vocab_size"] > model.config.vocab_size:
        raise EvalError(f"{data_dir}: vocab_size {meta['vocab_size']} exceeds the model's {model.config.vocab_size}")
    return perplexity(model, tokens, token_byte_lengths(data_tokenizer, model.config.vocab_size), **kwargs)


def encode_documents(tokenizer, path, txt_docs: str = "file") -> np.ndarray:
    """A .txt or .jsonl file as one token stream, each document followed by <|endoftext|> (data/prepare.py's)."""
    from data.corpus import CorpusError, infer_format, read_documents
    from data.prepare import tokenize
    if EOT not in tokenizer.special_tokens:
        raise EvalError(f"the tokenizer has no {EOT} token to separate the documents of {path}")
    try:
        fmt = infer_format(Path(path))
        docs = [doc["text"] for doc in read_documents(path, fmt, txt_docs)]
    except CorpusError as e:
        raise EvalError(str(e)) from None
    if not docs:
        raise EvalError(f"{path}: no documents")
    with redirect_stdout(sys.stderr):  # prepare.py's progress line; stdout carries the results table
        return tokenize(docs, tokenizer, fmt, str(path))


def text_perplexity(model, tokenizer, path, txt_docs: str = "file", **kwargs) -> dict:
    """Perplexity and bpb of a raw .txt / .jsonl file tokenized with the checkpoint's tokenizer."""
    tokens = encode_documents(tokenizer, path, txt_docs)
    return perplexity(model, tokens, token_byte_lengths(tokenizer, model.config.vocab_size), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood

@torch.no_grad()
def continuation_logprobs(model, requests, batch_size: int = 16, dtype: str = "auto") -> list[tuple[float, bool]]:
    """For each (context_ids, continuation_ids): (sum of log p(continuation token | everything before it),
    whether every continuation token was the argmax). Rows are right-padded (causal attention: padding
    after a token cannot change it) and left-truncated to the model's context."""
    device, max_len = model_device(model), model.config.max_seq_len
    results = []
    for start in range(0, len(requests), batch_size):
        rows, spans = [], []
        for context, continuation in requests[start:start + batch_size]:
            if not continuation:
                raise EvalError("a choice encodes to no tokens")
            ids = (list(context) + list(continuation))[-(max_len + 1):]
            n = min(len(continuation), len(ids) - 1)
            rows.append(ids)
            spans.append((len(ids) - 1 - n, len(ids) - 1))  # input positions that predict the continuation
        width = max(len(r) for r in rows) - 1
        x = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        with autocast_for(device, dtype):
            logits, _ = model(x.to(device))
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()              # (B, T, V)
        for i, (ids, (a, b)) in enumerate(zip(rows, spans)):
            target = torch.tensor(ids[a + 1:b + 1])
            row = logprobs[i, a:b]
            results.append((row.gather(-1, target[:, None]).sum().item(), bool((row.argmax(-1) == target).all())))
    return results


def choice_request(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) as lm-evaluation-harness makes them: the context's trailing spaces move
    to the choice, the pair is encoded whole and split where the context's own encoding ends (so a token
    that would merge across the boundary is not broken); an empty context is <|endoftext|>."""
    spaces = len(context) - len(context.rstrip(" "))
    context, choice = context[:len(context) - spaces], context[len(context) - spaces:] + choice
    if not context:
        return [tokenizer.special_tokens[EOT]], tokenizer.encode_ordinary(choice)
    whole, context_ids = tokenizer.encode_ordinary(context + choice), tokenizer.encode_ordinary(context)
    return context_ids, whole[len(context_ids):]


def read_jsonl(path, required: dict) -> list[dict]:
    """Records of a JSONL file, each checked to have the `required` fields ({name: type})."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{path}:{n}: not JSON ({e})") from None
        for name, kind in required.items():
            if not isinstance(record, dict) or not isinstance(record.get(name), kind):
                raise EvalError(f"{path}:{n}: field {name!r} missing or not {kind.__name__}")
        records.append(record)
    if not records:
        raise EvalError(f"{path}: no records")
    return records


def multiple_choice(model, tokenizer, items, batch_size: int = 16, dtype: str = "auto") -> dict:
    """{"mc_acc", "mc_acc_norm", "mc_n"} on items {"context": str, "choices": [str], "label": int}."""
    requests = []
    for n, item in enumerate(items):
        if not item["choices"] or not 0 <= item["label"] < len(item["choices"]):
            raise EvalError(f"item {n}: label {item['label']} is not an index of its {len(item['choices'])} choices")
        for choice in item["choices"]:
            requests.append(choice_request(tokenizer, item["context"], choice))
    scores = [s for s, _ in continuation_logprobs(model, requests, batch_size, dtype)]
    right = right_norm = 0
    position = 0
    for item in items:
        k = len(item["choices"])
        sums = scores[position:position + k]
        normed = [s / max(len(c), 1) for s, c in zip(sums, item["choices"])]
        right += int(np.argmax(sums)) == item["label"]
        right_norm += int(np.argmax(normed)) == item["label"]
        position += k
    return {"mc_acc": right / len(items), "mc_acc_norm": right_norm / len(items), "mc_n": len(items)}


# ----------------------------------------------------------------------------------------------------------
# Generation tasks

def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 16,
                   stop_tokens=(), temperature: float = 0.0, seed: int = 0) -> tuple[list[str], list[bool]]:
    """(decoded continuation of each prompt, whether it stopped at a stop token), greedy by default.

    Prompts are sorted by length and batched, so left padding stays small; the order is restored."""
    from sample import generate
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts, stopped = [""] * len(prompts), [False] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = [prompts[i] for i in rows]
        room = min(max_new_tokens, model.config.max_seq_len - max(len(p) for p in batch))
        if room < 1:
            raise EvalError(f"a prompt of {max(len(p) for p in batch)} tokens leaves no room in the model's "
                            f"{model.config.max_seq_len}-token context")
        outputs = generate(model, batch, room, temperature=temperature, top_k=50 if temperature else None,
                           seed=seed + start, stop_tokens=stop_tokens)
        for i, ids in zip(rows, outputs):
            texts[i] = tokenizer.decode(ids.tolist())
            stopped[i] = len(ids) < room
    return texts, stopped


def chat_prompts(tokenizer, conversations) -> list[list[int]]:
    from chat import ChatDataError, prompt_ids
    try:
        return [prompt_ids(tokenizer, messages) for messages in conversations]
    except ChatDataError as e:
        raise EvalError(str(e)) from None


def arithmetic_conversations(problems, shots: int = 0, seed: int = 0) -> list[list[dict]]:
    """One chat per problem: k solved train problems as earlier user/assistant turns, then the question."""
    from tasks import arithmetic_problems, sft_conversations
    examples = [turn for chat in sft_conversations(arithmetic_problems(shots, split="train", seed=seed))
                for turn in chat] if shots else []  # train-split problems: never one of the test questions
    return [examples + [{"role": "user", "content": p["question"]}] for p in problems]


def checked_generation(model, tokenizer, conversations, checkers, max_new_tokens: int = 64,
                       batch_size: int = 16) -> tuple[float, list[str], list[bool]]:
    """(accuracy, answers, verdicts): greedy answers to ChatML conversations, each judged by its own
    checker(text) -> bool (an exact match, tasks.check, anything verifiable)."""
    prompts = chat_prompts(tokenizer, conversations)
    texts, _ = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size,
                              stop_tokens=[tokenizer.special_tokens[IM_END]])
    right = [bool(checker(text)) for checker, text in zip(checkers, texts, strict=True)]
    return sum(right) / max(len(right), 1), texts, right


def arithmetic_accuracy(model, tokenizer, n: int = 100, shots: int = 0, max_new_tokens: int = 64,
                        batch_size: int = 16, seed: int = 0) -> dict:
    """Share of n test problems of tasks.py answered right (tasks.check), zero- or k-shot, greedy."""
    from tasks import arithmetic_problems, check
    problems = arithmetic_problems(n, split="test", seed=seed)
    checkers = [lambda text, p=p: check(p, text) for p in problems]
    accuracy, texts, right = checked_generation(model, tokenizer, arithmetic_conversations(problems, shots, seed),
                                                checkers, max_new_tokens, batch_size)
    return {f"arith_acc_{shots}shot": accuracy, "arith_n": n,
            "arith_examples": [{"question": p["question"], "output": t, "right": r}
                               for p, t, r in list(zip(problems, texts, right))[:5]]}


def normalize_answer(text: str) -> str:
    """Exact match compares answers with surrounding whitespace trimmed and inner runs of it collapsed."""
    return " ".join(text.split())


def reference_generation(model, tokenizer, records, template: str = "chatml", max_new_tokens: int = 64,
                         batch_size: int = 16) -> dict:
    """Exact match, BLEU and ROUGE-L of greedy answers to {"prompt", "reference" or "references"} records.

    template "chatml": the prompt is a user turn (chat.prompt_ids), generation stops at <|im_end|>;
    "raw": the prompt is plain text continued as is, stopping at <|endoftext|>."""
    references = [r["references"] if isinstance(r.get("references"), list) else [r.get("reference")] for r in records]
    for n, refs in enumerate(references):
        if not refs or not all(isinstance(x, str) for x in refs):
            raise EvalError(f"record {n}: needs a string 'reference' or a list of strings 'references'")
    if template == "chatml":
        prompts = chat_prompts(tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in records])
        stop = [tokenizer.special_tokens[IM_END]]
    elif template == "raw":
        prompts = [tokenizer.encode_ordinary(r["prompt"]) for r in records]
        stop = [tokenizer.special_tokens[EOT]] if EOT in tokenizer.special_tokens else []
    else:
        raise EvalError(f"unknown template {template!r} (chatml or raw)")
    texts, _ = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, stop_tokens=stop)
    exact = [any(normalize_answer(t) == normalize_answer(x) for x in refs) for t, refs in zip(texts, references)]
    return {"gen_exact_match": sum(exact) / len(texts), "gen_bleu": corpus_bleu(texts, references),
            "gen_rouge_l": rouge_l(texts, references), "gen_n": len(texts),
            "gen_examples": [{"prompt": r["prompt"], "output": t} for r, t in list(zip(records, texts))[:5]]}


# ----------------------------------------------------------------------------------------------------------
# BLEU and ROUGE-L

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORDS = re.compile(rf"[{HAN}]|[^\W{HAN}]+|[^\w\s]")


def words(text: str) -> list[str]:
    """Tokens for BLEU / ROUGE: runs of letters and digits, single punctuation marks, single Han characters."""
    return _WORDS.findall(text)


def ngram_counts(tokens, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: list[str], references: list, max_n: int = 4, tokenize=words) -> float:
    """Corpus BLEU-4, 0-100, as sacrebleu computes it (its default exp smoothing, closest reference length).

    references[i] is the reference of hypotheses[i], or a list of them. Matches and totals are summed
    over the corpus before the precisions are taken, as in Papineni et al."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        refs = [refs] if isinstance(refs, str) else refs
        h, rs = tokenize(hyp), [tokenize(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]  # closest length; a tie: the shorter
        for n in range(1, max_n + 1):
            best_ref = Counter()
            for r in rs:
                best_ref |= ngram_counts(r, n)                          # clip by the most in any one reference
            matches[n - 1] += sum((ngram_counts(h, n) & best_ref).values())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if matches[0] == 0 or totals[-1] == 0:
        return 0.0
    log_precision, smooth = 0.0, 1.0
    for m, t in zip(matches, totals):
        if m == 0:        # sacrebleu's "exp" smoothing: the k-th zero count becomes 1 / 2^k
            smooth *= 2
            log_precision += math.log(1 / (smooth * t))
        else:
            log_precision += math.log(m / t)
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision / max_n)


def lcs_length(a, b) -> int:
    """Longest common subsequence, by dynamic programming over one row: O(len(a) * len(b))."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b):
            diagonal, row[j + 1] = row[j + 1], diagonal + 1 if x == y else max(row[j + 1], row[j])
    return row[-1]


def rouge_l_pair(hyp: str, ref: str, tokenize=words) -> float:
    h, r = tokenize(hyp), tokenize(ref)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(h), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(hypotheses: list[str], references: list, tokenize=words) -> float:
    """Mean over pairs of the ROUGE-L F-measure against the best-matching reference, 0-1."""
    scores = [max(rouge_l_pair(h, r, tokenize) for r in ([refs] if isinstance(refs, str) else refs))
              for h, refs in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0


# ----------------------------------------------------------------------------------------------------------
# Tang-poem form

_LINE_BREAKS = re.compile(r"[\n，。！？；：、,.!?;:]")
_NOTE = re.compile(r"[(（][^)）]*(?:[)）]|$)")  # an editor's note, "(明年 一作：年年)", maybe over lines
_HAN_CHAR = re.compile(rf"[{HAN}]")


def poem_lines(poem: str) -> list[int]:
    """Han characters per line: lines end at newlines and punctuation; text in parentheses (the corpus's
    variant notes) is no part of the poem; lines without Han text are dropped."""
    counts = [len(_HAN_CHAR.findall(piece)) for piece in _LINE_BREAKS.split(_NOTE.sub("", poem))]
    return [c for c in counts if c]


def has_tang_form(poem: str) -> bool:
    """At least two lines, all of 5 Han characters or all of 7 (the title excluded: pass the body)."""
    lines = poem_lines(poem)
    return len(lines) >= 2 and len(set(lines)) == 1 and lines[0] in (5, 7)


def tang_form(poems: list[str]) -> dict:
    """{"tang_form": share of poems with the form, "tang_lines_5or7": share of all lines of 5 or 7 characters}."""
    lines = [c for poem in poems for c in poem_lines(poem)]
    return {"tang_form": sum(map(has_tang_form, poems)) / max(len(poems), 1),
            "tang_lines_5or7": sum(c in (5, 7) for c in lines) / max(len(lines), 1), "tang_n": len(poems)}


def poem_body(text: str, finished: bool) -> str:
    """A generated document minus its title (the first line); an unfinished one is cut after its last
    sentence end (。！？), so a poem the token budget interrupted is judged on its complete lines."""
    body = text.split("\n", 1)[1] if "\n" in text else ""
    if not finished:
        ends = [body.rfind(mark) for mark in "。！？"]
        body = body[:max(ends) + 1]
    return body


def tang_poems(model, tokenizer, n: int = 20, max_new_tokens: int = 96, batch_size: int = 16,
               temperature: float = 0.8, seed: int = 0) -> dict:
    """Sample n poems from <|endoftext|> (temperature 0.8, top-k 50, seeded) and measure their form."""
    eot = tokenizer.special_tokens.get(EOT)
    if eot is None:
        raise EvalError(f"the tokenizer has no {EOT} token to start a poem from")
    texts, finished = generate_texts(model, tokenizer, [[eot]] * n, max_new_tokens, batch_size, stop_tokens=[eot],
                                     temperature=temperature, seed=seed)
    bodies = [poem_body(t, f) for t, f in zip(texts, finished)]
    return {**tang_form(bodies), "tang_examples": texts[:3]}


# ----------------------------------------------------------------------------------------------------------
# Everything for one checkpoint, and several side by side

def weights_bytes(model) -> int:
    """Bytes of the state dict, a tied tensor counted once: quantized layers keep their packed codes,
    scales and zeros in buffers, which `params` (parameters only) leaves out."""
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(tensors.values())


def evaluate_model(model, tokenizer, data=None, split: str = "val", text=None, txt_docs: str = "file", mc=None,
                   arithmetic: int = 0, shots: int = 0, gen=None, template: str = "chatml", tang: int = 0,
                   seq_len: int = 0, batch_size: int = 8, max_tokens: int = 0, max_new_tokens: int = 64,
                   dtype: str = "auto", seed: int = 0) -> dict:
    """Every metric asked for, in one flat dict (lists of example outputs under *_examples)."""
    metrics = {"params": sum(p.numel() for p in model.parameters()), "weights_mb": weights_bytes(model) / 2**20}
    ppl_args = dict(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, dtype=dtype)
    if data:
        metrics.update({f"{split}_{k}": v for k, v in split_perplexity(model, tokenizer, data, split, **ppl_args).items()})
    if text:
        metrics.update({f"text_{k}": v for k, v in text_perplexity(model, tokenizer, text, txt_docs, **ppl_args).items()})
    if mc:
        items = read_jsonl(mc, {"context": str, "choices": list, "label": int})
        metrics.update(multiple_choice(model, tokenizer, items, batch_size, dtype))
    if arithmetic:
        metrics.update(arithmetic_accuracy(model, tokenizer, arithmetic, shots, max_new_tokens, batch_size, seed))
    if gen:
        records = read_jsonl(gen, {"prompt": str})
        metrics.update(reference_generation(model, tokenizer, records, template, max_new_tokens, batch_size))
    if tang:
        metrics.update(tang_poems(model, tokenizer, tang, max(max_new_tokens, 96), batch_size, seed=seed))
    return metrics


def evaluate_checkpoint(path, device: str = "auto", tokenizer=None, **tasks) -> dict:
    """Load a checkpoint (load_for_eval) and return evaluate_model's metrics plus "eval_s", the wall time."""
    t0 = time.time()
    model, tok = load_for_eval(path, resolve_device(device), tokenizer)
    metrics = evaluate_model(model, tok, **tasks)
    return {**metrics, "eval_s": time.time() - t0}


def format_value(value) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(results: dict) -> str:
    """{checkpoint name: metrics} -> a markdown table, one row per metric and one column per checkpoint."""
    names = list(results)
    keys = [k for k in dict.fromkeys(k for m in results.values() for k in m) if not k.endswith("_examples")]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(format_value(results[n][key]) if key in results[n] else "-"
                                                 for n in names) + " |")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:2]))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="a checkpoint directory (nanollm, Hugging Face or quantized)")
    which.add_argument("--compare", nargs="+", metavar="CKPT", help="several checkpoints, side by side in one table")
    parser.add_argument("--tokenizer", help="tokenizer to use instead of the checkpoint's own")
    parser.add_argument("--data", help="a data/prepare.py directory: perplexity and bpb of --split")
    parser.add_argument("--split", default="val", help="which split of --data (default: val)")
    parser.add_argument("--text", help="a .txt or .jsonl ({\"text\"}) file: perplexity and bpb")
    parser.add_argument("--txt-docs", choices=["file", "line", "blank"], default="file",
                        help="how a .txt file splits into documents (as data/prepare.py)")
    parser.add_argument("--mc", help="JSONL of {context, choices, label}: multiple-choice accuracy")
    parser.add_argument("--arithmetic", type=int, default=0, metavar="N", help="N test problems of tasks.py (0: skip)")
    parser.add_argument("--shots", type=int, default=0, help="solved examples before each arithmetic question")
    parser.add_argument("--gen", help="JSONL of {prompt, reference | references}: exact match, BLEU, ROUGE-L")
    parser.add_argument("--template", choices=["chatml", "raw"], default="chatml", help="how --gen prompts are given")
    parser.add_argument("--tang", type=int, default=0, metavar="N", help="sample N poems and measure their form")
    parser.add_argument("--seq-len", type=int, default=0, help="perplexity window (default: the model's context)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=0, help="perplexity on at most this many tokens (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per answer")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast dtype (auto: bf16 on CUDA, fp32 elsewhere, as train.py)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems, k-shot examples and poem samples")
    parser.add_argument("--out", help="write the metrics (with example outputs) to this JSON file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shots < 0 or args.arithmetic < 0 or args.tang < 0:
        parser.error("--arithmetic, --shots and --tang must be >= 0")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not any([args.data, args.text, args.mc, args.arithmetic, args.gen, args.tang]):
        parser.error("nothing to evaluate: give --data, --text, --mc, --arithmetic, --gen or --tang")
    tasks = dict(data=args.data, split=args.split, text=args.text, txt_docs=args.txt_docs, mc=args.mc,
                 arithmetic=args.arithmetic, shots=args.shots, gen=args.gen, template=args.template, tang=args.tang,
                 seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                 max_new_tokens=args.max_new_tokens, dtype=args.dtype, seed=args.seed)
    results = {}
    try:
        for path in dict.fromkeys(args.compare or [args.ckpt]):  # each checkpoint once
            print(f"evaluating {path}", file=sys.stderr)
            results[path] = evaluate_checkpoint(path, args.device, args.tokenizer, **tasks)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(markdown_table(results))
    if args.out:
        from common import atomic_write
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, ensure_ascii=False)))
        print(f"metrics written to {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
