"""Knowledge distillation: a small student learns from a bigger teacher that shares its tokenizer.

    python distill.py --preset cpu-shakespeare-student --teacher out/teacher --data data/shakespeare --out-dir out/kd
    python distill.py cache --teacher out/teacher --data data/shakespeare --top-k 32 --samples 32 --out-dir cache/kd
    python distill.py --preset cpu-shakespeare-student --teacher-cache cache/kd --data data/shakespeare --out-dir out/kd2
    python distill.py generate --teacher out/teacher-sft --prompts prompts.jsonl --out teacher.jsonl  # black-box

White-box, the student q matches the teacher's next-token distributions p, both softened by temperature T:

    loss = alpha * T^2 * D(p_T, q_T) + (1 - alpha) * CE(hard labels)       (Hinton et al. 2015)

D is --loss: forward_kl KL(p||q) (mean seeking, Hinton's KD), reverse_kl KL(q||p) (mode seeking, MiniLLM,
Gu et al. 2024), or jsd, GKD's generalised Jensen-Shannon beta KL(p||m) + (1 - beta) KL(q||m) with
m = beta p + (1 - beta) q (Agarwal et al. 2024). T^2 keeps the soft term's gradient on the hard term's
scale as T changes; --alpha 0 is the hard-label baseline. The teacher runs live under no_grad, or is
read from a cache written once: its top-k log-probs per position plus the tail, either as one "rest"
bucket (an exact divergence between the two distributions coarsened alike) or as tokens sampled from the
tail (an unbiased estimate of the forward KL and its gradient, random-sampling KD, Anshumann et al. 2025).
Data: a data/prepare.py directory, or chat files where only the assistant's tokens count, as in sft.py.
Black-box: the teacher answers prompts and the student is fine-tuned on the answers with sft.py.
The loop, schedule and checkpoints are training.py's; outputs in --out-dir as train.py's.
"""
import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from bpe import Tokenizer
from chat import (ChatDataError, chat_token_ids, IM_END, PAD, load_chat_files, pad_batch, prompt_ids, read_records,
                  record_to_messages, split_think, tokenize_conversations)
from common import (UsageError, atomic_write, check_trainable, exit_on_error, load_model, load_tokenizer,
                    resolve_device, tokenizer_file)
from evaluate import check_same_tokenizer, evaluate, held_out_loss, token_byte_lengths
from model import Transformer
from sample import generate
from training import (TRAIN_PRESETS, BatchSampler, ExampleSampler, RunDir, TrainConfig, TrainingError,
                      check_finite, format_seconds, load_split, main_of, make_optimizer, mixed_precision, new_model, opt,
                      read_meta, rng_state, seed_everything, set_lr)

LOSSES = ("forward_kl", "reverse_kl", "jsd")
REST_LOGP = -1e4  # "log 0" that stays finite: exp() of it is 0 in float32, and no inf - inf makes a NaN


class DistillError(TrainingError):
    """Bad input to distillation (mismatched tokenizers, a stale cache): reported without a traceback."""


# ----------------------------------------------------------------------------------------------------------
# The divergences

def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """(...,) divergence between two distributions given as log-probs over the same n outcomes (..., n).

    Terms with zero probability contribute 0 (log-probs must be finite: use REST_LOGP for 'log 0')."""
    p, q = teacher_logp.exp(), student_logp.exp()
    if kind == "forward_kl":
        return (p * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse_kl":
        return (q * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        mix_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1 - beta))
        return beta * (p * (teacher_logp - mix_logp)).sum(-1) + (1 - beta) * (q * (student_logp - mix_logp)).sum(-1)
    raise ValueError(f"unknown loss {kind!r} (one of {', '.join(LOSSES)})")


class CachedTeacher(NamedTuple):
    """The teacher at one temperature as a cache holds it, per position (...): its k most likely tokens
    (log-probs (..., k), ids (..., k)), the log of the mass outside them (...), and, in a sampled cache,
    n tokens drawn from that tail (ids (..., n)) with the tail's sum of p log p (...)."""
    top_logp: torch.Tensor
    top_ids: torch.Tensor
    rest_logp: torch.Tensor
    tail_ids: torch.Tensor | None = None
    tail_plogp: torch.Tensor | None = None


def teacher_targets(logits: torch.Tensor, k: int, temperature: float, samples: int = 0, generator=None) -> CachedTeacher:
    """The teacher side of the cache from its logits (..., V), in float32: the top k at T and, with samples > 0,
    that many draws (with replacement) from the rest of p_T renormalised."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    top_logp, top_ids = logp.topk(k, dim=-1)
    rest_logp = rest_log_prob(logp, top_ids)
    if not samples:
        return CachedTeacher(top_logp, top_ids, rest_logp)
    tail_p = logp.exp().scatter(-1, top_ids, 0.0)
    tail_plogp = (tail_p * logp).sum(-1)
    flat = tail_p.flatten(0, -2)
    # where the top k hold all the mass, any draw does: its weight, the rest mass, is 0
    flat = torch.where(flat.sum(-1, keepdim=True) > 0, flat, torch.ones_like(flat))
    tail_ids = torch.multinomial(flat, samples, replacement=True, generator=generator).view(*logp.shape[:-1], samples)
    return CachedTeacher(top_logp, top_ids, rest_logp, tail_ids, tail_plogp)


def rest_log_prob(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the mass outside `ids` (..., k) of the distribution logp (..., V): the other entries' logsumexp
    (finite, about REST_LOGP, when ids covers the vocabulary)."""
    return logp.scatter(-1, ids, REST_LOGP).logsumexp(-1).clamp(min=REST_LOGP)


