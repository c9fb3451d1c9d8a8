"""Generate text with a nanollm model: every decoding strategy on the KV cache, speculative decoding,
batched and streaming generation, and a chat REPL.

    python sample.py --ckpt out/shakespeare --prompt "ROMEO:" --strategy sample --temperature 0.8 --top-p 0.95
    python sample.py --ckpt out/shakespeare --prompt "ROMEO:" --strategy beam --beam-width 4 --num-samples 2
    python sample.py --ckpt out/big --draft-ckpt out/tiny --strategy speculative --prompt "ROMEO:"
    python sample.py --ckpt out/sft --interactive       # multi-turn chat (ChatML): /reset, /system TEXT, /quit
    python sample.py --bench                            # decode tokens/s against transformers' generate

How it works: the prompts, left-padded to a common length (the padding masked out), go through the
model once to fill the KV cache ("prefill"); then each step feeds one token per row and attends to
the cached keys and values instead of recomputing the prefix ("decode"). The next token comes from
the last position's logits, transformed in this order:

    penalties -> temperature -> top-k -> top-p -> min-p -> sample (argmax when temperature == 0)

- repetition penalty (Keskar et al. 2019, CTRL): a seen token's logit l becomes l / r if l > 0 else l * r.
- frequency / presence penalties (the OpenAI API's): l - frequency * count - presence * [count > 0].
- temperature: sample from softmax(l / T); T = 0 is greedy decoding.
- top-k (Fan et al. 2018): keep the k most probable tokens.
- top-p, nucleus (Holtzman et al. 2020): keep the fewest most probable tokens whose mass reaches p.
- min-p (Nguyen et al. 2024): keep tokens whose probability is at least min_p times the top one's.
- beam search: keep the `beam_width` most probable prefixes; finished hypotheses are ranked by
  log P / length^alpha (the length penalty of Wu et al. 2016).
- speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes k
  tokens x_i ~ q_i, the target scores all of them in one forward pass, x_i is accepted with
  probability min(1, p_i(x_i) / q_i(x_i)), the first rejected one is replaced by a sample of
  norm(max(0, p_i - q_i)), and when all k pass one more token comes from p_{k+1}. The output is
  distributed exactly as the target model's own samples, in fewer target passes.

Streaming decodes token bytes with an incremental UTF-8 decoder, so a character split across tokens
(Chinese, emoji) is printed whole once its last byte arrives, never as a replacement character.
"""
import argparse
import codecs
import copy
import math
import sys
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chat import END_OF_TEXT, IM_END, IM_START, prompt_ids
from common import load_model, load_tokenizer, resolve_device
from model import Transformer

STRATEGIES = ("greedy", "sample", "beam", "speculative")


# ----------------------------------------------------------------------------------------------------------
# Logit transforms: logits (B, V) in, logits (B, V) out; a filtered-out token gets -inf.

def apply_penalties(logits, seen, counts, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    """Discourage tokens already present.

    seen (B, V) bool: the token occurs in the prompt or the output so far (the repetition penalty's
    context, as in CTRL and Hugging Face). counts (B, V): how often it was generated (the frequency and
    presence penalties count the output only, as in the OpenAI API and vLLM).
        repetition:          l' = l / r if l > 0 else l * r     (seen tokens only; r > 1 discourages)
        frequency, presence: l' = l - frequency * count - presence * [count > 0]
    """
    if repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if frequency_penalty or presence_penalty:
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def top_k_filter(logits, k: int):
    """Keep each row's k largest logits, and any tied with the k-th (no arbitrary choice among equals)."""
    if k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]   # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits, p: float):
    """Nucleus: keep token i iff the probability mass of the tokens strictly more probable than i is < p.

    That is the smallest set of most probable tokens whose mass reaches p. The most probable token is
    always kept (no mass lies above it), and tokens of equal probability are kept or dropped together.
    """
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values                      # (B, V)
    mass_before = torch.cat([torch.zeros_like(sorted_probs[..., :1]), sorted_probs.cumsum(-1)[..., :-1]], -1)
    n_keep = (mass_before < p).sum(-1, keepdim=True)                               # >= 1: mass_before[0] = 0
    smallest_kept = sorted_probs.gather(-1, n_keep - 1)                            # (B, 1)
    return logits.masked_fill(probs < smallest_kept, float("-inf"))


