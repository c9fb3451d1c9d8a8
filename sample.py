"""Generate text with a nanollm model: sampling on the KV cache with every logit transform, batched and
streaming generation, and a chat REPL (beam search and speculative decoding: decoding.py).

    python sample.py --ckpt out/shakespeare --prompt "ROMEO:" --strategy sample --temperature 0.8 --top-p 0.95
    python sample.py --ckpt out/shakespeare --prompt "ROMEO:" --strategy beam --beam-width 4 --num-samples 2
    python sample.py --ckpt out/big --draft-ckpt out/tiny --strategy speculative --prompt "ROMEO:"
    python sample.py --ckpt out/sft --interactive       # multi-turn chat (ChatML): /reset, /system TEXT, /quit
    python -m bench.decode                              # decode tokens/s against transformers' generate

How it works: the prompts, left-padded to a common length (the padding masked out), go through the
model once to fill the KV cache ("prefill"); then each step feeds one token per row and attends to
the cached keys and values instead of recomputing the prefix ("decode"). Three small functions do
this for every strategy: prefill (prompt -> cache, next logits), decode_step (one token per row ->
next logits) and sample_next (logits -> next token); decoding.py's beam search and speculative decoding
are built on them too. The next token comes from the last position's logits, transformed in this order
(transformers' generate uses the same):

    logit bias -> penalties -> no-repeat n-grams -> banned tokens -> min_new_tokens
    -> temperature -> top-k -> top-p -> min-p -> typical-p -> sample (argmax when temperature == 0)

- logit bias: a fixed number added to chosen tokens' logits; banned tokens get -inf.
- repetition penalty (Keskar et al. 2019, CTRL): a seen token's logit l becomes l / r if l > 0 else l * r.
- frequency / presence penalties (the OpenAI API's): l - frequency * count - presence * [count > 0].
- temperature: sample from softmax(l / T); T = 0 is greedy decoding.
- top-k (Fan et al. 2018): keep the k most probable tokens.
- top-p, nucleus (Holtzman et al. 2020): keep the fewest most probable tokens whose mass reaches p.
- min-p (Nguyen et al. 2024): keep tokens whose probability is at least min_p times the top one's.
- typical-p (Meister et al. 2023): keep the tokens whose -log p is closest to the entropy, up to mass p.
  The four filters keep at least min_tokens_to_keep tokens.
- no_repeat_ngram_size n: a token that would complete an n-gram already in the sequence gets -inf.
- min_new_tokens: the stop tokens get -inf until that many tokens are out.

Streaming decodes token bytes with an incremental UTF-8 decoder, so a character split across tokens
(Chinese, emoji) is printed whole once its last byte arrives, never as a replacement character.
"""
import argparse
import codecs
import math
import sys
import time
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from chat import END_OF_TEXT, IM_END, IM_START, prompt_ids
from common import check_tokenizer, load_model, load_tokenizer, resolve_device
from model import Transformer
from quant_linear import int4_decode_layers

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


def top_k_filter(logits, k: int, min_tokens_to_keep: int = 1):
    """Keep each row's k largest logits, and any tied with the k-th (no arbitrary choice among equals)."""
    k = max(k, min_tokens_to_keep)
    if k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]   # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits, p: float, min_tokens_to_keep: int = 1):
    """Nucleus: keep token i iff the probability mass of the tokens strictly more probable than i is < p.

    That is the smallest set of most probable tokens whose mass reaches p (and at least
    min_tokens_to_keep). The most probable token is always kept (no mass lies above it), and tokens of
    equal probability are kept or dropped together.
    """
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values                      # (B, V)
    mass_before = torch.cat([torch.zeros_like(sorted_probs[..., :1]), sorted_probs.cumsum(-1)[..., :-1]], -1)
    n_keep = (mass_before < p).sum(-1, keepdim=True).clamp(min=min_tokens_to_keep)  # >= 1: mass_before[0] = 0
    smallest_kept = sorted_probs.gather(-1, n_keep - 1)                            # (B, 1)
    return logits.masked_fill(probs < smallest_kept, float("-inf"))


