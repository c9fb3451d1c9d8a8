"""What the training loops share (train, sft, dpo, rlhf, distill): the config CLI, AdamW with warmup +
cosine, mixed precision, RNG state, the progress line, the run directory and its checkpoint.

Each loop stays in its own script, written out in the same phases (nanoGPT's train.py):

    step = run.start()                                       # 0, or the checkpoint's step (RNG restored)
    while not (stop_reason := run.stop_reason(step)):        # max_steps, --max-time (evals included), Ctrl-C
        lr = set_lr(optimizer, config, step, run.elapsed())  # warmup, then cosine to min_lr
        loss = <the stage's loss on the stage's batch>       # forward
        loss.backward()                                      # backward
        clip_grad_norm_(params, config.grad_clip)            # clip
        optimizer.step(); optimizer.zero_grad()              # step
        step += 1
        if run.log_due(step): print(progress_line(...)); run.record({...})      # log
        if run.eval_due(step): run_eval(); save()            # evaluate, run.save_checkpoint(...)

The learning rate at step s (AdamW, Loshchilov & Hutter 2019; weight decay on matrices only):

    lr(s) = lr * (s + 1) / warmup_steps                                     while s < warmup_steps
    lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2           after, progress = s / max_steps
                                                                            (or elapsed / max_time if larger)

A run directory (RunDir) holds ckpt.pt (everything needed to resume bit for bit), <stage>_config.json,
metrics.jsonl (one JSON row per log/eval, cut back to the checkpoint's step on --resume), the plots and
summary.json (written last: a summary means the run finished). A run directory is never overwritten by
accident: starting over needs --overwrite or another --out-dir.
"""
import argparse
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from common import (CHECKPOINT_FILE, UsageError, atomic_write, check_writable_dir, exit_on_error, peak_memory_mb,
                    read_checkpoint, save_checkpoint)
from lora import lora_state_dict, merged_state_dict, save_adapter
from model import PRESETS, ModelConfig, Transformer


class TrainingError(RuntimeError):
    """A run that cannot go on (bad data, NaN loss): reported without a traceback. A flag the user can fix
    (a run directory in the way, --resume with nothing or another model to resume) is a common.UsageError."""


# ----------------------------------------------------------------------------------------------------------
# Optimisation: AdamW, the schedule, mixed precision

def make_optimizer(model, config, device: str) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings, projections) only, not on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.startswith("cuda"))


def learning_rate(progress: float, step: int, config) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr as progress goes 0 -> 1."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def set_lr(optimizer, config, step: int, elapsed: float) -> float:
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


def check_finite(loss: float, step: int, ckpt_path: Path, hint: str = "try a lower --lr") -> None:
    """Stop on a NaN or infinite loss, naming the last good checkpoint (left intact)."""
    if not math.isfinite(loss):
        raise TrainingError(f"loss is {loss} at step {step + 1}: stopping. The last good checkpoint "
                            f"({ckpt_path if ckpt_path.exists() else 'none yet'}) is intact; {hint}")


# ----------------------------------------------------------------------------------------------------------
# Randomness: one seed for everything, and its state in every checkpoint

def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (every one a run may draw from)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


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


# ----------------------------------------------------------------------------------------------------------
# The progress line

def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StepTimer:
    """The timing of the progress line: the pace over the steps since the last line, and the ETA it implies."""

    def __init__(self, config, step: int):
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
# The run directory

def truncate_metrics(metrics_file, step: int) -> None:
    """Keep the rows of a metrics.jsonl logged up to `step`: a resumed run is about to log the later ones
    again. Atomic: a crash leaves the old file or the new one."""
    path = Path(metrics_file)
    rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("".join(row + "\n" for row in rows))
    atomic_write(path, write)


def append_jsonl(path, row: dict) -> None:
    """One more row of a metrics.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_metrics(metrics_file: Path, out_png: Path, panels: dict) -> None:
    """One panel per {title: [metric keys]}, each key a curve over the steps it was logged at."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines()]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7, 4 * len(panels)), 4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:  # (a run shorter than one log interval has no curve yet)
                ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", markersize=3, label=key, alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


LOSS_PANELS = {"cross-entropy (nats / token)": ["loss", "val_loss"]}