def min_p_filter(logits, min_p: float):
    """Keep tokens with probability >= min_p * max probability, i.e. logit >= max logit + ln(min_p)."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


@dataclass
class SamplingParams:
    """How the next token is chosen from the logits (see the module docstring for the order)."""
    temperature: float = 1.0            # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def filter(self, logits):
        """Temperature, top-k, top-p, min-p on fp32 logits (B, V) (penalties come before, separately)."""
        logits = logits / self.temperature
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p is not None:
            logits = min_p_filter(logits, self.min_p)
        return logits

    def probs(self, logits):
        """The distribution the next token is drawn from, (B, V): one-hot on the argmax when greedy."""
        if self.greedy:
            return F.one_hot(logits.argmax(-1), logits.size(-1)).to(torch.float32)
        return self.filter(logits.float()).softmax(-1)

    def choose(self, logits, generator=None):
        """Next token ids (B,) from (already penalised) logits (B, V)."""
        if self.greedy:
            return logits.argmax(-1)
        return sample_from(self.filter(logits.float()).softmax(-1), generator)


def sample_from(probs, generator=None):
    """One token per row of probs (..., V): argmax_i p_i / E_i with E_i ~ Exp(1) independent is distributed
    as p (an "exponential race", equivalent to the Gumbel-max trick), and cheaper than torch.multinomial."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


# ----------------------------------------------------------------------------------------------------------
# Streaming text