def sampled_forward_kl(teacher: CachedTeacher, student_logp: torch.Tensor) -> torch.Tensor:
    """(...,) KL(p||q) with the top k exact and the tail estimated from the cached draws s_1..s_n ~ p(.|tail):

        KL = sum_top p_i (log p_i - log q_i) + sum_tail p_i log p_i - P(tail) * E_s[log q_s]
           ~ ...                                                     - P(tail) / n * sum_j log q_{s_j}

    unbiased in value and in gradient, which is the full KL's gradient in expectation (Anshumann et al. 2025)."""
    top_logp = teacher.top_logp.float()
    top = (top_logp.exp() * (top_logp - student_logp.gather(-1, teacher.top_ids))).sum(-1)
    tail_cross_entropy = -student_logp.gather(-1, teacher.tail_ids).mean(-1)
    return top + teacher.tail_plogp.float() + teacher.rest_logp.float().exp() * tail_cross_entropy


def kd_loss(student_logits, teacher, kind: str, temperature: float, beta: float, mask=None) -> torch.Tensor:
    """T^2 * mean over positions (weighted by mask (B, T)) of D(teacher_T, student_T).

    teacher: full logits (B, T, V), or a CachedTeacher (B, T, ...) at the same temperature."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, torch.Tensor):
        per_position = divergence(F.log_softmax(teacher.float() / temperature, dim=-1), student_logp, kind, beta)
    elif teacher.tail_ids is not None:
        if kind != "forward_kl":
            raise ValueError(f"a sampled cache estimates forward_kl only, not {kind} (its tail is draws, not log-probs)")
        per_position = sampled_forward_kl(teacher, student_logp)
    else:  # k tokens + one rest bucket, for both distributions
        teacher_logp = torch.cat([teacher.top_logp.float(), teacher.rest_logp.float()[..., None]], dim=-1)
        student_logp = torch.cat([student_logp.gather(-1, teacher.top_ids),
                                  rest_log_prob(student_logp, teacher.top_ids)[..., None]], -1)
        per_position = divergence(teacher_logp, student_logp, kind, beta)
    if mask is None:
        return temperature ** 2 * per_position.mean()
    return temperature ** 2 * (per_position * mask).sum() / mask.sum().clamp(min=1)


def hard_loss(student_logits, targets, mask=None) -> torch.Tensor:
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    if mask is None:
        return ce.mean()
    return (ce * mask.flatten()).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers and data

def is_shard_dir(data: str) -> bool:
    return Path(data).is_dir()


def aligned_windows(data: np.ndarray, seq_len: int) -> int:
    """How many non-overlapping windows of seq_len inputs (+1 target) the token stream holds."""
    return (len(data) - 1) // seq_len


class AlignedSampler(BatchSampler):
    """train.py's sampler over the non-overlapping windows a cache holds; also returns the window indices."""

    def next_batch(self):
        rows = torch.randint(aligned_windows(self.data, self.seq_len), (self.batch_size,), generator=self.generator)
        starts = (rows * self.seq_len).tolist()
        windows = torch.from_numpy(np.stack([self.data[s:s + self.seq_len + 1] for s in starts]).astype(np.int64))
        return windows[:, :-1], windows[:, 1:], rows


def fingerprint(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def chat_examples(config, tokenizer, paths: str):
    """Tokenized chat examples of at most seq_len + 1 tokens (the same list the cache indexes)."""
    conversations = load_chat_files(paths, {}, False)
    examples, stats = tokenize_conversations(tokenizer, conversations, config.seq_len + 1, config.truncate,
                                             config.think_weight)
    if stats["truncated"] or stats["dropped"]:
        print(f"chat data: {stats['truncated']} examples truncated, {stats['dropped']} dropped (over {config.seq_len + 1} tokens)")
    if not examples:
        raise DistillError(f"{paths}: no chat example fits in seq_len + 1 = {config.seq_len + 1} tokens")
    return examples


# ----------------------------------------------------------------------------------------------------------
# The top-k cache: one teacher pass over every input position of the data

CACHE_META = "cache.json"


def cache_items(data: str, seq_len: int, tokenizer, config=None):
    """The sequences a cache covers: shards -> aligned windows (seq_len + 1 tokens), chat -> examples."""
    if is_shard_dir(data):
        meta = read_meta(Path(data))
        tokens = load_split(Path(data), "train", meta)
        n = aligned_windows(tokens, seq_len)
        return [np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64) for i in range(n)], \
            fingerprint(np.asarray(tokens[:n * seq_len + 1]))
    examples = chat_examples(config, tokenizer, data)
    return [np.asarray(ids, dtype=np.int64) for ids, _ in examples], fingerprint(*[np.asarray(i) for i, _ in examples])