class RunDir:
    """A training run's --out-dir: its checkpoint, config, metrics.jsonl, plots and summary.json.

    RunDir(config, "sft") checks the directory before anything is written: --resume needs a checkpoint
    there (self.checkpoint; load_weights), without --resume a directory that holds a run (ckpt.pt or
    summary.json) is refused unless --overwrite, and a run resumed after it finished has nothing left to do
    (self.finished: its summary). start() cuts metrics.jsonl back to the checkpoint's step (resume) or
    starts it empty, writes the config and starts the clock (elapsed, lap for the progress line).
    stop_reason(step) ends the loop at max_steps, or when --max-time, which covers the evaluations
    (timed_eval) as well as the steps, is spent; after a Ctrl-C the run exits, naming its checkpoint."""

    def __init__(self, config, stage: str, master: bool = True):
        self.path, self.stage, self.config, self.master = Path(config.out_dir), stage, config, master
        self.metrics = self.path / "metrics.jsonl"
        self.ckpt_path = self.path / CHECKPOINT_FILE
        self.checkpoint, self.finished = None, None
        self.started, self.eval_s, self.saved_step, self.interrupted = time.time(), 0.0, None, False
        self.timer, self.elapsed_before, self.t_start = None, 0.0, time.time()
        if config.resume:
            if not self.ckpt_path.exists():
                raise UsageError(f"--resume: {self.path} holds no checkpoint ({CHECKPOINT_FILE}), so there is "
                                 f"nothing to resume; leave out --resume to start a run there")
            self.checkpoint = read_checkpoint(self.path)
            self.saved_step = self.checkpoint["step"]
            self.finished = self._finished_summary()
        elif (self.ckpt_path.exists() or (self.path / "summary.json").exists()) and not config.overwrite:
            raise UsageError(f"{self.path} holds a run already: --resume continues it, --overwrite starts over "
                             f"there, or give another --out-dir")
        if master:  # a file in the way, a read-only disk: said now, not at the first checkpoint
            check_writable_dir(self.path)
        if master and self.path.is_dir():  # temporary files of checkpoint writes killed half-way
            for stale in self.path.glob(f".{CHECKPOINT_FILE}.*.tmp"):
                stale.unlink()
        if self.finished is not None and master:
            print(f"{self.path}: the run finished at step {self.saved_step} ({self.finished.get('stop_reason')}); "
                  f"nothing left to resume (raise --max-steps or --max-time to train on)")

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None

    def check_model(self, model_config) -> None:
        """--resume must continue the same model: a UsageError naming every config field that differs."""
        saved, current = self.checkpoint["model_config"], asdict(model_config)
        differ = [f"{k} {saved.get(k)} -> {current[k]}" for k in current if k in saved and saved[k] != current[k]
                  and k not in ("dropout", "attn_backend")]  # not part of the weights' shape
        if differ:
            raise UsageError(f"--resume: {self.ckpt_path} holds another model ({', '.join(differ)}); resume with "
                             f"the flags it was trained with, or start over in a new --out-dir")

    def _finished_summary(self) -> dict | None:
        """The summary, when it was written at the checkpoint's step and this config would stop there too."""
        path = self.path / "summary.json"
        if not path.exists():
            return None
        summary = json.loads(path.read_text())
        step, elapsed = self.checkpoint["step"], self.checkpoint.get("elapsed", 0.0)
        spent = step >= self.config.max_steps or (self.config.max_time and elapsed >= self.config.max_time)
        return summary if summary.get("step") == step and spent else None

    def start(self, log=print) -> int:
        """Begin the run, or go on with it: on --resume the RNG state of the checkpoint comes back and
        metrics.jsonl is cut back to its step. Returns the step to continue from; the clock starts."""
        step = 0
        if self.resuming:
            set_rng_state(self.checkpoint["rng"])
            step, self.elapsed_before = self.checkpoint["step"], self.checkpoint["elapsed"]
            log(f"resumed from {self.ckpt_path} at step {step}")
        self.timer, self.t_start = StepTimer(self.config, step), time.time()
        if not self.master:
            return step
        self.path.mkdir(parents=True, exist_ok=True)
        if self.resuming:  # forget what was logged after the checkpoint: those steps are about to run again
            truncate_metrics(self.metrics, step)
        else:
            self.metrics.write_text("")
            (self.path / "summary.json").unlink(missing_ok=True)  # --overwrite: the old run's summary goes
        (self.path / f"{self.stage}_config.json").write_text(json.dumps(asdict(self.config), indent=2))
        if threading.current_thread() is threading.main_thread():
            self._sigint = signal.signal(signal.SIGINT, self._on_sigint)
        return step

    def elapsed(self) -> float:
        """Seconds of training so far, those before the resumed checkpoint included (the schedule's clock)."""
        return self.elapsed_before + time.time() - self.t_start

    def log_due(self, step: int) -> bool:
        return step % self.config.log_interval == 0 or step == self.config.max_steps

    def lap(self, step: int) -> tuple[float, float, float]:
        """The progress line's (seconds per step, seconds since the last line, ETA): StepTimer.lap."""
        return self.timer.lap(step, self.elapsed())

    def eval_due(self, step: int) -> bool:
        """A periodic evaluation (and checkpoint) after this step, unless the run stops here (the final one)."""
        return step % self.config.eval_interval == 0 and self.stop_reason(step) is None

    def _on_sigint(self, signum, frame) -> None:
        print("\nCtrl-C: stopping after this step (Ctrl-C again stops at once)", flush=True)
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _restore_sigint(self) -> None:
        if getattr(self, "_sigint", None) is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None

    def timed_eval(self, evaluate):
        """evaluate, timed: the longest evaluation is kept back from --max-time for the final one."""
        def timed(*args, **kwargs):
            t0 = time.time()
            result = evaluate(*args, **kwargs)
            self.eval_s = max(self.eval_s, time.time() - t0)
            self.timer.skip_pause()  # not training throughput
            return result
        return timed

    def stop_reason(self, step: int) -> str | None:
        """Why the loop ends after this step, if it does: "max_steps", or "max_time" when what is left of
        --max-time (counted from this run's start, plus the time of the resumed checkpoint) no longer holds
        the final evaluation, and the periodic one due at this step if any (each as long as the longest so
        far). After a Ctrl-C, exit naming the step."""
        if self.interrupted:
            self._restore_sigint()
            resume = (f"--resume continues from step {self.saved_step}" if self.saved_step is not None
                      else "no checkpoint yet: run it again to start over")
            print(f"interrupted at step {step}; {resume}", flush=True)
            raise SystemExit(130)
        if step >= self.config.max_steps:
            return "max_steps"
        before = self.checkpoint.get("elapsed", 0.0) if self.resuming else 0.0
        evals_left = 2 if step % self.config.eval_interval == 0 else 1
        if self.config.max_time and before + time.time() - self.started + evals_left * self.eval_s >= self.config.max_time:
            return "max_time"
        return None

    def record(self, row: dict) -> None:
        if self.master:
            append_jsonl(self.metrics, row)

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines()]

    def plot(self, name: str = "loss.png", panels: dict = LOSS_PANELS) -> None:
        plot_metrics(self.metrics, self.path / name, panels)

    def write_summary(self, summary: dict) -> Path:
        self._restore_sigint()
        path = self.path / "summary.json"
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, ensure_ascii=False)))
        return path

    def log_step(self, step: int, eta: float, shown: list[str], row: dict, log=print) -> None:
        """The progress line (step, the `shown` fields, ETA) and its metrics.jsonl row (step and elapsed added)."""
        log(progress_line(step, self.config.max_steps, eta, *shown))
        sys.stdout.flush()  # a progress line reaches a log file as it is printed
        self.record_step(step, row)

    def record_step(self, step: int, row: dict) -> None:
        """A training step's metrics.jsonl row, with its step and the elapsed time."""
        self.record({"step": step, **row, "elapsed": self.elapsed()})

    def finish(self, summary: dict, step: int, stop_reason: str, device: str, result: str = "", log=print) -> dict:
        """The end of a run: summary.json, the stage's numbers and what every run reports (step, stop_reason,
        wall_time_s, peak_memory_mb), and the closing line `done: 40 steps in 1m05s (max_steps) | <result>`."""
        summary = {**summary, "step": step, "stop_reason": stop_reason,
                   "wall_time_s": summary.get("wall_time_s", self.elapsed()), "peak_memory_mb": peak_memory_mb(device)}
        path = self.write_summary(summary)
        log(" | ".join([f"done: {step} steps in {format_seconds(summary['wall_time_s'])} ({stop_reason})",
                        *([result] if result else []), f"summary in {path}"]))
        return summary

    def load_weights(self, model, lora: bool = False) -> None:
        """The checkpoint's weights into `model`: with LoRA its adapters alone (the base is --init's), else all."""
        self.check_model(model.config)
        if lora:
            model.load_state_dict(self.checkpoint["lora"], strict=False)
        else:
            model.load_state_dict(self.checkpoint["model"])

    def save_checkpoint(self, model, lora: bool = False, **state) -> Path:
        """ckpt.pt, written atomically: the model (LoRA adapters merged in, so every later stage loads a plain
        model) and `state`; with LoRA also the adapters alone ("lora", what --resume loads) and adapter.pt."""
        if not lora:
            path = save_checkpoint(self.path, model, **state)
            self.saved_step = state.get("step")
            self.timer.skip_pause()
            return path
        save_adapter(model, self.path / "adapter.pt")
        payload = {"model": merged_state_dict(model), "model_config": asdict(model.config),
                   "lora": lora_state_dict(model), **state}
        atomic_write(self.ckpt_path, lambda tmp: torch.save(payload, tmp))
        self.saved_step = state.get("step")
        self.timer.skip_pause()
        return self.ckpt_path