class TextStream:
    """Token ids in, printable text out, one token at a time.

    Token bytes go through an incremental UTF-8 decoder, which keeps the first bytes of a character
    split across tokens until the rest arrive. Text that could be the beginning of a stop string is
    held back; once a stop string appears, the text before it is released and `stopped` is set.
    """

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""           # decoded but not released: it may start a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly '')."""
        if self.stopped:
            return ""
        try:
            data = self.tokenizer.decode_bytes([token_id])
        except ValueError:  # an id the tokenizer lacks: a padded vocabulary's tail, a gap like cl100k's
            data = "\ufffd".encode()
        self.pending += self.decoder.decode(data)
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            text, self.pending = self.pending[:min(hits)], ""
            return text
        hold = max((n for s in self.stop_strings for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text

    def finish(self) -> str:
        """Release everything left (an incomplete last character becomes U+FFFD)."""
        if self.stopped:
            return ""
        text, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        return text


# ----------------------------------------------------------------------------------------------------------
# Batched generation on the KV cache

def left_pad(prompts, device=None, pad_id: int = 0):
    """Prompts -> (ids (B, T) left-padded with pad_id, pad_lens (B,) or None when no row is padded).

    prompts: a (B, T) tensor; one prompt as a 1-D tensor or a list of ints; or a list of id sequences
    (lists or 1-D tensors) of any lengths. Left padding puts every row's last token in the last
    column, so one decode step serves all rows.
    """
    if torch.is_tensor(prompts) and prompts.dim() == 2:
        if prompts.size(1) == 0:
            raise ValueError("prompts are empty: generation needs at least one token to condition on")
        return prompts.to(device=device, dtype=torch.long), None
    if (torch.is_tensor(prompts) and prompts.dim() == 1) or (len(prompts) and isinstance(prompts[0], int)):
        prompts = [prompts]
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
    T = max(row.numel() for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, T - row.numel():] = row
    pad_lens = torch.tensor([T - row.numel() for row in rows])
    return ids.to(device), (pad_lens.to(device) if pad_lens.any() else None)


_compiled_models = weakref.WeakKeyDictionary()


def compiled(model: Transformer):
    """model, torch.compile'd for decode steps (built once per model and kept for the process's life).

    The C++ wrapper calls the generated kernels without Python in between: on the CPU most of a small
    model's per-token time beside the matmuls is Python and dispatch overhead, which this removes.
    (Freezing the weights into the graph was slower here: inductor then repacks the linear layers for
    oneDNN, whose one-row matmuls lose to MKL's on decode_layout() weights; sample.py --bench measures it.)
    """
    if model not in _compiled_models:
        _compiled_models[model] = torch.compile(model, dynamic=True, options={"cpp_wrapper": True})
    return _compiled_models[model]


def check_prompt_length(T: int, max_seq_len: int) -> None:
    if T >= max_seq_len:
        raise ValueError(f"prompt of {T} tokens leaves no room to generate in the model's context of "
                         f"{max_seq_len} tokens (shorten it, or truncate it from the left)")


@torch.inference_mode()
def generate(model: Transformer, prompts, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             seed: int | None = None, stop_tokens=(), stop_strings=(), tokenizer=None, on_text=None,
             use_cache: bool = True, compile: bool = False) -> list[torch.Tensor]:
    """Continue each prompt by up to max_new_tokens tokens; return each row's new tokens (1-D, on the CPU).

    prompts: see left_pad (rows may differ in length). A row stops at a token in stop_tokens (not
    included in its output), or after the token that completes one of stop_strings (kept), or when
    the model's context is full. tokenizer (anything with decode_bytes(ids) -> bytes) is needed for
    stop_strings and on_text: on_text(row, text) receives each row's text as soon as it is final.
    seed makes sampling reproducible. use_cache=False recomputes the whole sequence at every step
    (the reference the cache is tested and benchmarked against); compile=True decodes with
    `compiled(model)`.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty)
    if (stop_strings or on_text) and tokenizer is None:
        raise ValueError("stop_strings and on_text need a tokenizer to turn tokens into text")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.embed_tokens.weight.device
    ids, pad_lens = left_pad(prompts, device)
    B, T = ids.shape
    check_prompt_length(T, model.config.max_seq_len)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - T)  # stop when the context is full
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop_ids = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    streams = [TextStream(tokenizer, stop_strings) for _ in range(B)] if tokenizer is not None else None

    out = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    lengths = [max_new_tokens] * B                        # where each row's output ends
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if params.has_penalties:
        real = (torch.arange(T, device=device)[None] >= (pad_lens[:, None] if pad_lens is not None else 0)).expand(B, T)
        seen = torch.zeros(B, model.config.vocab_size, device=device).scatter_add_(1, ids, real.float()) > 0
        counts = torch.zeros(B, model.config.vocab_size, device=device)

    def full_forward(seq):  # no cache: the whole sequence every step (a fresh cache only to mask the padding)
        cache = model.new_kv_cache(B, seq.size(1), pad_lens) if pad_lens is not None else None
        return model(seq, kv_cache=cache)[0][:, -1]

    step = compiled(model) if compile else model
    cache = model.new_kv_cache(B, T + max_new_tokens, pad_lens) if use_cache else None
    logits = model(ids, kv_cache=cache)[0][:, -1] if use_cache else full_forward(ids)   # (B, V)
    for i in range(max_new_tokens):
        logits = logits.float()
        if params.has_penalties:
            logits = apply_penalties(logits, seen, counts, repetition_penalty, frequency_penalty, presence_penalty)
        next_ids = params.choose(logits, generator)                                        # (B,)
        out[:, i] = next_ids
        if params.has_penalties:  # (rows already done update too: their output is discarded)
            counts.scatter_add_(1, next_ids[:, None], torch.ones_like(counts[:, :1]))
            seen.scatter_(1, next_ids[:, None], True)
        if stop_ids.numel() or streams is not None:  # (skipped otherwise: each check costs a little per step)
            finished = ~done & torch.isin(next_ids, stop_ids)
            for b in finished.nonzero().flatten().tolist():
                lengths[b] = i
            if streams is not None:
                for b in (~done & ~finished).nonzero().flatten().tolist():
                    text = streams[b].push(next_ids[b].item())
                    if text and on_text:
                        on_text(b, text)
                    if streams[b].stopped:
                        lengths[b], finished[b] = i + 1, True
            done |= finished
            if bool(done.all()):
                break
        if i == max_new_tokens - 1:
            break
        if use_cache:
            logits = step(next_ids[:, None], start_pos=T + i, kv_cache=cache)[0][:, -1]
        else:
            logits = full_forward(torch.cat([ids, out[:, :i + 1]], dim=1))
    if streams is not None:
        for b, stream in enumerate(streams):
            text = stream.finish()
            if text and on_text:
                on_text(b, text)
    return [out[b, :lengths[b]].cpu() for b in range(B)]


# ----------------------------------------------------------------------------------------------------------
# Beam search

def reorder_cache(cache, rows: torch.Tensor) -> None:
    """Make the cache hold rows `rows` (new_B,) of itself, in that order: rows may repeat or vanish."""
    cache.keys = cache.keys.index_select(1, rows)       # (n_layers, new_B, n_kv_heads, S, head_dim)
    cache.values = cache.values.index_select(1, rows)
    if cache.pad_lens is not None:
        cache.pad_lens = cache.pad_lens.index_select(0, rows)


@torch.inference_mode()
def beam_search(model: Transformer, prompt, max_new_tokens: int, beam_width: int = 4, length_penalty: float = 1.0,
                early_stopping: bool = True, stop_tokens=()) -> list[tuple[torch.Tensor, float]]:
    """The beam_width best continuations of one prompt, best first, as (new tokens, score).

    Every step extends each live beam by every token and keeps the beam_width highest sums of log
    probabilities (the beams are the rows of one batch; the KV cache rows follow their beams). A beam
    that emits a stop token becomes a finished hypothesis (the stop token counted, not returned) scored
    sum log p / length^length_penalty: 0 ranks by raw probability, > 0 favours longer outputs.
    Search ends after max_new_tokens, or with early_stopping as soon as beam_width hypotheses are
    finished; without it, once no live beam can still beat the worst of them (as in Hugging Face).
    Unfinished beams are scored the same way when the search ends.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    device = model.embed_tokens.weight.device
    ids, _ = left_pad(torch.as_tensor(prompt).flatten(), device)
    T = ids.size(1)
    check_prompt_length(T, model.config.max_seq_len)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - T)
    stop = set(stop_tokens)
    W = beam_width

    def score(sum_logprob: float, length: int) -> float:
        return sum_logprob / length ** length_penalty

    cache = model.new_kv_cache(1, T + max_new_tokens)
    logits = model(ids, kv_cache=cache)[0][:, -1]
    reorder_cache(cache, torch.zeros(W, dtype=torch.long, device=device))   # W copies of the prompt
    # all W beams start as the same prefix: only the first may expand, or the step would pick duplicates
    beam_scores = torch.full((W,), float("-inf"), device=device)
    beam_scores[0] = 0.0
    beam_tokens = torch.zeros((W, 0), dtype=torch.long, device=device)
    finished: list[tuple[float, torch.Tensor]] = []
    for i in range(max_new_tokens):
        logprobs = F.log_softmax(logits.float(), dim=-1)                     # (W, V)
        V = logprobs.size(-1)
        candidates = (beam_scores[:, None] + logprobs).view(-1)               # (W * V,)
        # 2W candidates: even if W of them end with a stop token, W remain to continue
        top_scores, top_index = candidates.topk(min(2 * W, candidates.numel()))
        keep_rows, keep_tokens, keep_scores = [], [], []
        for s, index in zip(top_scores.tolist(), top_index.tolist()):
            if s == float("-inf") or len(keep_rows) == W:
                break
            row, token = divmod(index, V)
            if token in stop:
                finished.append((score(s, i + 1), beam_tokens[row].clone()))
            else:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(s)
        finished = sorted(finished, key=lambda h: h[0], reverse=True)[:W]
        if not keep_rows:
            break
        n_live = len(keep_rows)
        rows = torch.tensor(keep_rows + [keep_rows[0]] * (W - n_live), device=device)   # dead rows pad the batch
        new_tokens = torch.tensor(keep_tokens + [keep_tokens[0]] * (W - n_live), device=device)
        beam_scores = torch.tensor(keep_scores + [float("-inf")] * (W - n_live), device=device)
        beam_tokens = torch.cat([beam_tokens[rows], new_tokens[:, None]], dim=1)
        if len(finished) == W:
            best_live = score(keep_scores[0], i + 1)
            if early_stopping or finished[-1][0] >= best_live:
                break
        if i == max_new_tokens - 1:
            break
        reorder_cache(cache, rows)
        logits = model(new_tokens[:, None], start_pos=T + i, kv_cache=cache)[0][:, -1]
    if beam_tokens.size(1):
        for s, tokens in zip(beam_scores.tolist(), beam_tokens):
            if s > float("-inf"):
                finished.append((score(s, tokens.numel()), tokens.clone()))
    finished = sorted(finished, key=lambda h: h[0], reverse=True)[:W]
    return [(tokens.cpu(), s) for s, tokens in finished]


# ----------------------------------------------------------------------------------------------------------
# Speculative decoding

@torch.inference_mode()
def speculative_generate(target: Transformer, draft: Transformer, prompt, max_new_tokens: int, n_draft: int = 4, *,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         min_p: float | None = None, seed: int | None = None, stop_tokens=(), stop_strings=(),
                         tokenizer=None, on_text=None) -> tuple[torch.Tensor, dict]:
    """Sample from `target` with `draft` proposing n_draft tokens per round; returns (new tokens, stats).

    Each round keeps the invariant: the target's cache holds every token but the last, the draft's
    cache a prefix of them. The draft catches up and proposes x_1..x_k with distributions q_1..q_k;
    the target runs once on [last token, x_1..x_k], giving p_1..p_{k+1}; x_i is accepted with
    probability min(1, p_i(x_i) / q_i(x_i)); the first rejected x_i is replaced by a sample of
    norm(max(0, p_i - q_i)); if all pass, x_{k+1} ~ p_{k+1}. Positions past the accepted tokens are
    simply overwritten next round. p and q are the distributions after temperature / top-k / top-p /
    min-p, so the output follows exactly what `generate` with the same settings samples from the
    target; with temperature 0 both are one-hot and this returns the target's greedy output.
    stats: drafted, accepted, acceptance_rate (accepted / drafted), target_calls. One prompt.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p)
    if n_draft < 1:
        raise ValueError(f"n_draft must be >= 1, got {n_draft}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}): they must share a tokenizer")
    if (stop_strings or on_text) and tokenizer is None:
        raise ValueError("stop_strings and on_text need a tokenizer to turn tokens into text")
    device = target.embed_tokens.weight.device
    tokens = [int(t) for t in torch.as_tensor(prompt).flatten()]
    L0 = len(tokens)
    if L0 == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to condition on")
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    check_prompt_length(L0, context)
    end = L0 + min(max_new_tokens, context - L0)                                # final sequence length
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stream = TextStream(tokenizer, stop_strings) if tokenizer is not None else None
    stop = set(stop_tokens)

    def ids(values):  # a list of token ids -> (1, T)
        return torch.tensor([values], dtype=torch.long, device=device)

    def pick(probs):  # (V,) -> one token id
        return int(probs.argmax()) if params.greedy else int(sample_from(probs, generator))

    target_cache, draft_cache = target.new_kv_cache(1, end), draft.new_kv_cache(1, end)
    if L0 > 1:
        target(ids(tokens[:-1]), kv_cache=target_cache)
    draft_len = 0                         # tokens whose keys/values are in the draft's cache
    stats = {"drafted": 0, "accepted": 0, "target_calls": 0}
    stopped = False
    while len(tokens) < end and not stopped:
        L = len(tokens)
        k = min(n_draft, end - L - 1)     # this round adds up to k + 1 tokens
        drafted, q = [], []
        if k > 0:
            logits = draft(ids(tokens[draft_len:]), start_pos=draft_len, kv_cache=draft_cache)[0][:, -1]
            for j in range(k):
                q.append(params.probs(logits)[0])                                # (V,)
                drafted.append(pick(q[-1]))
                if j < k - 1:
                    logits = draft(ids(drafted[-1:]), start_pos=L + j, kv_cache=draft_cache)[0][:, -1]
            draft_len = L + k - 1
        p = params.probs(target(ids(tokens[-1:] + drafted), start_pos=L - 1, kv_cache=target_cache)[0][0])  # (k+1, V)
        n_accepted = 0
        for j, x in enumerate(drafted):
            if torch.rand((), generator=generator, device=device).item() < (p[j, x] / q[j][x]).item():
                n_accepted += 1
                continue
            residual = (p[j] - q[j]).clamp(min=0)
            correction = pick(residual / residual.sum() if residual.sum() > 0 else p[j])
            break
        else:
            correction = pick(p[k])
        stats["target_calls"] += 1
        stats["drafted"] += k
        stats["accepted"] += n_accepted
        draft_len = min(draft_len, L + n_accepted)  # the draft's keys past the accepted tokens are stale
        for x in drafted[:n_accepted] + [correction]:
            if x in stop:
                stopped = True
                break
            tokens.append(x)
            if stream is not None:
                text = stream.push(x)
                if text and on_text:
                    on_text(0, text)
                if stream.stopped:
                    stopped = True
                    break
    if stream is not None:
        text = stream.finish()
        if text and on_text:
            on_text(0, text)
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else float("nan")
    return torch.tensor(tokens[L0:], dtype=torch.long), stats


# ----------------------------------------------------------------------------------------------------------
# Benchmark

def bench(args):
    """Decode tokens/s on the CPU, nanollm beside transformers' generate on the same weights, one run.

    Default models have random weights: the `small` preset, and for speculative decoding an 8-layer
    target with a 2-layer draft made of the target's first two layers (an early-exit draft, as in
    LayerSkip, Elhoushi et al. 2024), so acceptance rates are those of random models; pass --ckpt
    (and --draft-ckpt) to measure trained ones.
    """
    from model import ModelConfig
    from tests.reference import hf_copy  # the reference side of the comparison
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N = args.bench_tokens
    if args.ckpt:
        model = load_model(args.ckpt, "cpu", torch.float32)
        target = model
        draft = load_model(args.draft_ckpt, "cpu", torch.float32) if args.draft_ckpt else None
    else:
        model = Transformer(ModelConfig.from_preset("small")).eval()
        target = Transformer(ModelConfig.from_preset("small", n_layers=8)).eval()
        draft = Transformer(ModelConfig.from_preset("small", n_layers=2)).eval()
        draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    training_layout = copy.deepcopy(model)
    for m in filter(None, (model, target, draft)):
        m.decode_layout()  # as sample.py's CLI does on the CPU
    V, context = model.config.vocab_size, model.config.max_seq_len
    prompt = torch.randint(V, (16,))
    batch = [torch.randint(V, (n,)) for n in (16, 5, 23, 9, 30, 12, 27, 19)]   # 8 prompts of different lengths
    if max(map(len, batch)) + N > context:
        raise SystemExit(f"--bench-tokens {N} does not fit the model's context of {context} tokens")
    hf_model = hf_copy(model)

    def hf_generate(prompts):
        ids, pad_lens = left_pad(prompts)
        pad_lens = pad_lens if pad_lens is not None else torch.zeros(len(ids), dtype=torch.long)
        mask = (torch.arange(ids.size(1))[None] >= pad_lens[:, None]).long()
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=0,
                                    top_k=None, top_p=None, temperature=None)
        return list(out[:, ids.size(1):])

    def speculative(name, temperature):
        def run():
            tokens, stats = speculative_generate(target, draft, prompt, N, 4, temperature=temperature, seed=0)
            acceptance[name] = stats["acceptance_rate"]
            return [tokens]
        return run

    # name -> (batch size, function returning the new tokens of each row)
    cases = {
        "nanollm, KV cache, weights in the training layout": (1, lambda: generate(training_layout, prompt, N, temperature=0)),
        "nanollm, KV cache": (1, lambda: generate(model, prompt, N, temperature=0)),
        "nanollm, KV cache + torch.compile": (1, lambda: generate(model, prompt, N, temperature=0, compile=True)),
        "transformers generate, KV cache": (1, lambda: hf_generate([prompt])),
        "nanollm, KV cache, batch of 8 prompts (5-30 tokens)": (8, lambda: generate(model, batch, N, temperature=0)),
        "transformers generate, batch of 8 prompts": (8, lambda: hf_generate(batch)),
    }
    acceptance, speculative_pairs = {}, []   # (label, plain decoding case, speculative case)
    if draft is not None:
        for temperature in (0.0, 1.0):
            label = "greedy" if temperature == 0 else f"sampling T={temperature:g}"
            plain = f"target ({target.config.n_layers} layers), plain decoding, {label}"
            fast = f"speculative, {draft.config.n_layers}-layer draft, 4 tokens drafted per round, {label}"
            cases[plain] = (1, lambda t=temperature: generate(target, prompt, N, temperature=t, seed=0))
            cases[fast] = (1, speculative(fast, temperature))
            speculative_pairs.append((label, plain, fast))

    print(f"decode tokens/s on {torch.get_num_threads()} CPU thread(s), {N} new tokens per prompt (prefill "
          f"included), fastest of {args.repeats} rounds that run every case in turn", file=sys.stderr)
    start = time.perf_counter()
    generate(model, prompt, 8, temperature=0, compile=True)  # compiles the decode step, once
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    no_cache_tokens = generate(model, prompt, N, temperature=0, use_cache=False)[0].numel()  # one run: it is slow
    rates = {"nanollm, no cache (recompute every step)": no_cache_tokens / (time.perf_counter() - start)}
    outputs = {}
    for round_ in range(args.repeats):
        for name, (_, fn) in cases.items():
            start = time.perf_counter()
            outputs[name] = fn()
            rate = sum(o.numel() for o in outputs[name]) / (time.perf_counter() - start)
            rates[name] = max(rate, rates.get(name, 0.0))
        print(f"  round {round_ + 1}/{args.repeats} done", file=sys.stderr)

    same = torch.equal(outputs["nanollm, KV cache"][0], outputs["transformers generate, KV cache"][0])
    notes = {"nanollm, KV cache + torch.compile": f"compiling took {compile_seconds:.0f} s, once",
             "transformers generate, KV cache": "same tokens as nanollm" if same else "tokens differ from nanollm"}
    notes.update((name, f"acceptance {rate:.2f}") for name, rate in acceptance.items())
    sizes = {name: size for name, (size, _) in cases.items()}
    print(f"\n| {'model: ' + args.ckpt if args.ckpt else 'small preset, random weights'} | batch | tokens/s | |")
    print("|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {sizes.get(name, 1)} | {rate:.1f} | {notes.get(name, '')} |")
    hf = rates["transformers generate, KV cache"]
    print(f"\nKV cache vs recomputation: {rates['nanollm, KV cache'] / rates['nanollm, no cache (recompute every step)']:.1f}x"
          f" (target >= 5x)")
    print(f"nanollm vs transformers, greedy, batch 1: {rates['nanollm, KV cache'] / hf:.2f}x eager, "
          f"{rates['nanollm, KV cache + torch.compile'] / hf:.2f}x compiled (target >= 1.5x); batch 8: "
          f"{rates['nanollm, KV cache, batch of 8 prompts (5-30 tokens)'] / rates['transformers generate, batch of 8 prompts']:.2f}x")
    for label, plain, fast in speculative_pairs:
        print(f"speculative vs plain decoding, {label}: {rates[fast] / rates[plain]:.2f}x at acceptance "
              f"{acceptance[fast]:.2f} (target: faster when acceptance >= 0.7)")

# ----------------------------------------------------------------------------------------------------------
# Command line

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="strategies: greedy (argmax), sample (temperature, top-k/p, min-p, "
                                            "penalties), beam, speculative (needs --draft-ckpt)")
    parser.add_argument("--ckpt", help="nanollm checkpoint directory (ckpt.pt), Hugging Face model directory or .gguf file")
    parser.add_argument("--prompt", default="", help="text to continue (default: '' = start a new document)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="sample", help="decoding strategy (default: sample)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="samples for the same prompt, generated as one batch (beam: the best N beams)")
    parser.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, help="keep the k most probable tokens")
    parser.add_argument("--top-p", type=float, help="nucleus: keep the most probable tokens up to mass p, in (0, 1]")
    parser.add_argument("--min-p", type=float, help="keep tokens with probability >= min_p * the top one's")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract this x count (default: 0)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="subtract this once seen (default: 0)")
    parser.add_argument("--beam-width", type=int, default=4, help="beam search: live beams (default: 4)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: score = log P / length^this (default: 1)")
    parser.add_argument("--no-early-stopping", action="store_true",
                        help="beam search: continue while a live beam can still beat a finished one")
    parser.add_argument("--draft-ckpt", help="speculative: the small draft model (same tokenizer)")
    parser.add_argument("--n-draft", type=int, default=4, help="speculative: tokens drafted per round (default: 4)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string, repeatable (in bash, $'\\n\\n' is a blank line)")
    parser.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    parser.add_argument("--truncate", choices=("error", "left"), default="error",
                        help="a prompt too long for the context: error, or keep its end (default: error)")
    parser.add_argument("--tokenizer", help="tokenizer file (default: the one saved with the checkpoint)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights dtype (default: auto = bfloat16 on CUDA, else float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (greedy / sample)")
    parser.add_argument("--interactive", action="store_true",
                        help="chat (ChatML) with an SFT checkpoint: /reset, /system TEXT, /quit")
    parser.add_argument("--system", help="--interactive: the system prompt")
    parser.add_argument("--bench", action="store_true", help="print the decode tokens/s table (random weights)")
    parser.add_argument("--bench-tokens", type=int, default=256, help="--bench: new tokens per run (default: 256)")
    parser.add_argument("--threads", type=int, default=1, help="--bench: torch CPU threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=2, help="--bench: runs per row, the fastest kept (default: 2)")
    return parser


def check_args(parser, args):
    """Every argument problem found before anything is loaded, as one clear message."""
    try:
        sampling_params(args)
    except ValueError as e:
        parser.error(str(e))
    for name in ("max_new_tokens", "num_samples", "beam_width", "n_draft", "threads", "repeats", "bench_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bench:
        return
    if not args.ckpt:
        parser.error("--ckpt is required (a checkpoint directory), unless --bench")
    if args.strategy == "speculative" and not args.draft_ckpt:
        parser.error("--strategy speculative needs --draft-ckpt (a small model with the same tokenizer)")
    if args.strategy == "speculative" and (args.repetition_penalty != 1.0 or args.frequency_penalty or args.presence_penalty):
        parser.error("--strategy speculative does not take penalties (they change p per drafted token)")
    if args.strategy == "beam" and args.num_samples > args.beam_width:
        parser.error(f"--num-samples {args.num_samples} exceeds --beam-width {args.beam_width}")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(0.0 if args.strategy == "greedy" else args.temperature, args.top_k, args.top_p, args.min_p,
                          args.repetition_penalty, args.frequency_penalty, args.presence_penalty)


def respond(args, model, draft, tokenizer, ids, stop_tokens, on_text=None):
    """Run the chosen strategy on one prompt; returns (texts, generated token count, extra report)."""
    n = args.num_samples
    texts = [[] for _ in range(n)]

    def collect(row, text):
        texts[row].append(text)
        if on_text:
            on_text(row, text)
    if args.strategy == "beam":
        beams = beam_search(model, ids, args.max_new_tokens, args.beam_width, args.length_penalty,
                            not args.no_early_stopping, stop_tokens)[:n]
        outputs = []
        for tokens, score in beams:
            stream = TextStream(tokenizer, args.stop)
            outputs.append("".join(stream.push(t) for t in tokens.tolist()) + stream.finish())
        return outputs, sum(t.numel() for t, _ in beams), "scores " + ", ".join(f"{s:.3f}" for _, s in beams)
    if args.strategy == "speculative":
        count, stats = 0, {"drafted": 0, "accepted": 0}
        for row in range(n):
            tokens, run = speculative_generate(
                model, draft, ids, args.max_new_tokens, args.n_draft, temperature=sampling_params(args).temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                seed=None if args.seed is None else args.seed + row, stop_tokens=stop_tokens,
                stop_strings=args.stop, tokenizer=tokenizer, on_text=lambda _, text, row=row: collect(row, text))
            count += tokens.numel()
            stats = {key: stats[key] + run[key] for key in stats}
        return ["".join(t) for t in texts], count, f"acceptance {stats['accepted'] / max(stats['drafted'], 1):.2f}"
    p = sampling_params(args)
    outs = generate(model, [ids] * n, args.max_new_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                    min_p=p.min_p, repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
                    presence_penalty=p.presence_penalty, seed=args.seed, stop_tokens=stop_tokens,
                    stop_strings=args.stop, tokenizer=tokenizer, on_text=collect, compile=args.compile)
    return ["".join(t) for t in texts], sum(o.numel() for o in outs), ""


def fit_prompt(ids, context: int, max_new_tokens: int, truncate: str):
    """The prompt's ids, cut from the left when --truncate left and it leaves no room for max_new_tokens."""
    if len(ids) + max_new_tokens <= context:
        return ids
    if truncate == "left":
        return ids[-max(1, context - max_new_tokens):]
    if len(ids) >= context:
        raise ValueError(f"the prompt is {len(ids)} tokens, the model's context {context}: shorten it "
                         f"or pass --truncate left")
    return ids  # it fits: generation stops when the context is full


