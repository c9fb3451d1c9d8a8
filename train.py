"""Pretrain a nanollm model from scratch on a prepared corpus (see data/prepare.py).

    python data/prepare.py --source ../shared/data/tinyshakespeare/input.txt --out data/shakespeare
    python train.py --preset cpu-shakespeare --data data/shakespeare --out-dir out/shakespeare
    torchrun --nproc_per_node=8 train.py --preset gpu-124m --data DIR     # DistributedDataParallel

The recipe, each piece a few lines below:
- next-token cross-entropy on random windows of `seq_len + 1` tokens of the train split (nanoGPT);
- AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only, linear warmup then cosine
  decay to `min_lr` (with --max-time the schedule follows the clock, so the decay ends with the budget);
- gradient accumulation and clipping, bf16 autocast on CUDA (fp16 + grad scaler where bf16 is missing);
- evaluation of loss, perplexity and bits per byte (nats / ln 2 / bytes) on the validation split;
- checkpoints written atomically with everything needed to resume bit for bit: model, optimizer,
  step, RNG states and the batch sampler's generator.
Outputs in --out-dir: ckpt.pt, train_config.json, metrics.jsonl, loss.png, summary.json and the tokenizer.
"""
import json
import math
from contextlib import nullcontext
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import check_resume, check_writable_dir, exit_on_error
from common import (CHECKPOINT_FILE, RunConfig, append_jsonl, opt, parse_config, peak_memory_mb, read_checkpoint,
                    resolve_device, save_checkpoint, truncate_metrics)
from model import PRESETS, ModelConfig, Transformer


@dataclass
class TrainConfig(RunConfig):  # budget, schedule, AdamW, eval/log cadence, device, seed, resume: RunConfig's defaults
    data: str = opt("", "prepared data directory (train.bin, val.bin, meta.json from data/prepare.py)")
    out_dir: str = opt("out/train", "where checkpoints, metrics and the summary go")
    # model
    model: str = opt("small", "model preset (model.py)", choices=list(PRESETS))
    n_layers: int = opt(0, "override the preset's layer count (0: keep)")
    dim: int = opt(0, "override the preset's width (0: keep)")
    n_heads: int = opt(0, "override the preset's query heads (0: keep)")
    n_kv_heads: int = opt(0, "override the preset's key/value heads (0: keep)")
    hidden_dim: int = opt(0, "override the preset's SwiGLU width (0: keep)")
    seq_len: int = opt(256, "training context length")
    dropout: float = opt(0.0, "dropout on attention and residual branches")
    tie_embeddings: bool = opt(True, "share the token embedding with the LM head")
    attn_backend: str = opt("sdpa", "attention implementation", choices=["naive", "sdpa", "triton"])
    fused_ce: bool = opt(False, "loss through kernels/cross_entropy.py (chunked, no fp32 copy of the logits)")
    # batches
    batch_size: int = opt(16, "sequences per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    # evaluation
    eval_tokens: int = opt(65536, "validation tokens per periodic eval (the final eval uses the whole split)")
    sample_tokens: int = opt(64, "tokens of generated text shown at each eval (0: none)")
    # system
    dtype: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16 | float16",
                     choices=["auto", "float32", "bfloat16", "float16"])
    compile: bool = opt(False, "torch.compile the model")