def build_cache(teacher_path: str, data: str, out: str, seq_len: int, k: int, temperature: float, batch_size: int = 32,
                device: str = "auto", config=None, samples: int = 0, seed: int = 0) -> dict:
    """Run the teacher once over the data and write the cache to `out`, one .npy per CachedTeacher field
    (position-major), plus offsets.npy (where each sequence starts); cache.json is written last."""
    device = resolve_device(device)
    teacher = load_model(teacher_path, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None)
    tokenizer = load_tokenizer(teacher_path)
    if is_shard_dir(data):
        meta = read_meta(Path(data))
        check_same_tokenizer(tokenizer, Tokenizer.load(Path(data) / meta["tokenizer"]), teacher_path, data)
    config = config or DistillConfig(seq_len=seq_len)
    items, data_hash = cache_items(data, seq_len, tokenizer, config)
    vocab = teacher.config.vocab_size
    if not 0 <= k <= vocab or samples < 0 or k + samples == 0:
        raise UsageError(f"--top-k {k} --samples {samples}: need 0 <= top-k <= the vocabulary size {vocab}, "
                         f"samples >= 0, and one of them > 0")
    if max(map(len, items)) - 1 > teacher.config.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the teacher's context of {teacher.config.max_seq_len} tokens")
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) - 1 for ids in items])
    n_positions = int(offsets[-1])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CACHE_META).unlink(missing_ok=True)  # incomplete until rewritten at the end
    id_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    fields = CachedTeacher._fields if samples else CachedTeacher._fields[:3]
    for stale in set(CachedTeacher._fields) - set(fields):
        (out_dir / f"{stale}.npy").unlink(missing_ok=True)
    formats = {"top_logp": (np.float16, (k,)), "top_ids": (id_dtype, (k,)), "rest_logp": (np.float32, ()),
               "tail_ids": (id_dtype, (samples,)), "tail_plogp": (np.float32, ())}
    arrays = {name: np.lib.format.open_memmap(out_dir / f"{name}.npy", "w+", formats[name][0],
                                              (n_positions, *formats[name][1])) for name in fields}
    generator = torch.Generator(device).manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    t0 = time.time()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            inputs = torch.zeros((len(batch), max(map(len, batch)) - 1), dtype=torch.long)
            for row, ids in enumerate(batch):
                inputs[row, :len(ids) - 1] = torch.from_numpy(ids[:-1])
            with autocast:
                logits, _ = teacher(inputs.to(device))
            targets = teacher_targets(logits, k, temperature, samples, generator)
            for name, array in arrays.items():
                values = getattr(targets, name).cpu().numpy()
                for row in range(len(batch)):
                    a, b = offsets[start + row], offsets[start + row + 1]
                    array[a:b] = values[row, :b - a]
            done = min(start + batch_size, len(items))
            if done == len(items) or (start // batch_size) % 20 == 0:
                rate = offsets[done] / max(time.time() - t0, 1e-9)
                print(f"cache: {done:,}/{len(items):,} sequences | {rate:,.0f} tok/s | "
                      f"ETA {format_seconds((n_positions - offsets[done]) / max(rate, 1e-9))}", flush=True)
    for array in arrays.values():
        array.flush()
    np.save(out_dir / "offsets.npy", offsets)
    tok_src = tokenizer_file(teacher_path)
    for f in tok_src.parent.glob(tok_src.stem + "*"):
        shutil.copy(f, out_dir / f.name)
    meta = {"teacher": str(teacher_path), "data": str(data), "data_fingerprint": data_hash, "kind":
            "shards" if is_shard_dir(data) else "chat", "seq_len": seq_len, "top_k": k, "samples": samples,
            "seed": seed, "temperature": temperature,
            "vocab_size": vocab, "positions": n_positions, "sequences": len(items), "tokenizer": tok_src.name,
            "seconds": time.time() - t0, "bytes": sum(f.stat().st_size for f in out_dir.glob("*.npy"))}
    atomic_write(out_dir / CACHE_META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    print(f"cache: {n_positions:,} positions x top-{k}" + (f" + {samples} tail samples" if samples else "")
          + f" in {format_seconds(meta['seconds'])}, {meta['bytes'] / 2**20:.1f} MiB in {out_dir}")
    return meta


class TopKCache:
    """A cache written by build_cache, read by sequence index (memory-mapped)."""

    def __init__(self, path: str):
        self.dir = Path(path)
        meta_path = self.dir / CACHE_META
        if not meta_path.exists():
            raise DistillError(f"{meta_path} not found: not a finished cache (write one with `distill.py cache`)")
        self.meta = json.loads(meta_path.read_text())
        fields = CachedTeacher._fields if self.meta.get("samples") else CachedTeacher._fields[:3]
        self.arrays = {name: np.load(self.dir / f"{name}.npy", mmap_mode="r") for name in fields}
        self.offsets = np.load(self.dir / "offsets.npy")
        self.tokenizer = load_tokenizer(self.dir, self.dir / self.meta["tokenizer"])

    def batch(self, items, T: int, device) -> CachedTeacher:
        """The cached teacher (B, T, ...) of sequences `items`, right-padded to T (padding: ids 0, log-probs 0,
        rest mass 0; masked out by the caller)."""
        fields = {}
        for name, array in self.arrays.items():
            padded = np.full((len(items), T, *array.shape[1:]), REST_LOGP if name == "rest_logp" else 0,
                             np.int64 if name.endswith("ids") else np.float32)
            for row, i in enumerate(items):
                a, b = self.offsets[i], self.offsets[i + 1]
                padded[row, :b - a] = array[a:b]
            fields[name] = torch.from_numpy(padded).to(device)
        return CachedTeacher(**fields)

    def check(self, config, data_hash: str) -> None:
        where = f"--teacher-cache {self.dir}"
        if abs(self.meta["temperature"] - config.temperature) > 1e-9:
            raise UsageError(f"{where} holds the teacher at temperature {self.meta['temperature']}, but "
                             f"--temperature is {config.temperature}: use that, or rebuild the cache")
        if self.meta["kind"] == "shards" and self.meta["seq_len"] != config.seq_len:
            raise UsageError(f"{where} holds windows of {self.meta['seq_len']} tokens, but --seq-len is {config.seq_len}")
        if self.meta.get("samples") and config.loss != "forward_kl":
            raise UsageError(f"{where} holds tail samples, which estimate forward_kl only: --loss forward_kl, or a "
                             f"cache built with --samples 0 for {config.loss}")
        if self.meta["data_fingerprint"] != data_hash:
            raise UsageError(f"{where} was built from other data ({self.meta['data']}) than --data {config.data}, or "
                             f"with other --seq-len/--truncate/--think-weight: rebuild it")


# ----------------------------------------------------------------------------------------------------------
# White-box training

@dataclass
class DistillConfig(TrainConfig):
    data: str = opt("", "a data/prepare.py directory (train.bin, val.bin), or chat files (comma-separated .json/.jsonl)")
    out_dir: str = opt("out/distill", "where checkpoints, metrics and the summary go")
    teacher: str = opt("", "teacher checkpoint (nanollm or Hugging Face directory), run live under no_grad")
    teacher_cache: str = opt("", "a top-k cache from `distill.py cache`, used instead of a live teacher")
    init: str = opt("", "start the student from this checkpoint (the model flags are then ignored)")
    keep_layers: str = opt("", "with --init: keep only these of its blocks, comma-separated indices (e.g. 0): a "
                           "student cut from the teacher")
    head_tokens: int = opt(0, "with --init: an output layer over the N most frequent target tokens of --data and "
                           "one 'other' class (a draft's reduced vocabulary); 0: the whole vocabulary")
    loss: str = opt("forward_kl", "divergence between teacher and student distributions", choices=list(LOSSES))
    temperature: float = opt(2.0, "softmax temperature of both distributions in the KD term (scaled by T^2)")
    alpha: float = opt(0.5, "weight of the KD term; 1 - alpha goes to the hard-label CE (0: no teacher)")
    beta: float = opt(0.5, "jsd: the mixture m = beta * teacher + (1 - beta) * student, 0 < beta < 1")
    windows: str = opt("auto", "shards: random offsets (train.py), or the aligned windows a cache holds; auto: "
                       "aligned with --teacher-cache, else random", choices=["auto", "random", "aligned"])
    # chat data
    truncate: str = opt("left", "chat examples over seq_len + 1 tokens: drop the oldest turns ('left') or the "
                        "example ('drop')", choices=["left", "drop"])
    think_weight: float = opt(1.0, "chat: weight of <think>...</think> tokens in both loss terms")
    eval_fraction: float = opt(0.05, "chat: share of the conversations held out for the validation loss")


DISTILL_PRESETS = {
    **TRAIN_PRESETS,
    # the README's student: 2 layers at a quarter of the width of train.py's cpu-shakespeare model (the
    # teacher), for a fixed number of steps (runs are compared at equal steps: the CPU is shared)
    "cpu-shakespeare-student": {**TRAIN_PRESETS["cpu-shakespeare"], "n_layers": 2, "dim": 32, "n_heads": 2,
                                "n_kv_heads": 2, "hidden_dim": 96, "max_steps": 1000, "max_time": 0.0,
                                "eval_interval": 500, "sample_tokens": 0},
}



def build_student(config: DistillConfig, vocab_size: int, device: str) -> Transformer:
    if config.init:
        student = load_model(config.init, device=device).train()
        check_trainable(student, config.init, lora_rank=0, hint="distill into its full-precision checkpoint")
        if student.config.max_seq_len < config.seq_len:
            raise UsageError(f"--init {config.init}: context {student.config.max_seq_len} < --seq-len {config.seq_len}")
        return student
    return new_model(config, vocab_size).to(device)


def cut_student(student: Transformer, keep_layers: list[int], head_tokens: int, token_counts: torch.Tensor) -> Transformer:
    """The student cut from its init: only the blocks keep_layers (all when empty), and with head_tokens an
    output layer over the head_tokens most frequent tokens of token_counts (vocab_size,) plus the "other"
    class of model.ModelConfig.head_tokens, their rows copied from the init's output layer, "other"'s zero.
    DistilBERT (Sanh et al. 2019) starts its student from every other layer of BERT; FR-Spec (Zhao et al.
    2025) restricts a draft to the tokens it mostly has to propose, so its output layer costs n rows, not
    vocab_size. E.g. a 30-block 576-wide teacher with 49,152 tokens cut to block 0 and 4,096 tokens:
    embedding 28.3M + one block 3.5M + output layer 2.4M parameters, 6M multiply-adds a token, not 135M."""
    c = student.config
    keep_layers = keep_layers or list(range(c.n_layers))
    bad = [i for i in keep_layers if not 0 <= i < c.n_layers]
    if bad:
        raise UsageError(f"--keep-layers {bad[0]}: the --init model has blocks 0..{c.n_layers - 1}")
    if not 0 <= head_tokens < c.vocab_size:
        raise UsageError(f"--head-tokens {head_tokens}: must be in [0, {c.vocab_size}) (the vocabulary)")
    config = replace(c, n_layers=len(keep_layers), head_tokens=head_tokens,
                     tie_embeddings=c.tie_embeddings and not head_tokens)
    state = student.state_dict()
    cut = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for new, old in enumerate(keep_layers):
        prefix = f"layers.{old}."
        cut.update({f"layers.{new}.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)})
    if head_tokens:
        seen = int((token_counts > 0).sum())
        if head_tokens > seen:  # the rest would be arbitrary unseen ids
            raise UsageError(f"--head-tokens {head_tokens}: the data has only {seen:,} distinct target tokens")
        head_ids = token_counts.topk(head_tokens).indices.sort().values                  # (head_tokens,)
        head = state["lm_head.weight"]                                                    # (vocab, dim)
        cut["lm_head.weight"] = torch.cat((head[head_ids], head.new_zeros(1, head.size(1))))
        cut["head_ids"] = head_ids.to(head.device)
    model = Transformer(config).to(device=state["embed_tokens.weight"].device, dtype=state["embed_tokens.weight"].dtype)
    model.load_state_dict(cut)
    return model.train()


def target_counts(examples, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) how often each token is a trained target: chat examples count the positions their loss
    mask keeps, shards every token."""
    if isinstance(examples, list):
        ids = [t for ids, mask in examples for t, m in zip(ids[1:], mask[1:]) if m > 0]
        return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size)
    return torch.from_numpy(np.bincount(np.asarray(examples), minlength=vocab_size))


def check_config(config: DistillConfig) -> None:
    if not config.data:
        raise UsageError("--data is required: a data/prepare.py directory or chat files")
    if not is_shard_dir(config.data):
        missing = [p for p in config.data.split(",") if p.strip() and not Path(p.strip()).is_file()]
        if missing:
            raise UsageError(f"--data {missing[0]}: neither a data/prepare.py directory nor a chat file")
    if not 0 <= config.alpha <= 1:
        raise UsageError(f"--alpha {config.alpha}: must be in [0, 1] (the weight of the KD term)")
    if config.temperature <= 0:
        raise UsageError(f"--temperature {config.temperature}: must be > 0")
    if config.loss == "jsd" and not 0 < config.beta < 1:
        raise UsageError(f"--beta {config.beta}: jsd needs 0 < beta < 1")
    if config.teacher and config.teacher_cache:
        raise UsageError("give --teacher (live) or --teacher-cache, not both")
    if (config.keep_layers or config.head_tokens) and not config.init:
        raise UsageError("--keep-layers and --head-tokens cut the --init model: give --init CKPT")
    if config.keep_layers and not all(i.strip().isdigit() for i in config.keep_layers.split(",")):
        raise UsageError(f"--keep-layers {config.keep_layers}: comma-separated block indices, e.g. 0,1")
    if config.alpha > 0 and not (config.teacher or config.teacher_cache):
        raise UsageError("--alpha > 0 needs a teacher: --teacher CKPT or --teacher-cache DIR (--alpha 0: hard labels only)")
    if config.windows == "random" and config.teacher_cache and is_shard_dir(config.data):
        raise UsageError("--teacher-cache holds aligned windows: use --windows aligned (or auto)")


def distill(config: DistillConfig) -> dict:
    check_config(config)
    run = RunDir(config, "train")
    if run.finished:
        return run.finished
    device = resolve_device(config.device)
    dtype, autocast, scaler = mixed_precision(config.dtype, device)
    use_teacher = config.alpha > 0
    seed_everything(config.seed)

    shards = is_shard_dir(config.data)
    if shards:
        data_dir = Path(config.data)
        meta = read_meta(data_dir)
        train_data, val_data = load_split(data_dir, "train", meta), load_split(data_dir, "val", meta)
        tokenizer_path = data_dir / meta["tokenizer"]
        tokenizer = Tokenizer.load(tokenizer_path)
        vocab_size = meta["vocab_size"]
    else:
        source = config.init or config.teacher or config.teacher_cache
        if not source:
            raise UsageError("chat data needs --init (the student), --teacher or --teacher-cache: the tokenizer "
                             "comes from there")
        tokenizer_path = tokenizer_file(source)
        tokenizer = load_tokenizer(source)
        vocab_size = tokenizer.vocab_size
    student = build_student(config, vocab_size, device)

    teacher, cache = None, None
    if use_teacher and config.teacher:
        teacher = load_model(config.teacher, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None)
        teacher.requires_grad_(False)
        check_same_tokenizer(load_tokenizer(config.teacher), tokenizer, config.teacher, str(tokenizer_path))
        if teacher.config.vocab_size != student.config.vocab_size:
            raise DistillError(f"teacher logits have {teacher.config.vocab_size} entries, the student's "
                               f"{student.config.vocab_size}: the same tokenizer but padded differently")
        if teacher.config.max_seq_len < config.seq_len:
            raise UsageError(f"--seq-len {config.seq_len} exceeds the teacher's context of {teacher.config.max_seq_len}")
    elif use_teacher:
        cache = TopKCache(config.teacher_cache)
        check_same_tokenizer(cache.tokenizer, tokenizer, config.teacher_cache, str(tokenizer_path))

    if shards:
        aligned = config.windows == "aligned" or (config.windows == "auto" and cache is not None)
        sampler = (AlignedSampler if aligned else BatchSampler)(train_data, config.seq_len, config.batch_size, config.seed)
        if cache is not None:
            n = aligned_windows(train_data, config.seq_len)
            cache.check(config, fingerprint(np.asarray(train_data[:n * config.seq_len + 1])))
        token_bytes = token_byte_lengths(tokenizer, vocab_size)
    else:
        examples = chat_examples(config, tokenizer, config.data)
        if cache is not None:
            cache.check(config, fingerprint(*[np.asarray(ids) for ids, _ in examples]))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_eval = max(1, int(len(examples) * config.eval_fraction)) if len(examples) > 1 else 0
        eval_examples = [examples[i] for i in order[:n_eval]]
        train_index = order[n_eval:]  # positions in `examples` (what the cache indexes)
        sampler = ExampleSampler(len(train_index), config.batch_size, config.seed)
        pad_id = chat_token_ids(tokenizer)[PAD]
    if config.keep_layers or config.head_tokens:
        trained = train_data if shards else [examples[i] for i in train_index]
        student = cut_student(student, [int(i) for i in config.keep_layers.split(",")] if config.keep_layers else [],
                              config.head_tokens, target_counts(trained, vocab_size))

    def next_batch():
        """(inputs, targets, loss_mask or None, cache rows or None) on the device."""
        if not shards:
            rows = [train_index[i] for i in sampler.next_indices()]
            inputs, targets, mask = pad_batch([examples[r] for r in rows], pad_id, device)
            return inputs, targets, mask, rows
        batch = sampler.next_batch()
        return batch[0].to(device), batch[1].to(device), None, (batch[2].tolist() if len(batch) == 3 else None)

    optimizer = make_optimizer(student, config, device)
    sampler_state = (lambda: sampler.generator.get_state()) if shards else sampler.state
    if run.resuming:
        ckpt = run.checkpoint
        run.check_model(student.config)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if shards:
            sampler.generator.set_state(ckpt["sampler"])
        else:
            sampler.load_state(ckpt["sampler"])
    step = run.start()
    for f in tokenizer_path.parent.glob(tokenizer_path.stem + "*"):  # the tokenizer travels with the checkpoint
        shutil.copy(f, run.path / f.name)
    source = f"live teacher {config.teacher}" if teacher else (f"cache {config.teacher_cache}" if cache else "hard labels only")
    print(f"student: {student.num_params() / 1e6:.2f}M parameters | {source} | loss {config.alpha} * "
          f"{config.loss}(T={config.temperature}) + {1 - config.alpha:g} * CE | device {device} {dtype}")

    def save():
        run.save_checkpoint(student, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        sampler=sampler_state(), rng=rng_state(), step=step, elapsed=run.elapsed(),
                        train_config=asdict(config), tokenizer=tokenizer_path.stem)

    @run.timed_eval
    def run_eval(max_tokens):
        student.eval()
        if shards:
            metrics = evaluate(student, val_data, config.seq_len, config.batch_size, device, autocast, token_bytes, max_tokens)
        else:
            with autocast:
                loss = held_out_loss(student, eval_examples, pad_id, config.batch_size, device)
            metrics = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        student.train()
        print(f"eval step {step}: val loss {metrics['val_loss']:.4f}"
              + (f" | bpb {metrics['val_bpb']:.4f}" if "val_bpb" in metrics else ""))
        run.record({"step": step, **metrics})
        run.plot()
        return metrics

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
    ckpt_step = step  # the teacher time below counts this run's steps only
    student.train()
    teacher_s, teacher_total_s = 0.0, 0.0
    while not (stop_reason := run.stop_reason(step)):
        lr = set_lr(optimizer, config, step, run.elapsed())
        sums = torch.zeros(3)  # loss, kd, ce
        for _ in range(config.grad_accum):
            inputs, targets, mask, rows = next_batch()
            # forward: the teacher (live, or its cached top-k), then the student and the KD + CE loss
            if use_teacher:
                t0 = time.time()
                if teacher is not None:
                    with torch.no_grad(), autocast:
                        teacher_out, _ = teacher(inputs)
                else:
                    teacher_out = cache.batch(rows, inputs.size(1), device)
                teacher_s += time.time() - t0
                teacher_total_s += time.time() - t0
            with autocast:
                logits, _ = student(inputs)
            ce = hard_loss(logits, targets, mask)
            kd = kd_loss(logits, teacher_out, config.loss, config.temperature, config.beta, mask) if use_teacher \
                else torch.zeros((), device=device)
            loss = config.alpha * kd + (1 - config.alpha) * ce + student.router_loss()
            # backward (the scaler is a no-op unless fp16)
            scaler.scale(loss / config.grad_accum).backward()
            sums += torch.stack([loss.detach(), kd.detach(), ce.detach()]).cpu() / config.grad_accum
        # clip
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip or float("inf"))
        # step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_value, kd_value, ce_value = sums.tolist()
        check_finite(loss_value, step, run.ckpt_path, "try a lower --lr or --dtype float32")
        step += 1
        # log
        if run.log_due(step):
            step_time, window_s, eta = run.lap(step)
            teacher_share, teacher_s = teacher_s / window_s, 0.0
            run.log_step(step, eta, [f"loss {loss_value:.4f}", f"kd {kd_value:.4f}", f"ce {ce_value:.4f}",
                                     f"lr {lr:.2e}", f"{tokens_per_step / step_time:,.0f} tok/s",
                                     f"teacher {teacher_share:.0%}"],
                         {"loss": loss_value, "kd": kd_value, "ce": ce_value, "lr": lr, "grad_norm": grad_norm.item(),
                          "tokens_per_s": tokens_per_step / step_time})
        if run.eval_due(step):
            run_eval(config.eval_tokens)
            save()

    final = run_eval(0)
    save()
    elapsed = run.elapsed()
    summary = {**final, "tokens_seen": step * tokens_per_step, "wall_time_s": elapsed,
               "s_per_step": elapsed / max(step, 1), "params": student.num_params(),
               "teacher_s_per_step": teacher_total_s / max(step - ckpt_step, 1),
               "teacher": config.teacher or config.teacher_cache or None, "loss": config.loss,
               "temperature": config.temperature, "alpha": config.alpha}
    return run.finish(summary, step, stop_reason, device, f"val loss {final['val_loss']:.4f}"
                      + (f" | val bpb {final['val_bpb']:.4f}" if "val_bpb" in final else ""))


# ----------------------------------------------------------------------------------------------------------
# Black-box: the teacher's answers become an SFT dataset

def read_prompts(path) -> list[dict]:
    """[{"messages": prompt messages, "problem": the tasks.py problem or None}] from a prompts file.

    A record is a string (one user message), {"question": ...} (a tasks.py problem, kept for checking),
    {"prompt": str or messages}, or any chat.py SFT record (its last assistant answer is dropped)."""
    prompts = []
    for i, record in enumerate(read_records(path)):
        where = f"{path}: record {i}"
        problem = None
        if isinstance(record, str):
            messages = [{"role": "user", "content": record}]
        elif isinstance(record, dict) and "question" in record:
            messages, problem = [{"role": "user", "content": str(record["question"])}], record
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        elif isinstance(record, dict) and isinstance(record.get("prompt"), list):
            messages = record_to_messages({"messages": record["prompt"]}, where)
        else:
            if isinstance(record, dict) and "instruction" in record and "output" not in record:
                record = {**record, "output": ""}
            messages = record_to_messages(record, where)
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ChatDataError(f"{where}: a prompt must end with a user message")
        prompts.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "problem": problem})
    if not prompts:
        raise ChatDataError(f"{path}: no prompts")
    return prompts


def done_ids(out: Path) -> set:
    """Prompt ids already in the output file; a torn last line (a crash mid-write) is removed."""
    if not out.exists():
        return set()
    lines = out.read_text(encoding="utf-8").splitlines()
    good = []
    for n, line in enumerate(lines):
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines) - 1:
                raise ChatDataError(f"{out}: line {n + 1} is not valid JSON (not a file this command wrote?)")
            atomic_write(out, lambda tmp: Path(tmp).write_text("".join(l + "\n" for l in lines[:-1]), encoding="utf-8"))
    if any("id" not in r for r in good):
        raise ChatDataError(f"{out}: records without an 'id': not a file `distill.py generate` wrote")
    return {r["id"] for r in good}


def generate_dataset(args) -> dict:
    """Sample the teacher's answers to every prompt (batched, resumable) into an SFT file."""
    device = resolve_device(args.device)
    teacher = load_model(args.teacher, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None)
    tokenizer = load_tokenizer(args.teacher)
    end = chat_token_ids(tokenizer)[IM_END]
    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rejected_out = out.with_name(out.stem + ".rejected.jsonl")  # kept apart: sft.py trains on `out` as it is
    done = done_ids(out) | done_ids(rejected_out)
    todo = [i for i in range(len(prompts)) if i not in done]
    print(f"{len(prompts):,} prompts, {len(done):,} already in {out}, {len(todo):,} to generate")
    counts = {"written": 0, "rejected": 0, "unfinished": 0, "no_think": 0, "checked": 0, "correct": 0}
    t0, n_tokens = time.time(), 0
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        ids = [prompt_ids(tokenizer, prompts[i]["messages"]) for i in batch]
        new = generate(teacher, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p, seed=args.seed + start, stop_tokens=[end])
        lines, rejected = [], []
        for i, prompt, tokens in zip(batch, ids, new):
            n_tokens += len(tokens)
            text = tokenizer.decode(tokens.tolist())
            finished = len(tokens) < args.max_new_tokens and len(prompt) + len(tokens) < teacher.config.max_seq_len
            think, answer = split_think(text)
            counts["no_think"] += not think
            content = text if args.reasoning else answer
            record = {"id": i, "messages": prompts[i]["messages"] + [{"role": "assistant", "content": content}],
                      "finished": finished}
            problem = prompts[i]["problem"]
            if problem is not None and "answer" in problem:
                from tasks import check
                record["correct"] = check(problem, answer)
                counts["checked"] += 1
                counts["correct"] += record["correct"]
            if not finished:
                counts["unfinished"] += 1
            keep = (args.keep == "all" or record.get("correct")) and (finished or args.keep_unfinished) and answer.strip()
            (lines if keep else rejected).append(json.dumps(record, ensure_ascii=False) + "\n")
            counts["written" if keep else "rejected"] += 1
        for path, records in ((out, lines), (rejected_out, rejected)):
            if records:
                with open(path, "a", encoding="utf-8") as f:
                    f.writelines(records)
        done_n = min(start + args.batch_size, len(todo))
        rate = n_tokens / max(time.time() - t0, 1e-9)
        eta = (len(todo) - done_n) * (time.time() - t0) / max(done_n, 1)
        accuracy = f" | teacher correct {counts['correct'] / counts['checked']:.1%}" if counts["checked"] else ""
        print(f"generate: {len(done) + done_n:,}/{len(prompts):,} | {rate:,.0f} tok/s{accuracy} | ETA {format_seconds(eta)}",
              flush=True)
    print(f"wrote {counts['written']:,} answers to {out} ({counts['unfinished']} hit --max-new-tokens"
          + (f", {counts['no_think']} without a <think> trace" if args.reasoning else "") + ")"
          + (f"; {counts['rejected']:,} left out, in {rejected_out}" if counts["rejected"] else ""))
    return counts


def generate_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="distill.py generate", description="Black-box distillation data: the "
                                     "teacher's answers to prompts, as an SFT file (messages format) for sft.py.")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory (chat-tuned)")
    parser.add_argument("--prompts", required=True, help="prompts: .json/.jsonl of strings, {question}, {prompt} or chat records")
    parser.add_argument("--out", required=True, help="output .jsonl (appended to: prompts already there are skipped)")
    parser.add_argument("--reasoning", action="store_true", help="keep the teacher's <think>...</think> trace before "
                        "the answer (sft.py --think-weight weights it); without it only the answer is kept")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", choices=["all", "correct"], default="all", help="correct: keep only answers that "
                        "tasks.check accepts (prompts with a 'question' and 'answer'): rejection sampling")
    parser.add_argument("--keep-unfinished", action="store_true", help="keep answers cut by --max-new-tokens too "
                        "(left-out answers go to OUT.rejected.jsonl, which resume also reads)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        generate_dataset(args)
    except (ValueError, FileNotFoundError) as e:
        exit_on_error(e)


def cache_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="distill.py cache", description="One teacher pass over the data: its top-k "
                                     "log-probabilities at a temperature, for white-box distillation of many students.")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    parser.add_argument("--data", required=True, help="a data/prepare.py directory or chat files (as distill.py --data)")
    parser.add_argument("--out-dir", "--out", dest="out_dir", required=True, help="the cache directory")
    parser.add_argument("--seq-len", type=int, default=64, help="window length (shards; chat: the longest example - 1)")
    parser.add_argument("--top-k", type=int, default=32, help="log-probs kept per position")
    parser.add_argument("--samples", type=int, default=32, help="tokens drawn per position from the teacher's tail "
                        "(beyond the top k): an unbiased forward KL; 0: the tail is one 'rest' bucket (biased, but "
                        "also for reverse_kl and jsd)")
    parser.add_argument("--seed", type=int, default=0, help="of the tail samples")
    parser.add_argument("--temperature", type=float, default=2.0, help="must equal distill.py's --temperature")
    parser.add_argument("--truncate", choices=["left", "drop"], default="left", help="chat: as distill.py")
    parser.add_argument("--think-weight", type=float, default=1.0, help="chat: as distill.py")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    config = DistillConfig(data=args.data, seq_len=args.seq_len, truncate=args.truncate, think_weight=args.think_weight)
    try:
        build_cache(args.teacher, args.data, args.out_dir, args.seq_len, args.top_k, args.temperature, args.batch_size,
                    args.device, config, args.samples, args.seed)
    except (ValueError, FileNotFoundError, TrainingError) as e:
        exit_on_error(e)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        return generate_main(argv[1:])
    if argv and argv[0] == "cache":
        return cache_main(argv[1:])
    main_of(DistillConfig, DISTILL_PRESETS, __doc__.split("\n\n")[0] + " Subcommands: `distill.py cache --help`, "
            "`distill.py generate --help`.", distill, argv)


if __name__ == "__main__":
    main()