def complete(args, model, draft, tokenizer):
    """Continue --prompt: stream a single sample as it is generated, print several at the end."""
    eot = tokenizer.special_tokens.get(END_OF_TEXT)
    ids = tokenizer.encode(args.prompt, allowed_special="all") if args.prompt else []
    if not ids:
        if eot is None:
            raise ValueError(f"an empty prompt starts from {END_OF_TEXT}, which this tokenizer lacks: give --prompt")
        ids = [eot]
    context = min(model.config.max_seq_len, draft.config.max_seq_len if draft else model.config.max_seq_len)
    ids = fit_prompt(ids, context, args.max_new_tokens, args.truncate)
    streaming = args.num_samples == 1 and args.strategy != "beam"
    if streaming:
        print(args.prompt, end="", flush=True)
    started = time.perf_counter()
    texts, n_tokens, extra = respond(args, model, draft, tokenizer, ids, [eot] if eot is not None else [],
                                     (lambda _, text: print(text, end="", flush=True)) if streaming else None)
    elapsed = time.perf_counter() - started
    if streaming:
        print(flush=True)
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} of {len(texts)} ---\n{args.prompt}{text}")
    notes = [extra] * bool(extra) + ["the first run includes compiling"] * args.compile
    print(f"[{n_tokens} tokens in {elapsed:.2f} s: {n_tokens / elapsed:.1f} tokens/s{''.join('; ' + n for n in notes)}]",
          file=sys.stderr)