TRAIN_PRESETS = {
    # Tiny Shakespeare (prepared with the default 2048-token BPE) on a 2-core CPU in 2 minutes: small
    # batches of short windows and many steps learn most per second here (README: the measurements)
    "cpu-shakespeare": dict(model="small", n_layers=4, dim=128, n_heads=4, n_kv_heads=4, hidden_dim=384,
                            seq_len=64, batch_size=12, max_steps=5000, max_time=120.0, lr=2e-3, min_lr=2e-4,
                            warmup_steps=50, eval_interval=500, eval_tokens=8192, log_interval=100),
    # the complete Tang poems on a CPU
    "cpu-tang": dict(model="small", n_layers=4, dim=128, n_heads=4, n_kv_heads=4, hidden_dim=384,
                     seq_len=64, batch_size=12, max_steps=20000, max_time=180.0, lr=2e-3, min_lr=2e-4,
                     warmup_steps=50, eval_interval=1000, eval_tokens=8192, log_interval=100),
    # GPT-2 small's budget on GPUs: 0.5M tokens per step over 8 GPUs
    "gpu-124m": dict(model="llama-124m", seq_len=1024, batch_size=32, grad_accum=2, max_steps=20000,
                     lr=6e-4, min_lr=6e-5, warmup_steps=700, eval_interval=500, eval_tokens=1 << 20,
                     compile=True, dtype="bfloat16"),
}

# bf16 dense peak FLOP/s of devices we know, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


class TrainingError(RuntimeError):
    """A run that cannot go on (bad data directory, NaN loss): reported without a traceback."""


# ----------------------------------------------------------------------------------------------------------
# Data

def load_split(data_dir: Path, split: str, meta: dict) -> np.ndarray:
    path = data_dir / f"{split}.bin"
    if not path.exists():
        raise TrainingError(f"{path} not found: prepare the data first (python data/prepare.py --out {data_dir})")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


def read_meta(data_dir: Path) -> dict:
    path = data_dir / "meta.json"
    if not path.exists():
        raise TrainingError(f"{path} not found: --data must be a directory written by data/prepare.py")
    meta = json.loads(path.read_text())
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise TrainingError(f"{path}: missing field {key!r}")
    return meta


class BatchSampler:
    """Random windows of the token stream, drawn from one seeded generator.

    Every process draws the offsets of the whole global batch (world_size x batch_size rows per
    micro-step) and keeps its own slice, so N processes see exactly the rows one process with an N
    times larger batch would. The generator's state goes into the checkpoint.
    """

    def __init__(self, data: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(data) <= seq_len + 1:
            raise TrainingError(f"the train split has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.randint(len(self.data) - self.seq_len - 1, (self.world_size * self.batch_size,),
                                generator=self.generator)
        mine = offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        windows = torch.from_numpy(np.stack([self.data[i:i + self.seq_len + 1] for i in mine]).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]  # (B, T) inputs, (B, T) next-token targets


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


# ----------------------------------------------------------------------------------------------------------
# Optimisation

def make_optimizer(model, config: RunConfig, device: str) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings, projections) only, not on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.startswith("cuda"))