# ----------------------------------------------------------------------------------------------------------
# Data: a prepared token stream (data/prepare.py) and shuffled passes over examples

def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise TrainingError(f"{path} not found: --data must be a directory written by data/prepare.py")
    meta = json.loads(path.read_text())
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise TrainingError(f"{path}: missing field {key!r}")
    return meta


def load_split(data_dir: Path, split: str, meta: dict) -> np.ndarray:
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise TrainingError(f"{path} not found: prepare the data first (python data/prepare.py --out-dir {data_dir})")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


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


class ExampleSampler:
    """Shuffled passes over n examples; its generator state is checkpointed, so resume is exact."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position, self.epoch = [], 0, 0

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.position, self.epoch = 0, self.epoch + 1
            take = self.order[self.position:self.position + self.batch_size - len(out)]
            out += take
            self.position += len(take)
        return out

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position,
                "epoch": self.epoch}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position, self.epoch = state["order"], state["position"], state["epoch"]


# ----------------------------------------------------------------------------------------------------------
# Config parsing: a dataclass of every hyperparameter becomes the CLI.
# Precedence: dataclass defaults < --preset < --config FILE (JSON) < flags given on the command line.

def opt(default, help, **meta):
    """A config field: its default, its --help text, and optional `choices`, `type`, `append` for the CLI."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class RunConfig:
    """The options every training script shares (train, sft, dpo, rlhf, distill): the budget, AdamW with
    warmup + cosine (learning_rate above), evaluation and logging cadence, device, seed and resume. The
    defaults are pretraining's (train.py); the fine-tuning scripts lower lr, steps and weight decay.

    A script's config inherits it and changes a default by declaring the field again without opt():
    `lr: float = 1e-4` keeps the help text given here (parse_config reads it through the MRO)."""
    max_steps: int = opt(2000, "optimizer steps (the cosine schedule ends here)")
    max_time: float = opt(0.0, "wall-clock budget in seconds (0: none); stops cleanly, then the final eval")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(100, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (not on norms, biases)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    eval_interval: int = opt(250, "evaluate and checkpoint every N steps (and once at the end)")
    log_interval: int = opt(10, "print a progress line every N steps")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    seed: int = opt(1337, "random seed (every random draw of the run follows from it)")
    resume: bool = opt(False, "continue the run in out_dir from its checkpoint")
    overwrite: bool = opt(False, "start a new run in an out_dir that holds one (its files are replaced)")


def field_metadata(config_class, name: str) -> dict:
    """The help, choices and type of a field: from the nearest class in the MRO that gives any (a subclass
    that only changes a default declares the field without them)."""
    for cls in config_class.__mro__:
        f = getattr(cls, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata:
            return f.metadata
    raise TypeError(f"{config_class.__name__}.{name}: no help text (declare it with opt(default, help))")


def _flag_type(default):
    if isinstance(default, bool):
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    return type(default) if default is not None else str


def parse_config(config_class, presets: dict, description: str, argv=None):
    """Build an argparse CLI from `config_class`'s fields (help text from field metadata["help"]),
    apply --preset, --config and the flags, and return the config instance.

    --help lists the script's own options first, then RunConfig's shared ones in a group of their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(presets), help="a named set of hyperparameters")
    parser.add_argument("--config", help="JSON file of hyperparameters (flags override it)")
    shared = {f.name for f in fields(RunConfig)} if issubclass(config_class, RunConfig) else set()
    shared_group = parser.add_argument_group("optimisation and run (shared by every training script: training.RunConfig)")
    for f in sorted(fields(config_class), key=lambda f: f.name in shared):  # stable: the script's own first
        group = shared_group if f.name in shared else parser
        meta = field_metadata(config_class, f.name)
        flag = "--" + f.name.replace("_", "-")
        if meta.get("append"):  # a list field: the flag may be given several times
            group.add_argument(flag, action="append", default=argparse.SUPPRESS,
                               help=f"{meta.get('help', '')} (repeatable)")
            continue
        kind = meta.get("type") or _flag_type(f.default)
        is_bool = isinstance(f.default, bool)  # `--compile` alone means true; `--compile false` also works
        group.add_argument(flag, type=kind, default=argparse.SUPPRESS, **({"nargs": "?", "const": True} if is_bool else {}),
                           help=f"{meta.get('help', '')} (default: {f.default})",
                           **({"choices": meta["choices"]} if "choices" in meta else {}))
    args = vars(parser.parse_args(argv))
    values = dict(presets[args.pop("preset")]) if args.get("preset") else {}
    args.pop("preset", None)
    config_file = args.pop("config", None)
    if config_file:
        try:
            from_file = json.loads(open(config_file, encoding="utf-8").read())
        except (OSError, ValueError) as e:
            parser.error(f"--config {config_file}: {e}")
        known = {f.name for f in fields(config_class)}
        unknown = sorted(set(from_file) - known)
        if unknown:
            parser.error(f"--config {config_file}: unknown keys {unknown}")
        values.update(from_file)
    values.update(args)
    config = config_class(**values)
    try:
        check_positive(config)
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")  # one line: train.py's usage block is 30 lines long
    return config


def main_of(config_class, presets: dict, description: str, run, argv=None, errors: tuple = ()):
    """A training script's main(): its config from the command line, then run(config); an expected error (a
    TrainingError, a bad value or a missing file, and the script's own `errors`) ends in one line, not a traceback."""
    config = parse_config(config_class, presets, description, argv)
    try:
        return run(config)
    except (TrainingError, UsageError, ValueError, FileNotFoundError, *errors) as e:
        exit_on_error(e)


def check_positive(config, names=("batch_size", "grad_accum", "seq_len", "max_len", "eval_interval",
                                  "log_interval", "minibatches", "ppo_epochs", "prompts_per_step",
                                  "samples_per_prompt", "eval_new_tokens")) -> None:
    """Counts that must be >= 1 (a batch of 0 sequences): a UsageError naming the flag."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# ----------------------------------------------------------------------------------------------------------
# A model trained from scratch: train.py's config, which distill.py's student config extends

@dataclass
class TrainConfig(RunConfig):
    """A model trained from scratch on token shards: train.py's config, and distill.py's for its student."""
    data: str = opt("", "prepared data directory (train.bin, val.bin, meta.json from data/prepare.py)")
    out_dir: str = opt("out/train", "where checkpoints, metrics and the summary go")
    # model
    model: str = opt("small", "model preset (model.py)", choices=list(PRESETS))
    n_layers: int = opt(0, "override the preset's layer count (0: keep)")
    dim: int = opt(0, "override the preset's width (0: keep)")
    n_heads: int = opt(0, "override the preset's query heads (0: keep)")
    n_kv_heads: int = opt(0, "override the preset's key/value heads (0: keep)")
    hidden_dim: int = opt(0, "override the preset's SwiGLU width (0: keep)")
    n_experts: int = opt(0, "mixture of experts: routed experts per block, each of width hidden_dim (0: the preset's)")
    n_experts_per_token: int = opt(0, "mixture of experts: top-k experts per token (0: the preset's)")
    router_aux_loss_coef: float = opt(0.01, "mixture of experts: load-balancing loss weight (0: none)")
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
# cpu-shakespeare with 4 experts, top-1: the same active parameters per token, 4x the FFN's (docs/moe.md)
TRAIN_PRESETS["cpu-shakespeare-moe"] = dict(TRAIN_PRESETS["cpu-shakespeare"], n_experts=4, n_experts_per_token=1)


def new_model(config: TrainConfig, vocab_size: int) -> Transformer:
    """A randomly initialised model of config's preset, with the config's overrides of its shape."""
    overrides = {k: getattr(config, k) for k in ("n_layers", "dim", "n_heads", "n_kv_heads", "hidden_dim",
                                                 "n_experts", "n_experts_per_token") if getattr(config, k)}
    try:
        model_config = ModelConfig.from_preset(config.model, vocab_size=vocab_size, max_seq_len=config.seq_len,
                                               dropout=config.dropout, tie_embeddings=config.tie_embeddings,
                                               attn_backend=config.attn_backend,
                                               router_aux_loss_coef=config.router_aux_loss_coef, **overrides)
    except ValueError as e:  # e.g. --n-experts-per-token above --n-experts: the message names the field
        raise UsageError(f"model flags: {e}") from None
    if config.n_experts_per_token and not model_config.n_experts:
        raise UsageError(f"--n-experts-per-token {config.n_experts_per_token}: the model is dense; give --n-experts too")
    if config.router_aux_loss_coef != TrainConfig.router_aux_loss_coef and not model_config.n_experts:
        raise UsageError(f"--router-aux-loss-coef {config.router_aux_loss_coef}: the model is dense (no router); "
                         "give --n-experts too")
    return Transformer(model_config)