def chat(args, model, draft, tokenizer):
    """A multi-turn chat REPL on the ChatML template; the history is re-encoded every turn."""
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"--interactive needs a chat tokenizer (an SFT checkpoint's): it lacks {', '.join(missing)}")
    stop_tokens = [tokenizer.special_tokens[t] for t in (IM_END, END_OF_TEXT) if t in tokenizer.special_tokens]
    context = min(model.config.max_seq_len, draft.config.max_seq_len if draft else model.config.max_seq_len)
    args.num_samples = 1
    system, history = args.system, []
    print("chat: /reset clears the history, /system TEXT sets the system prompt, /quit exits", file=sys.stderr)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print()
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if command == "/system" or command.startswith("/system "):
            system, history = command[len("/system"):].strip() or None, []
            print(f"(system prompt {'set' if system else 'cleared'}; history cleared)", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"(unknown command {command.split()[0]}: /reset, /system TEXT, /quit)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        while True:  # drop the oldest exchanges until the conversation leaves room for an answer
            messages = ([{"role": "system", "content": system}] if system else []) + history
            ids = prompt_ids(tokenizer, messages)
            if len(ids) < context or len(history) == 1:
                break
            history = history[2:]
        if len(ids) >= context:
            print(f"(message too long: {len(ids)} tokens for a context of {context})", file=sys.stderr)
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        started = time.perf_counter()
        texts, n_tokens, extra = respond(args, model, draft, tokenizer, ids, stop_tokens,
                                         None if args.strategy == "beam" else lambda _, text: print(text, end="", flush=True))
        elapsed = time.perf_counter() - started
        print(texts[0] if args.strategy == "beam" else "", flush=True)
        history.append({"role": "assistant", "content": texts[0]})
        print(f"[{n_tokens} tokens, {n_tokens / elapsed:.1f} tokens/s{'; ' + extra if extra else ''}]", file=sys.stderr)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.bench:
        bench(args)
        return
    try:
        device = resolve_device(args.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}[args.dtype]
        model = load_model(args.ckpt, device, dtype)
        draft = load_model(args.draft_ckpt, device, dtype) if args.strategy == "speculative" else None
        if device == "cpu":  # inference only from here on: the weight layout the CPU decodes fastest with
            for m in filter(None, (model, draft)):
                m.decode_layout()
        tokenizer = load_tokenizer(args.ckpt, args.tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model only {model.config.vocab_size}: "
                             "they do not belong together")
        if args.seed is not None:
            torch.manual_seed(args.seed)
        (chat if args.interactive else complete)(args, model, draft, tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