def learning_rate(progress: float, step: int, config: RunConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr as progress goes 0 -> 1."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def set_lr(optimizer, config: RunConfig, step: int, elapsed: float) -> float:
    """Set the optimizer's lr for this step and return it. Progress is the share of max_steps done, or of
    --max-time used when that is further along, so the cosine decay ends with the time budget."""
    progress = step / config.max_steps
    if config.max_time:
        progress = max(progress, elapsed / config.max_time)
    lr = learning_rate(progress, step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def mixed_precision(dtype: str, device: str):
    """(dtype name, autocast context, grad scaler) for --dtype. auto: bf16 autocast on CUDA (fp16 where bf16 is
    missing, its gradients scaled by the GradScaler so they do not underflow), fp32 elsewhere."""
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.startswith("cuda") else "float32"
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    device_type = device.split(":")[0]
    autocast = torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
    return dtype, autocast, scaler


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def device_peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def plot_losses(metrics_file: Path, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    if train or val:  # (a run shorter than one log interval has no curve yet)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StepTimer:
    """The timing of the progress line: the pace over the steps since the last line, and the ETA it implies."""

    def __init__(self, config: RunConfig, step: int):
        self.max_steps, self.max_time = config.max_steps, config.max_time
        self.window_t, self.window_step = time.time(), step

    def skip_pause(self) -> None:
        """Call after an eval or a checkpoint: that time is not training throughput."""
        self.window_t = time.time()

    def lap(self, step: int, elapsed: float) -> tuple[float, float, float]:
        """(seconds per step, seconds (> 0) since the last lap, ETA in seconds), and start the next window.
        The ETA is the remaining steps at this pace, or what is left of --max-time if that ends first."""
        now = time.time()
        window_s = max(now - self.window_t, 1e-9)
        step_time = window_s / max(step - self.window_step, 1)
        self.window_t, self.window_step = now, step
        eta = (self.max_steps - step) * step_time
        if self.max_time:
            eta = min(eta, max(self.max_time - elapsed, 0))
        return step_time, window_s, eta


def progress_line(step: int, max_steps: int, eta: float, *fields: str) -> str:
    """`step 40/300 | loss 2.3456 | lr 1.00e-03 | ... | ETA 1m05s`: what every training loop prints."""
    return " | ".join([f"step {step}/{max_steps}", *fields, f"ETA {format_seconds(eta)}"])


# ----------------------------------------------------------------------------------------------------------

def train(config: TrainConfig) -> dict:
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size, local_rank = 0, 1, 0
    device = resolve_device(config.device)
    if ddp:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)

    data_dir, out_dir = Path(config.data), Path(config.out_dir)
    if not config.data:
        raise TrainingError("--data is required: a directory written by data/prepare.py")
    meta = read_meta(data_dir)
    train_data, val_data = load_split(data_dir, "train", meta), load_split(data_dir, "val", meta)

    from bpe import Tokenizer
    tokenizer_path = data_dir / meta["tokenizer"]
    tokenizer = Tokenizer.load(tokenizer_path)

    dtype, autocast, scaler = mixed_precision(config.dtype, device)

    overrides = {k: getattr(config, k) for k in ("n_layers", "dim", "n_heads", "n_kv_heads", "hidden_dim")
                 if getattr(config, k)}
    model_config = ModelConfig.from_preset(config.model, vocab_size=meta["vocab_size"], max_seq_len=config.seq_len,
                                           dropout=config.dropout, tie_embeddings=config.tie_embeddings,
                                           attn_backend=config.attn_backend, **overrides)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model = Transformer(model_config).to(device)
    optimizer = make_optimizer(model, config, device)
    sampler = BatchSampler(train_data, config.seq_len, config.batch_size, config.seed, rank, world_size)

    step, elapsed_before = 0, 0.0
    ckpt_path = out_dir / CHECKPOINT_FILE
    if config.resume and ckpt_path.exists():
        ckpt = read_checkpoint(out_dir)
        check_resume(ckpt, model_config, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        sampler.generator.set_state(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        step, elapsed_before = ckpt["step"], ckpt["elapsed"]
        if master:  # forget what was logged after the checkpoint: those steps are about to run again
            truncate_metrics(out_dir / "metrics.jsonl", step)
        log(f"resumed from {ckpt_path} at step {step}")
    elif master:
        check_writable_dir(out_dir)
        (out_dir / "metrics.jsonl").write_text("")
    if master:
        for f in tokenizer_path.parent.glob(tokenizer_path.name + "*"):  # the tokenizer travels with the checkpoint
            shutil.copy(f, out_dir / f.name)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))

    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    token_bytes = token_byte_lengths(tokenizer, meta["vocab_size"])
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * world_size
    flops_per_step = raw_model.flops_per_token(config.seq_len) * tokens_per_step
    peak_flops = device_peak_flops(device)
    log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters | {tokens_per_step:,} tokens/step | "
        f"{len(train_data):,} train tokens | device {device} {dtype} | {world_size} process(es)")

    def save():
        save_checkpoint(out_dir, raw_model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        sampler=sampler.generator.get_state(), rng=rng_state(), step=step, elapsed=elapsed,
                        train_config=asdict(config), tokenizer=tokenizer_path.name)

    def record(row):
        append_jsonl(out_dir / "metrics.jsonl", row)

    def run_eval(max_tokens):
        raw_model.eval()
        metrics = evaluate(raw_model, val_data, config.seq_len, config.batch_size, device, autocast, token_bytes, max_tokens)
        log(f"eval step {step}: val loss {metrics['val_loss']:.4f} | ppl {metrics['val_ppl']:.2f} | "
            f"bpb {metrics['val_bpb']:.4f}")
        if config.sample_tokens:
            log("sample: " + repr(generate_sample(raw_model, tokenizer, config.sample_tokens))[:400])
        raw_model.train()
        record({"step": step, **metrics})
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        return metrics

    if config.fused_ce:
        from kernels.cross_entropy import cross_entropy as fused_cross_entropy
    model.train()
    t_start = time.time()
    elapsed = elapsed_before
    timer = StepTimer(config, step)
    stop_reason = "max_steps"
    while step < config.max_steps:
        lr = set_lr(optimizer, config, step, elapsed)
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            x, y = (t.to(device) for t in sampler.next_batch())
            sync = not ddp or micro == config.grad_accum - 1  # all-reduce gradients once per step
            with autocast, (model.no_sync() if not sync else nullcontext()):
                if config.fused_ce:
                    logits, _ = model(x)
                    loss = fused_cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
                else:
                    _, loss = model(x, y)
                loss = loss / config.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss is {loss_value} at step {step + 1}: stopping. The last good checkpoint "
                                f"({ckpt_path if ckpt_path.exists() else 'none yet'}) is intact; try a lower --lr "
                                f"or --dtype float32")
        step += 1
        elapsed = elapsed_before + time.time() - t_start

        if step % config.log_interval == 0 or step == config.max_steps:
            step_time, _, eta = timer.lap(step, elapsed)
            tokens_per_s = tokens_per_step / step_time
            mfu = [f"MFU {flops_per_step / step_time / (peak_flops * world_size):.1%}"] if peak_flops else []
            log(progress_line(step, config.max_steps, eta, f"loss {loss_value:.4f}", f"lr {lr:.2e}",
                              f"grad norm {grad_norm.item():.3f}", f"{tokens_per_s:,.0f} tok/s", *mfu))
            if master:
                record({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_s": tokens_per_s, "elapsed": elapsed})
        out_of_time = bool(config.max_time) and elapsed >= config.max_time
        if ddp:  # every process stops at the same step
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if out_of_time:
            stop_reason = "max_time"
            break
        if step % config.eval_interval == 0 and step < config.max_steps and master:
            run_eval(config.eval_tokens)
            save()
            timer.skip_pause()

    summary = {}
    if master:
        final = run_eval(0)  # the whole validation split
        save()
        summary = {**final, "step": step, "stop_reason": stop_reason, "tokens_seen": step * tokens_per_step,
                   "tokens_per_s": (step * tokens_per_step) / max(elapsed, 1e-9), "wall_time_s": elapsed,
                   "peak_memory_mb": peak_memory_mb(device), "params": raw_model.num_params()}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log(f"done: {step} steps in {format_seconds(elapsed)} ({stop_reason}) | val loss {final['val_loss']:.4f} | "
            f"val bpb {final['val_bpb']:.4f} | summary in {out_dir / 'summary.json'}")
    if ddp:
        dist.destroy_process_group()
    return summary


def generate_sample(model, tokenizer, n_tokens: int) -> str:
    """A continuation of <|endoftext|> (a new document), sampled at temperature 0.8, top-k 50."""
    from sample import generate
    eot = tokenizer.special_tokens["<|endoftext|>"]
    new_tokens = generate(model, [[eot]], max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=0)[0]
    return tokenizer.decode(new_tokens.tolist())


def main(argv=None):
    config = parse_config(TrainConfig, TRAIN_PRESETS, __doc__.split("\n\n")[0], argv)
    try:
        train(config)
    except (TrainingError, ValueError) as e:
        exit_on_error(e)


if __name__ == "__main__":
    main()