def min_p_filter(logits, min_p: float, min_tokens_to_keep: int = 1):
    """Keep tokens with probability >= min_p * max probability, i.e. logit >= max logit + ln(min_p)
    (and the min_tokens_to_keep most probable ones)."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(-1, keepdim=True).values + math.log(min_p)
    if min_tokens_to_keep > 1:
        kth_largest = torch.topk(logits, min(min_tokens_to_keep, logits.size(-1)), dim=-1).values[..., -1:]
        threshold = torch.minimum(threshold, kth_largest)
    return logits.masked_fill(logits < threshold, float("-inf"))


def typical_filter(logits, mass: float, min_tokens_to_keep: int = 1):
    """Locally typical sampling (Meister et al. 2023): keep the tokens whose information -log p_i is
    closest to the distribution's entropy H, the fewest whose probability mass reaches `mass` (and at
    least min_tokens_to_keep)."""
    if mass >= 1.0:
        return logits
    logprobs = logits.log_softmax(-1)                                              # (B, V)
    entropy = -(logprobs.exp() * logprobs).nansum(-1, keepdim=True)                # (B, 1); 0 log 0 = 0
    surprise_gap = (-logprobs - entropy).abs()                                     # (B, V)
    sorted_gap, order = surprise_gap.sort(dim=-1)                                  # most typical first
    mass_up_to = logprobs.exp().gather(-1, order).cumsum(-1)
    last = (mass_up_to < mass).sum(-1, keepdim=True).clamp(max=logits.size(-1) - 1)   # the token reaching mass
    last = last.clamp(min=min_tokens_to_keep - 1)
    return logits.masked_fill(surprise_gap > sorted_gap.gather(-1, last), float("-inf"))


def no_repeat_ngram_mask(history, n: int, vocab_size: int, device=None) -> torch.Tensor:
    """(B, V) bool: the tokens that would complete an n-gram already present in each row's history
    (a list of token lists, prompt included), as in fairseq and transformers' no_repeat_ngram_size."""
    banned = torch.zeros(len(history), vocab_size, dtype=torch.bool, device=device)
    for row, tokens in enumerate(history):
        if len(tokens) + 1 < n:
            continue
        prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
        for start in range(len(tokens) - n + 1):
            if tuple(tokens[start:start + n - 1]) == prefix:
                banned[row, tokens[start + n - 1]] = True
    return banned


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
    typical_p: float | None = None
    min_tokens_to_keep: int = 1         # top-k, top-p, min-p and typical-p never keep fewer
    no_repeat_ngram_size: int = 0       # n > 0: never repeat an n-gram of the prompt or output
    logit_bias: dict | None = None      # {token id: added to its logit}, before everything else
    banned_tokens: tuple = ()           # token ids never generated
    min_new_tokens: int = 0             # the stop tokens are banned until this many tokens are out

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.typical_p is not None and not 0.0 < self.typical_p <= 1.0:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("min_tokens_to_keep",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("no_repeat_ngram_size", "min_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def check_vocab(self, vocab_size: int) -> None:
        """The token ids the options name must be the model's."""
        for name, ids in (("logit_bias", self.logit_bias or ()), ("banned_tokens", self.banned_tokens)):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"{name}: token {bad[0]} is not in the model's vocabulary (ids 0..{vocab_size - 1})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def needs_history(self) -> bool:
        """Whether the logits' processing depends on the tokens so far (not only on the logits)."""
        return self.has_penalties or self.no_repeat_ngram_size > 0 or self.min_new_tokens > 0

    def bias(self, logits):
        """The logit bias and the banned tokens: the processing that needs no history."""
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), device=logits.device)
            values = torch.tensor(list(self.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.index_add(-1, ids, values.expand(*logits.shape[:-1], -1))
        if self.banned_tokens:
            logits = logits.index_fill(-1, torch.tensor(list(self.banned_tokens), device=logits.device),
                                       float("-inf"))
        return logits

    def filter(self, logits):
        """Temperature, top-k, top-p, min-p, typical-p on fp32 logits (B, V) (the history-dependent
        processing comes before, in DecodeState.process)."""
        logits = logits / self.temperature
        keep = self.min_tokens_to_keep
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k, keep)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p, keep)
        if self.min_p is not None:
            logits = min_p_filter(logits, self.min_p, keep)
        if self.typical_p is not None:
            logits = typical_filter(logits, self.typical_p, keep)
        return logits

    def probs(self, logits):
        """The distribution the next token is drawn from, (B, V): one-hot on the argmax when greedy.
        Only the processing without history (bias, then filters): see DecodeState for the rest."""
        logits = self.bias(logits.float())
        if self.greedy:
            return F.one_hot(logits.argmax(-1), logits.size(-1)).to(torch.float32)
        return self.filter(logits).softmax(-1)

    def choose(self, logits, generator=None):
        """Next token ids (B,) from logits (B, V) already through DecodeState.process."""
        if self.greedy:
            return logits.argmax(-1)
        return sample_from(self.filter(logits.float()).softmax(-1), generator)


