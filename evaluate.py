"""Evaluation shared by the stages and eval.py: perplexity and bits per byte, multiple choice, greedy
generation checked by a program, BLEU, ROUGE-L and the form of generated Tang poems.

    from evaluate import evaluate_model
    evaluate_model(model, tokenizer, data="data/shakespeare", arithmetic=100)   # {"val_bpb": ..., "arith_acc_0shot": ...}

- perplexity = exp(mean nats per token); bits per byte = total nats / ln 2 / total UTF-8 bytes of the
  predicted tokens (comparable across tokenizers), over consecutive non-overlapping windows of the context.
- multiple choice, as lm-evaluation-harness scores HellaSwag and ARC: log P(choice | context) =
  sum_i log p(c_i | context, c_<i); `acc` takes the argmax of the sum, `acc_norm` of the sum per character.
- generation: greedy decoding (sample.generate, batched) of ChatML prompts stopping at <|im_end|>, scored
  by exact match or a checker (tasks.check for the arithmetic, zero- or k-shot).
- BLEU (Papineni et al. 2002): corpus BLEU-4, clipped n-gram precisions, brevity penalty exp(1 - r/c),
  sacrebleu's "exp" smoothing; ROUGE-L (Lin 2004): LCS F-measure 2PR / (P + R), best reference. Both on
  words, punctuation marks and single Han characters, so English and Chinese alike.
- Tang-poem form: lines between newlines and punctuation, Han characters only, editorial notes in
  parentheses dropped; the form is >= 2 lines of 5 characters each, or all of 7 (五言 / 七言).
"""
import json
import math
import re
import sys
import time
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chat import ChatDataError, pad_batch, prompt_ids
from common import check_tokenizer, load_model, load_tokenizer, resolve_device
from sample import generate
from tasks import arithmetic_problems, check, sft_conversations
from training import TrainingError, load_split, mixed_precision, read_meta

EOT, IM_END = "<|endoftext|>", "<|im_end|>"


class EvalError(ValueError):
    """Bad input (a missing file, a malformed record): one clear line naming the file and the field."""


class TokenizerMismatch(ValueError):
    """Two tokenizers that must be one (a model and its data, a teacher and its student) differ."""


# ----------------------------------------------------------------------------------------------------------
# Loading

def load_for_eval(path, device="cpu", tokenizer_path=None):
    """(model, tokenizer) of a nanollm, quantized or Hugging Face directory (common.load_model)."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path}: no such checkpoint")
    tokenizer = load_tokenizer(path, tokenizer_path)
    check_tokenizer(path, tokenizer, tokenizer_path)
    return load_model(path, device=device).eval(), tokenizer


def model_device(model) -> str:
    return str(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------------------
# Perplexity and bits per byte

def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab,) UTF-8 byte length of each token; special tokens (separators) count 0 bytes."""
    special = set(tokenizer.special_tokens.values())
    return torch.tensor([0 if i in special else len(tokenizer.decode_bytes([i])) for i in range(vocab_size)])


@torch.no_grad()
def evaluate(model, data: np.ndarray, seq_len: int, batch_size: int, device, autocast, token_bytes: torch.Tensor,
             max_tokens: int = 0) -> dict:
    """Loss over consecutive non-overlapping windows of the split (all of it when max_tokens is 0).

    bits per byte = total nats / ln 2 / total UTF-8 bytes of the predicted tokens: comparable across
    tokenizers, unlike loss per token.
    """
    n_windows = (len(data) - 1) // seq_len
    if max_tokens:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        windows = torch.from_numpy(np.stack([data[r * seq_len:r * seq_len + seq_len + 1] for r in rows]).astype(np.int64))
        x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)
        with autocast:
            logits, _ = model(x)
        nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total_nats += nats.item()
        total_tokens += y.numel()
        total_bytes += token_bytes[y.cpu()].sum().item()
    loss = total_nats / total_tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": total_nats / math.log(2) / max(total_bytes, 1), "val_tokens": total_tokens}


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
    metrics = evaluate(model, tokens, seq_len, batch_size, device, mixed_precision(dtype, device)[1], token_bytes, max_tokens)
    return {key.removeprefix("val_"): value for key, value in metrics.items()}


