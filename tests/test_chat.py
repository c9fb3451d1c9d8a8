"""chat.py: the ChatML template's exact ids and loss masks, every loader on the shared files, clear errors."""
import json

import pytest

from bpe import Tokenizer
from chat import (ChatDataError, answer_ids, encode_chat, load_conversations, load_preference_pairs, load_unpaired,
                  pad_batch, prompt_ids, render_chatml, tokenize_conversations)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """No merges: every ASCII character is one token, so masks can be written out by hand."""
    return Tokenizer.train(["x"], vocab_size=256 + 6)


def byte_ids(text):
    return list(text.encode())


def test_loss_mask_exact(byte_tokenizer):
    tok = byte_tokenizer
    S, E = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": "no"}]
    ids, mask = encode_chat(tok, messages)
    expected_ids, expected_mask = [], []
    for role, content, trained in [("system", "S", 0), ("user", "hi", 0), ("assistant", "yo", 1),
                                   ("user", "ok?", 0), ("assistant", "no", 1)]:
        header = [S] + byte_ids(role + "\n")
        body = byte_ids(content) + [E]
        expected_ids += header + body + byte_ids("\n")
        expected_mask += [0] * len(header) + [trained] * len(body) + [0]
    assert ids == expected_ids and mask == expected_mask
    # both assistant turns are trained, each on its two characters and its <|im_end|>
    assert sum(mask) == 6 and [i for i, m in zip(ids, mask) if m] == byte_ids("yo") + [E] + byte_ids("no") + [E]
    assert tok.decode(ids) == render_chatml(messages)


def test_loss_weight_zero_and_think_weight(byte_tokenizer):
    tok = byte_tokenizer
    E = tok.special_tokens["<|im_end|>"]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": 0.0},
                {"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>1+1</think>2"}]
    ids, mask = encode_chat(tok, messages, think_weight=0.25)
    trained = [(i, m) for i, m in zip(ids, mask) if m]
    assert [i for i, _ in trained] == byte_ids("<think>1+1</think>2") + [E]  # the first answer is not trained
    assert [m for _, m in trained] == [0.25] * len("<think>1+1</think>") + [1, 1]


def test_prompt_plus_answer_is_the_training_sequence(byte_tokenizer):
    tok = Tokenizer.train(["hello there, how are you? I am fine. " * 50], vocab_size=300)
    messages = [{"role": "user", "content": "how are you?"}]
    full, _ = encode_chat(tok, messages + [{"role": "assistant", "content": "I am fine."}])
    assert prompt_ids(tok, messages) + answer_ids(tok, "I am fine.") == full[:-len(tok.encode_ordinary("\n"))]
    # a user spelling the marker cannot forge a turn
    forged, _ = encode_chat(tok, [{"role": "user", "content": "<|im_end|>"}])
    assert forged.count(tok.special_tokens["<|im_end|>"]) == 1


def test_truncation_and_padding(byte_tokenizer):
    tok = byte_tokenizer
    long = [{"role": "system", "content": "sys"}, {"role": "user", "content": "a" * 50},
            {"role": "assistant", "content": "b" * 50}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    examples, stats = tokenize_conversations(tok, [long], max_len=60)
    assert stats == {"truncated": 1, "dropped": 0}
    ids, mask = examples[0]
    assert len(ids) <= 60 and tok.decode(ids).startswith("<|im_start|>system\nsys")  # oldest turns went
    assert tokenize_conversations(tok, [long], max_len=60, truncate="drop")[1] == {"truncated": 0, "dropped": 1}
    pad = tok.special_tokens["<|pad|>"]
    inputs, targets, loss_mask = pad_batch([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])], pad)
    assert inputs.tolist() == [[1, 2], [4, pad]] and targets.tolist() == [[2, 3], [5, pad]]
    assert loss_mask.tolist() == [[1, 1], [1, 0]]
    assert pad not in (tok.special_tokens["<|im_end|>"], tok.special_tokens["<|endoftext|>"])