class DecodeState:
    """What the history-dependent processing knows of each row: which tokens were seen, how often each was
    generated, the whole sequence (for no_repeat_ngram_size) and how many tokens came out.

    Order, as transformers' generate: logit bias -> repetition / frequency / presence penalties ->
    no-repeat n-grams -> banned tokens -> min_new_tokens (stop tokens banned) -> then SamplingParams.filter.
    """

    def __init__(self, params: SamplingParams, prompts: list[list[int]], vocab_size: int, stop_tokens=(),
                 device=None):
        self.params, self.vocab_size, self.device = params, vocab_size, device
        self.stop_tokens = sorted(set(stop_tokens))
        self.n_new = 0
        B = len(prompts)
        self.history = [list(p) for p in prompts] if params.no_repeat_ngram_size else None
        if params.has_penalties:
            self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
            for row, p in enumerate(prompts):
                self.seen[row, list(p)] = True
            self.counts = torch.zeros(B, vocab_size, device=device)

    def process(self, logits):
        """fp32 logits (B, V) -> logits with every history-dependent rule applied."""
        p = self.params
        logits = p.bias(logits.float())
        if p.has_penalties:
            logits = apply_penalties(logits, self.seen, self.counts, p.repetition_penalty, p.frequency_penalty,
                                     p.presence_penalty)
        if p.no_repeat_ngram_size:
            banned = no_repeat_ngram_mask(self.history, p.no_repeat_ngram_size, logits.size(-1), logits.device)
            logits = logits.masked_fill(banned, float("-inf"))
        if self.n_new < p.min_new_tokens and self.stop_tokens:
            logits = logits.index_fill(-1, torch.tensor(self.stop_tokens, device=logits.device), float("-inf"))
        return logits

    def update(self, next_ids):
        """Record the chosen tokens (B,) (rows already done too: their output is discarded)."""
        self.n_new += 1
        if self.params.has_penalties:
            self.counts.scatter_add_(1, next_ids[:, None], torch.ones_like(self.counts[:, :1]))
            self.seen.scatter_(1, next_ids[:, None], True)
        if self.history is not None:
            for row, token in enumerate(next_ids.tolist()):
                self.history[row].append(token)


