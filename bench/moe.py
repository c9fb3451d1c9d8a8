"""Mixture of experts against the dense model at equal active parameters per token (docs/moe.md).

    python -m bench.moe --data data/shakespeare --tang data/tang       # every table, both corpora
    python -m bench.moe --only steps --steps 1500 --jobs 7 --data data/shakespeare --tang data/tang
    python -m bench.moe --only speed --data data/shakespeare --tang data/tang
    python -m bench.moe --curves out/bench_moe                         # eval curves of earlier runs
    python -m bench.moe --only dispatch                                # just the dispatch timing

Four tables, each with its reference in the same run:
- dispatch: one MoE layer forward + backward, the loop over experts (the reference) against the sorted
  dispatch, and a dense SwiGLU of the active width (k x hidden) as the floor both are measured against;
- speed: training steps of the dense model and the MoE models taken in turn in one process on the same
  batches, so load slows them alike and the tokens/s ratios hold;
- equal steps: the dense `cpu-shakespeare` model and MoE models with the same active parameters per
  token (4 experts top-1; 8 experts of half the width top-2; 4 experts top-1 without the load-balancing
  loss, on Tiny Shakespeare only), each trained for the same number of steps (load changes their times,
  not their bpb, so --jobs runs several at once);
- equal time: the same models under the same wall-clock budget, back to back (load shifts the steps each
  gets: the table prints the load average around every run).
Each training run is `python train.py` in its own process; its out-dir keeps metrics.jsonl and experts.png.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import read_checkpoint  # noqa: E402
from model import MLP, ModelConfig, Transformer  # noqa: E402
from moe import MoE  # noqa: E402
from training import TRAIN_PRESETS, BatchSampler, TrainConfig, load_split, make_optimizer, new_model, parse_config, read_meta  # noqa: E402

# name -> train.py flags on top of the preset: active FFN width per token 384 in every model
MODELS = {
    "dense": [],
    "moe 4x384 top-1": ["--n-experts", "4", "--n-experts-per-token", "1"],
    "moe 8x192 top-2": ["--n-experts", "8", "--n-experts-per-token", "2", "--hidden-dim", "192"],
    "moe 4x384 top-1, no aux loss": ["--n-experts", "4", "--n-experts-per-token", "1", "--router-aux-loss-coef", "0"],
}


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------------------
# Dispatch

def time_fn(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_dispatch(reps: int) -> None:
    print("\n## Dispatch: one MoE layer, forward + backward (median of "
          f"{reps}; torch threads {torch.get_num_threads()}; load {load_average()})\n")
    print("| layer | tokens | loop over experts (ms) | sorted (ms) | loop / sorted | dense SwiGLU of k x width (ms) | sorted / dense |")
    print("|---|---|---|---|---|---|---|")
    for dim, hidden, n_experts, k, n_tokens in [(128, 384, 4, 1, 768), (128, 192, 8, 2, 768), (384, 512, 16, 2, 4096)]:
        torch.manual_seed(0)
        config = ModelConfig.from_preset("tiny", dim=dim, n_heads=4, n_kv_heads=4, hidden_dim=hidden,
                                         n_experts=n_experts, n_experts_per_token=k)
        moe, dense = MoE(config, MLP), MLP(config, k * hidden)
        x = torch.randn(n_tokens, dim, requires_grad=True)

        def step(dispatch):
            _, _, weights, experts = moe.route(x)
            dispatch(x, weights, experts).sum().backward()

        loop = time_fn(lambda: step(moe.dispatch_loop), reps)
        ordered = time_fn(lambda: step(moe.dispatch_sorted), reps)
        floor = time_fn(lambda: dense(x).sum().backward(), reps)
        print(f"| dim {dim}, {n_experts} x {hidden}, top-{k} | {n_tokens} | {loop * 1e3:.2f} | {ordered * 1e3:.2f} "
              f"| {loop / ordered:.2f}x | {floor * 1e3:.2f} | {ordered / floor:.2f}x |")


# ----------------------------------------------------------------------------------------------------------
# Training speed, interleaved

def bench_speed(preset: str, data: str, steps: int, title: str) -> dict[str, float]:
    """Training steps of every model in MODELS (aux-loss variants aside), taken in turn in one process on
    the same batches: a burst of load slows them alike, so the ratios hold while absolute tokens/s do not.
    Returns each model's median tokens/s."""
    names = [n for n in MODELS if "no aux" not in n]
    runs = {}
    for name in names:
        config = parse_config(TrainConfig, TRAIN_PRESETS, "", ["--preset", preset, "--data", data, *MODELS[name]])
        meta = read_meta(Path(data))
        torch.manual_seed(0)
        model = new_model(config, meta["vocab_size"]).train()
        runs[name] = (model, make_optimizer(model, config, "cpu"), [])
    sampler = BatchSampler(load_split(Path(data), "train", meta), config.seq_len, config.batch_size, seed=0)
    tokens_per_step = config.seq_len * config.batch_size
    load_before = load_average()
    for step in range(steps + 1):                          # step 0 warms up and is not timed
        x, y = sampler.next_batch()
        for model, optimizer, times in runs.values():
            t = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - t)
    speed = {name: tokens_per_step / sorted(times)[len(times) // 2] for name, (_, _, times) in runs.items()}
    print(f"\n## {title}: training steps interleaved, median of {steps} each ({tokens_per_step} tokens per step; "
          f"torch threads {torch.get_num_threads()}; load {load_before} -> {load_average()})\n")
    print("| model | total params | active params / token | tokens/s | vs dense |")
    print("|---|---|---|---|---|")
    for name, (model, _, _) in runs.items():
        print(f"| {name} | {model.num_params() / 1e6:.2f}M | {model.num_params(active=True) / 1e6:.2f}M "
              f"| {speed[name]:,.0f} | {speed[name] / speed['dense']:.2f}x |")
    return speed


# ----------------------------------------------------------------------------------------------------------
# Training comparisons

def train_run(out_dir: Path, preset: str, data: str, flags: list[str], extra: list[str]) -> dict:
    """One `python train.py` run; its summary with the load average and the parameter counts added."""
    cmd = [sys.executable, str(REPO / "train.py"), "--preset", preset, "--data", data, "--out-dir", str(out_dir),
           "--sample-tokens", "0", *flags, *extra]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    load_before = load_average()
    log = subprocess.run(cmd, capture_output=True, text=True)
    if log.returncode:
        sys.exit(f"error: train.py failed ({out_dir}):\n{log.stderr[-2000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    with torch.device("meta"):  # shapes only
        model = Transformer(ModelConfig(**read_checkpoint(out_dir)["model_config"]))
    return {**summary, "active_params": model.num_params(active=True), "load": f"{load_before} -> {load_average()}"}


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n## {title}\n")
    print("| model | total params | active params / token | steps | wall s | tokens/s | val bpb | vs dense | "
          "expert share CV | aux loss | load avg (1/5/15 min) before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    dense = rows.get("dense", {}).get("val_bpb")
    for name, r in rows.items():
        cv = f"{r['moe_share_cv']:.3f}" if "moe_share_cv" in r else "-"
        aux = f"{r['moe_aux_loss']:.3f}" if "moe_aux_loss" in r else "-"
        delta = f"{r['val_bpb'] - dense:+.4f}" if dense is not None else "-"
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | {r['step']} "
              f"| {r['wall_time_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['val_bpb']:.4f} | {delta} | {cv} | {aux} "
              f"| {r['load']} |")


def print_curves(out: Path) -> None:
    """Val bpb (the periodic evals' first eval-tokens of the split: the same text for every model) and
    expert share CV at every eval of the equal-steps runs under out, finished or not."""
    for preset in ("cpu-shakespeare", "cpu-tang"):
        rows = {}
        for i, name in enumerate(MODELS):
            metrics = out / "steps" / f"{preset}-m{i}" / "metrics.jsonl"
            if metrics.exists():
                rows[name] = {r["step"]: r for r in map(json.loads, metrics.read_text().splitlines()) if "val_bpb" in r}
        steps = sorted(set.intersection(*(set(r) for r in rows.values()))) if rows else []
        if not steps:
            continue
        print(f"\n## `{preset}`: val bpb at each eval (expert share CV in brackets)\n")
        print("| model | " + " | ".join(f"step {s}" for s in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for name, r in rows.items():
            cells = [f"{r[s]['val_bpb']:.4f}" + (f" ({r[s]['moe_share_cv']:.2f})" if "moe_share_cv" in r[s] else "")
                     for s in steps]
            print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="prepared Tiny Shakespeare (data/prepare.py)")
    parser.add_argument("--tang", help="prepared Tang poems (data/prepare.py --vocab-size 8192); optional")
    parser.add_argument("--out-dir", default="out/bench_moe", help="one sub-directory per training run")
    parser.add_argument("--steps", type=int, default=120, help="steps of the equal-steps comparison")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of the equal-time comparison")
    parser.add_argument("--only", choices=["dispatch", "speed", "steps", "time"], help="run one table only")
    parser.add_argument("--curves", metavar="DIR", help="print the eval curves of the equal-steps runs in an earlier --out-dir DIR and exit")
    parser.add_argument("--reps", type=int, default=20, help="timing repetitions of the dispatch table")
    parser.add_argument("--jobs", type=int, default=1, help="equal-steps training runs at once (the time table runs one at a time)")
    parser.add_argument("--speed-steps", type=int, default=50, help="timed training steps per model of the speed table")
    args = parser.parse_args(argv)
    if args.curves:
        return print_curves(Path(args.curves))
    if args.only != "dispatch" and not args.data:
        parser.error("--data (a directory written by data/prepare.py) is needed for the training tables")
    for flag in ("data", "tang"):
        path = getattr(args, flag)
        if path and not (Path(path) / "meta.json").exists():
            parser.error(f"--{flag} {path}: no meta.json there (prepare it with data/prepare.py)")
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out-dir {out} is not empty; give a new directory (runs are never overwritten)")

    corpora = [("Tiny Shakespeare", "cpu-shakespeare", args.data)] + ([("Tang poems", "cpu-tang", args.tang)]
                                                                      if args.tang else [])
    if args.only in (None, "dispatch"):
        bench_dispatch(args.reps)
    if args.only in (None, "speed"):
        bench_speed("cpu-shakespeare", args.data, args.speed_steps, "Tiny Shakespeare")
        if args.tang:
            bench_speed("cpu-tang", args.tang, args.speed_steps, "Tang poems")
    if args.only in (None, "steps"):
        # equal steps: what a run computes does not depend on the load, so the runs may share the machine
        steps = ["--max-steps", str(args.steps), "--max-time", "0", "--eval-interval", str(max(args.steps // 6, 1)),
                 "--eval-tokens", "4096"]
        runs = [(title, preset, data, name) for title, preset, data in corpora
                for name in MODELS if preset == "cpu-shakespeare" or "no aux" not in name]
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(lambda run: train_run(out / "steps" / f"{run[1]}-m{list(MODELS).index(run[3])}",
                                                       run[1], run[2], MODELS[run[3]], steps), runs))
        for title, preset, _ in corpora:
            print_table(f"{title}, {args.steps} steps each (`{preset}`, cosine over the steps, no clock)",
                        {run[3]: r for run, r in zip(runs, done) if run[1] == preset})
    if args.only in (None, "time"):
        for title, preset, data in corpora:
            names = [n for n in MODELS if "no aux" not in n]
            rows = {name: train_run(out / "time" / f"{preset}-m{i}", preset, data, MODELS[name],
                                    ["--max-time", str(args.budget)])
                    for i, name in enumerate(names)}
            print_table(f"{title}, {args.budget:.0f} s each (`{preset}`, schedule on the clock)", rows)


if __name__ == "__main__":
    main()