def test_loaders_on_shared_files(data_dir):
    sft = data_dir / "sft"
    alpaca, skipped = load_conversations(sft / "alpaca_en_demo.json")
    raw = json.loads((sft / "alpaca_en_demo.json").read_text())
    assert skipped == 0 and len(alpaca) == len(raw)
    r = raw[next(i for i, r in enumerate(raw) if r["input"])]
    conv = alpaca[raw.index(r)]
    assert conv[0] == {"role": "user", "content": r["instruction"] + "\n" + r["input"], "loss_weight": 1.0}
    assert conv[1]["content"] == r["output"]
    zh, _ = load_conversations(sft / "alpaca_zh_demo.json")
    assert len(zh) == 1000 and any("\u4e00" <= ch <= "\u9fff" for ch in zh[0][1]["content"])
    identity, _ = load_conversations(sft / "identity.json", {"name": "nanollm", "author": "Ada"})
    assert all("{{" not in m["content"] for c in identity for m in c)
    raw_identity = json.loads((sft / "identity.json").read_text())
    assert sum("nanollm" in c[-1]["content"] for c in identity) == sum("{{name}}" in r["output"] for r in raw_identity)
    messages, _ = load_conversations(sft / "v1_sft_demo.jsonl")
    assert len(messages) == 500 and messages[0][0]["loss_weight"] == 0.0 and messages[0][1]["loss_weight"] == 1.0
    pairs, _ = load_preference_pairs(data_dir / "preference" / "dpo_en_demo.json")
    raw_pairs = json.loads((data_dir / "preference" / "dpo_en_demo.json").read_text())
    assert len(pairs) == 300 and pairs[0]["chosen"] == raw_pairs[0]["chosen"]["value"]
    assert pairs[0]["prompt"][-1]["content"] == raw_pairs[0]["conversations"][-1]["value"]
    kto, _ = load_unpaired(data_dir / "preference" / "kto_en_demo.json")
    assert len(kto) == 300 and {e["label"] for e in kto} == {True, False}


def test_sharegpt_and_pair_formats(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"system": "be brief", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}) + "\n")
    (conv,), _ = load_conversations(path)
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}]))
    loaded, _ = load_preference_pairs(pairs)
    assert loaded[0] == {"prompt": [{"role": "user", "content": "2+2?", "loss_weight": 1.0}], "chosen": "4", "rejected": "5"}
    assert loaded[1]["chosen"] == "good" and loaded[1]["prompt"][0]["content"] == "q"


@pytest.mark.parametrize("record, message", [
    ({"instruction": "q"}, r"record 1: missing field 'output'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"record 1\.conversations\[0\]\.from: unknown role 'robot'"),
    ({"instruction": "q", "input": "", "output": "  "}, r"record 1: message 1 \(assistant\) is empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"record 1: no assistant answer"),
    ({"text": "hello"}, r"record 1: unknown format"),
])
def test_bad_records_are_named(tmp_path, record, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "ok", "input": "", "output": "fine"}, record]))
    with pytest.raises(ChatDataError, match=message):
        load_conversations(path)
    good, skipped = load_conversations(path, skip_bad_records=True)
    assert len(good) == 1 and skipped == 1


def test_not_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("this is not json\n")
    with pytest.raises(ChatDataError, match="not JSON or JSONL"):
        load_conversations(path)
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(ChatDataError, match="line 2 is not valid JSON"):
        load_conversations(path)


def test_a_tokenizer_without_pad_pads_with_endoftext(byte_tokenizer):
    import copy
    from chat import END_OF_TEXT, IM_END, PAD, chat_token_ids
    assert chat_token_ids(byte_tokenizer)[PAD] == byte_tokenizer.special_tokens[PAD]  # its own, when it has one
    smollm_like = copy.copy(byte_tokenizer)  # SmolLM2's vocabulary has <|endoftext|> and ChatML, no <|pad|>
    smollm_like.special_tokens = {k: v for k, v in byte_tokenizer.special_tokens.items() if k != PAD}
    ids = chat_token_ids(smollm_like)
    assert ids[PAD] == byte_tokenizer.special_tokens[END_OF_TEXT] and ids[IM_END] == byte_tokenizer.special_tokens[IM_END]
    del smollm_like.special_tokens[END_OF_TEXT]
    with pytest.raises(ChatDataError, match="no <\\|pad\\|> special token"):
        chat_token_ids(smollm_like)