def sample_next(logits, params: SamplingParams, state: DecodeState | None = None, generator=None):
    """The next token of each row, (B,), from the model's logits (B, V): the history-dependent processing
    (when state is given), the filters, then argmax or a draw; state then records the choice."""
    logits = state.process(logits) if state is not None else params.bias(logits.float())
    next_ids = params.choose(logits, generator)
    if state is not None:
        state.update(next_ids)
    return next_ids


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
    oneDNN, whose one-row matmuls lose to MKL's; python -m bench.decode measures it.)
    """
    if model not in _compiled_models:
        _compiled_models[model] = torch.compile(model, dynamic=True, options={"cpp_wrapper": True})
    return _compiled_models[model]


def prefill(model: Transformer, ids: torch.Tensor, cache, start_pos: int = 0) -> torch.Tensor:
    """Feed ids (B, T) from position start_pos, writing their keys and values into cache; return the
    logits (B, V) at the last position, those of the next token."""
    return model(ids, start_pos=start_pos, kv_cache=cache)[0][:, -1]


def decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int, cache) -> torch.Tensor:
    """One token per row, tokens (B,), at position start_pos on the cache; return the next logits (B, V)."""
    return model(tokens[:, None], start_pos=start_pos, kv_cache=cache)[0][:, -1]


def check_prompt_length(T: int, max_seq_len: int) -> None:
    if T >= max_seq_len:
        raise ValueError(f"prompt of {T} tokens leaves no room to generate in the model's context of "
                         f"{max_seq_len} tokens (shorten it, or truncate it from the left)")


@torch.inference_mode()
def generate(model: Transformer, prompts, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             typical_p: float | None = None, min_tokens_to_keep: int = 1, no_repeat_ngram_size: int = 0,
             logit_bias: dict | None = None, banned_tokens=(), min_new_tokens: int = 0,
             seed: int | None = None, stop_tokens=(), stop_strings=(), tokenizer=None, on_text=None,
             use_cache: bool = True, compile: bool = False) -> list[torch.Tensor]:
    """Continue each prompt by up to max_new_tokens tokens; return each row's new tokens (1-D, on the CPU).

    prompts: see left_pad (rows may differ in length). A row stops at a token in stop_tokens (not
    included in its output), or after the token that completes one of stop_strings (kept), or when
    the model's context is full. tokenizer (anything with decode_bytes(ids) -> bytes) is needed for
    stop_strings and on_text: on_text(row, text) receives each row's text as soon as it is final.
    The sampling options are SamplingParams' fields. seed makes sampling reproducible.
    use_cache=False recomputes the whole sequence at every step (the reference the cache is tested and
    benchmarked against); compile=True decodes with `compiled(model)`.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty,
                            typical_p, min_tokens_to_keep, no_repeat_ngram_size, logit_bias, tuple(banned_tokens),
                            min_new_tokens)
    params.check_vocab(model.config.vocab_size)
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
    state = None
    if params.needs_history:
        starts = pad_lens.tolist() if pad_lens is not None else [0] * B
        state = DecodeState(params, [ids[b, starts[b]:].tolist() for b in range(B)], model.config.vocab_size,
                            stop_tokens, device)

    out = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    lengths = [max_new_tokens] * B                        # where each row's output ends
    done = torch.zeros(B, dtype=torch.bool, device=device)

    def full_forward(seq):  # no cache: the whole sequence every step (a fresh cache only to mask the padding)
        cache = model.new_kv_cache(B, seq.size(1), pad_lens) if pad_lens is not None else None
        return prefill(model, seq, cache)

    step = compiled(model) if compile else model
    cache = model.new_kv_cache(B, T + max_new_tokens, pad_lens) if use_cache else None
    logits = prefill(model, ids, cache) if use_cache else full_forward(ids)             # (B, V)
    for i in range(max_new_tokens):
        next_ids = sample_next(logits, params, state, generator)                       # (B,)
        out[:, i] = next_ids
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
            logits = decode_step(step, next_ids, T + i, cache)
        else:
            logits = full_forward(torch.cat([ids, out[:, :i + 1]], dim=1))
    if streams is not None:
        for b, stream in enumerate(streams):
            text = stream.finish()
            if text and on_text:
                on_text(b, text)
    return [out[b, :lengths[b]].cpu() for b in range(B)]


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
    parser.add_argument("--typical-p", type=float, help="locally typical sampling: keep the most typical tokens up to "
                                                        "mass p, in (0, 1]")
    parser.add_argument("--min-tokens-to-keep", type=int, default=1,
                        help="top-k, top-p, min-p and typical-p keep at least this many tokens (default: 1)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="never generate an n-gram already in the prompt or output (default: 0 = off)")
    parser.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                        help="add BIAS to token ID's logit, repeatable (-100 all but bans it)")
    parser.add_argument("--banned-token", action="append", type=int, default=[], metavar="ID",
                        help="never generate token ID, repeatable")
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="no end of text before this many new tokens (default: 0)")
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
    parser.add_argument("--weights", choices=("float", "int4"), default="float",
                        help="int4 (CPU only): decode with every block's linear layers in 4 bits, groups of 32 on "
                             "llama.cpp's Q4_1 grid (a Q4_1 .gguf keeps its own codes, a quant.py 4-bit checkpoint "
                             "its own), through torch's int4 kernel: ~3x fewer bytes per token (default: float)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (greedy / sample)")
    parser.add_argument("--interactive", action="store_true",
                        help="chat (ChatML) with an SFT checkpoint: /reset, /system TEXT, /quit")
    parser.add_argument("--system", help="--interactive: the system prompt")
    return parser