def check_same_tokenizer(first, second, first_name: str, second_name: str, roles=("teacher", "student"),
                         why: str = "white-box distillation needs one shared tokenizer (black-box `distill.py "
                                    "generate` does not)") -> None:
    """Ids must mean the same tokens on both sides: the same ranks, special tokens and pre-split pattern."""
    def fail(what):
        raise TokenizerMismatch(f"{roles[0]} and {roles[1]} tokenizers differ ({what}): {roles[0]} {first_name}, "
                                f"{roles[1]} {second_name}; {why}")
    if first.vocab_size != second.vocab_size:
        fail(f"vocab size {first.vocab_size} vs {second.vocab_size}")
    if first.ranks != second.ranks:
        token = next((t for t in first.ranks if second.ranks.get(t) != first.ranks[t]), None)
        fail(f"token {first.ranks[token]} is {token!r} in the {roles[0]}, not in the {roles[1]}" if token is not None
             else f"the {roles[1]} has tokens the {roles[0]} lacks")
    if first.special_tokens != second.special_tokens:
        fail(f"special tokens {first.special_tokens} vs {second.special_tokens}")
    if first.pattern != second.pattern:
        fail("pre-tokenizer patterns")


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
        check_same_tokenizer(tokenizer, data_tokenizer, "(the checkpoint's)", str(data_dir / meta["tokenizer"]),
                             roles=("model", "data"), why="the data must be tokenized with the checkpoint's tokenizer")
    if meta["vocab_size"] > model.config.vocab_size:
        raise EvalError(f"{data_dir}: vocab_size {meta['vocab_size']} exceeds the model's {model.config.vocab_size}")
    return perplexity(model, tokens, token_byte_lengths(data_tokenizer, model.config.vocab_size), **kwargs)


@torch.no_grad()
def held_out_loss(model, examples, pad_id: int, batch_size: int, device) -> float:
    """sum(loss_mask * CE) / sum(loss_mask) over every held-out chat example (chat.tokenize_conversations'
    (ids, loss_mask) pairs): the masked loss sft.py trains, token-weighted across batches."""
    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        inputs, targets, loss_mask = pad_batch(examples[i:i + batch_size], pad_id, device)
        logits, _ = model(inputs)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        total, count = total + (ce * loss_mask.flatten()).sum().item(), count + loss_mask.sum().item()
    return total / max(count, 1)


def encode_documents(tokenizer, path, txt_docs: str = "file") -> np.ndarray:
    """A .txt or .jsonl file as one token stream, each document followed by <|endoftext|> (data/prepare.py's)."""
    from data.corpus import CorpusError, infer_format, read_documents, tokenize
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
        with mixed_precision(dtype, device)[1]:
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
    try:
        return [prompt_ids(tokenizer, messages) for messages in conversations]
    except ChatDataError as e:
        raise EvalError(str(e)) from None


def arithmetic_conversations(problems, shots: int = 0, seed: int = 0) -> list[list[dict]]:
    """One chat per problem: k solved train problems as earlier user/assistant turns, then the question."""
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
                        batch_size: int = 16, seed: int = 0, problems=None) -> dict:
    """Share of n test problems of tasks.py (or of `problems`) answered right by tasks.check, zero- or k-shot,
    greedy, and the share of answers that ended with <|im_end|> (the model stopped)."""
    problems = arithmetic_problems(n, split="test", seed=seed) if problems is None else problems
    prompts = chat_prompts(tokenizer, arithmetic_conversations(problems, shots, seed))
    texts, stopped = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size,
                                    stop_tokens=[tokenizer.special_tokens[IM_END]])
    right = [check(p, text) for p, text in zip(problems, texts)]
    return {f"arith_acc_{shots}shot": sum(right) / max(len(right), 1), "arith_n": len(problems),
            "arith_stop_rate": sum(stopped) / max(len(stopped), 1),
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