def check_args(parser, args):
    """Every argument problem found before anything is loaded, as one clear message."""
    try:
        sampling_params(args)
    except ValueError as e:
        parser.error(str(e))
    for name in ("max_new_tokens", "num_samples", "beam_width", "n_draft"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.ckpt:
        parser.error("--ckpt is required (a checkpoint directory)")
    if args.strategy == "speculative" and not args.draft_ckpt:
        parser.error("--strategy speculative needs --draft-ckpt (a small model with the same tokenizer)")
    params = sampling_params(args)
    if args.strategy == "speculative" and params.needs_history:
        parser.error("--strategy speculative takes no penalties, --no-repeat-ngram-size or --min-new-tokens "
                     "(they change p per drafted token)")
    if args.strategy == "beam" and (params.needs_history or params.logit_bias or params.banned_tokens):
        parser.error("--strategy beam ranks by the model's own log-probabilities: it takes no penalties, "
                     "--no-repeat-ngram-size, --min-new-tokens, --logit-bias or --banned-token")
    if args.strategy == "beam" and args.num_samples > args.beam_width:
        parser.error(f"--num-samples {args.num_samples} exceeds --beam-width {args.beam_width}")


def parse_logit_bias(pairs) -> dict:
    """["42=-5", "7=2.5"] (the --logit-bias flags) -> {42: -5.0, 7: 2.5}."""
    bias = {}
    for pair in pairs:
        token, sep, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias {pair!r}: expected ID=BIAS, e.g. 42=-5") from None
    return bias


def sampling_params(args) -> SamplingParams:
    return SamplingParams(0.0 if args.strategy == "greedy" else args.temperature, args.top_k, args.top_p, args.min_p,
                          args.repetition_penalty, args.frequency_penalty, args.presence_penalty, args.typical_p,
                          args.min_tokens_to_keep, args.no_repeat_ngram_size, parse_logit_bias(args.logit_bias),
                          tuple(args.banned_token), args.min_new_tokens)


def respond(args, model, draft, tokenizer, ids, stop_tokens, on_text=None):
    """Run the chosen strategy on one prompt; returns (texts, each text's token count, extra report)."""
    from decoding import beam_search, speculative_generate  # (decoding.py is built on this module's functions)
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
        return outputs, [t.numel() for t, _ in beams], "scores " + ", ".join(f"{s:.3f}" for _, s in beams)
    if args.strategy == "speculative":
        counts, stats = [], {"drafted": 0, "accepted": 0}
        p = sampling_params(args)
        for row in range(n):
            tokens, run = speculative_generate(
                model, draft, ids, args.max_new_tokens, args.n_draft, temperature=p.temperature, top_k=p.top_k,
                top_p=p.top_p, min_p=p.min_p, typical_p=p.typical_p, min_tokens_to_keep=p.min_tokens_to_keep,
                logit_bias=p.logit_bias, banned_tokens=p.banned_tokens,
                seed=None if args.seed is None else args.seed + row, stop_tokens=stop_tokens,
                stop_strings=args.stop, tokenizer=tokenizer, on_text=lambda _, text, row=row: collect(row, text))
            counts.append(tokens.numel())
            stats = {key: stats[key] + run[key] for key in stats}
        return ["".join(t) for t in texts], counts, f"acceptance {stats['accepted'] / max(stats['drafted'], 1):.2f}"
    p = sampling_params(args)
    outs = generate(model, [ids] * n, args.max_new_tokens, **asdict(p), seed=args.seed, stop_tokens=stop_tokens,
                    stop_strings=args.stop, tokenizer=tokenizer, on_text=collect, compile=args.compile)
    return ["".join(t) for t in texts], [o.numel() for o in outs], ""


def context_note(prompt_len: int, counts, context: int, max_new_tokens: int) -> str:
    """A line saying that a generation was cut short by the model's context, or '' if none was."""
    room = context - prompt_len
    cut = sum(n >= room for n in counts) if max_new_tokens > room else 0
    if not cut:
        return ""
    which = "the generation" if len(counts) == 1 else f"{cut} of {len(counts)} generations"
    return (f"[{which} stopped at the model's context of {context} tokens ({prompt_len} prompt + {room} new), "
            f"before --max-new-tokens {max_new_tokens}]")


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
    texts, counts, extra = respond(args, model, draft, tokenizer, ids, [eot] if eot is not None else [],
                                   (lambda _, text: print(text, end="", flush=True)) if streaming else None)
    elapsed = time.perf_counter() - started
    n_tokens = sum(counts)
    if streaming:
        print(flush=True)
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} of {len(texts)} ---\n{args.prompt}{text}")
    notes = [extra] * bool(extra) + ["the first run includes compiling"] * args.compile
    print(f"[{n_tokens} tokens in {elapsed:.2f} s: {n_tokens / elapsed:.1f} tokens/s{''.join('; ' + n for n in notes)}]",
          file=sys.stderr)
    note = context_note(len(ids), counts, context, args.max_new_tokens)
    if note:
        print(note, file=sys.stderr)


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
        texts, counts, extra = respond(args, model, draft, tokenizer, ids, stop_tokens,
                                       None if args.strategy == "beam" else lambda _, text: print(text, end="", flush=True))
        elapsed = time.perf_counter() - started
        n_tokens = counts[0]
        print(texts[0] if args.strategy == "beam" else "", flush=True)
        history.append({"role": "assistant", "content": texts[0]})
        print(f"[{n_tokens} tokens, {n_tokens / elapsed:.1f} tokens/s{'; ' + extra if extra else ''}]", file=sys.stderr)
        note = context_note(len(ids), counts[:1], context, args.max_new_tokens)
        if note:
            print(note, file=sys.stderr)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        device = resolve_device(args.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}[args.dtype]
        model = load_model(args.ckpt, device, dtype)
        draft = load_model(args.draft_ckpt, device, dtype) if args.strategy == "speculative" else None
        if device == "cpu" and args.weights == "int4":
            for m in filter(None, (model, draft)):
                int4_decode_layers(m)
        elif args.weights == "int4":
            raise ValueError(f"--weights int4 runs on the CPU only (torch's CPU int4 kernel), not on {device}")
        tokenizer = load_tokenizer(args.ckpt, args.tokenizer)
        for path in filter(None, (args.ckpt, draft and args.draft_ckpt)):
            check_tokenizer(path, tokenizer, args.tokenizer)
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
