"""dpo.py's preference training measured on held-out pairs and by generation, before and after, in one run:

    python -m bench.dpo --benchmark arithmetic --init out/sft_arith                  # verifiable: sums
    python -m bench.dpo --benchmark arithmetic --init out/sft_arith --bench-rejected model --loss ipo
    python -m bench.dpo --benchmark demo --init out/base                              # LLaMA-Factory demo pairs

arithmetic: DPO on right-vs-wrong sums (tasks.py; three wrong answers per training problem, off by 1-3 or
the SFT model's own wrong samples with --bench-rejected model) from an SFT model; measured on every
held-out question against the same SFT model (the reference, the first row): held-out reward accuracy,
the share of test pairs where log pi(right) > log pi(wrong), greedy accuracy checked by tasks.check.
demo: the sigmoid, ipo and simpo losses on dpo_en_demo and dpo_zh_demo: held-out reward accuracy and
margin curves (demo_curves.png) from step 0, where the policy is the reference.
Every other flag is dpo.py's (python -m bench.dpo --help).
"""
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from chat import IM_END, PAD, chat_token_ids, prompt_ids
from common import load_model, load_tokenizer, resolve_device
from dpo import DPO_PRESETS, DPOConfig, precompute_reference, tokenize_items, train
from sample import generate
from tasks import arithmetic_problems, check, preference_pairs, question_text, split_of
from training import format_seconds, main_of, opt


@dataclass
class DPOBenchConfig(DPOConfig):
    benchmark: str = opt("arithmetic", "arithmetic | demo", choices=["arithmetic", "demo"])
    bench_rejected: str = opt("random", "arithmetic benchmark's wrong answers: off by 1-3 ('random') or the --init "
                              "model's own wrong samples at temperature 1 ('model')", choices=["random", "model"])
    data_dir: str = opt(os.environ.get("NANOLLM_DATA", "../shared/data"), "the shared data folder (demo benchmark)")


def run_config(config: DPOBenchConfig, **changes) -> DPOConfig:
    """The dpo.py run of one benchmark row: config's dpo.py options with `changes`."""
    return DPOConfig(**{**{f.name: getattr(config, f.name) for f in fields(DPOConfig)}, **changes})


@torch.no_grad()
def answers_to(model, tokenizer, problems, temperature: float = 0.0, seed: int = 0, batch_size: int = 50) -> list[str]:
    """The model's answers to the problems' questions (greedy when temperature is 0)."""
    stop = chat_token_ids(tokenizer)[IM_END]
    answers = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, [{"role": "user", "content": p["question"]}]) for p in chunk]
        outputs = generate(model, prompts, max_new_tokens=16, temperature=temperature, seed=seed + start,
                           stop_tokens=[stop])
        answers += [tokenizer.decode(o.tolist()) for o in outputs]
    return answers


def greedy_accuracy(model, tokenizer, problems) -> tuple[float, list[str]]:
    """Share of problems whose greedy answer tasks.check accepts, and the answers."""
    answers = answers_to(model, tokenizer, problems)
    return sum(check(p, a) for p, a in zip(problems, answers)) / len(problems), answers


def model_rejected_pairs(model, tokenizer, problems, seed: int) -> list[dict]:
    """Pairs whose rejected answer is the model's own wrong sample (on-policy), else an off-by-1-3 one."""
    samples = answers_to(model, tokenizer, problems, temperature=1.0, seed=seed * 100003)
    return [{**pair, "rejected": sample} if sample.strip() and not check(p, sample) else pair
            for p, pair, sample in zip(problems, preference_pairs(problems, seed=seed), samples)]


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def bench_arithmetic(config: DPOBenchConfig) -> dict:
    """DPO on right-vs-wrong sums (tasks.py) from an SFT model; held-out reward accuracy and greedy accuracy."""
    out = Path(config.out_dir)
    n_test = sum(split_of(question_text([a, b, c])) == "test" for a in range(10) for b in range(10) for c in range(10))
    test = arithmetic_problems(n_test, "test")                       # every held-out question
    train_problems = arithmetic_problems(800, "train", seed=1)
    # three wrong answers per problem: the pairs vary, so the model learns sums rather than pairs
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.init)
    if config.bench_rejected == "model":
        sft = load_model(config.init, device=device).float()
        pairs = [p for seed in (1, 2, 3) for p in model_rejected_pairs(sft, tokenizer, train_problems, seed)]
    else:
        pairs = [p for seed in (1, 2, 3) for p in preference_pairs(train_problems, seed=seed)]
    write_jsonl(out / "train_pairs.jsonl", pairs)
    write_jsonl(out / "test_pairs.jsonl", preference_pairs(test, seed=2))
    run = run_config(config, data=str(out / "train_pairs.jsonl"), val_data=str(out / "test_pairs.jsonl"),
                  out_dir=str(out / f"run_{config.loss}"))
    rows = []
    for name, path in (("SFT (start)", config.init), (f"DPO ({config.loss})", None)):
        if path is None:
            train(run)
            path = run.out_dir
        model = load_model(path, device=device).float()
        greedy, answers = greedy_accuracy(model, tokenizer, test)
        seqs, _ = tokenize_items(tokenizer, preference_pairs(test, seed=2), run, model.config.max_seq_len)
        logps = precompute_reference(model, seqs, chat_token_ids(tokenizer)[PAD], 64, device)
        rows.append({"model": name, "likelihood_preference": (logps[:, 0] > logps[:, 1]).float().mean().item(),
                     "mean_logp_right": logps[:, 0].mean().item(), "greedy_accuracy": greedy, "example": answers[0]})
    summary = json.loads((Path(run.out_dir) / "summary.json").read_text())
    result = {"held_out_prompts": len(test), "train_pairs": 3 * len(train_problems), "steps": summary["step"],
              "wall_time_s": summary["wall_time_s"], "held_out_reward_accuracy": summary["val/rewards/accuracy"],
              "held_out_reward_margin": summary["val/rewards/margin"], "models": rows}
    print(f"\n{len(test)} held-out prompts, {3 * len(train_problems)} training pairs, {summary['step']} steps "
          f"({format_seconds(summary['wall_time_s'])})\n")
    print("| model | held-out reward accuracy | log pi(right) > log pi(wrong) | greedy accuracy | mean log pi(right) |")
    print("|---|---|---|---|---|")
    for row, acc in zip(rows, ("0 (policy = reference)", f"{summary['val/rewards/accuracy']:.1%}")):
        print(f"| {row['model']} | {acc} | {row['likelihood_preference']:.1%} | {row['greedy_accuracy']:.1%} | "
              f"{row['mean_logp_right']:.2f} |")
    (out / "bench_arithmetic.json").write_text(json.dumps(result, indent=2))
    return result


def bench_demo(config: DPOBenchConfig) -> dict:
    """sigmoid, ipo and simpo on dpo_en_demo / dpo_zh_demo: held-out reward accuracy and margin curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, data_dir = Path(config.out_dir), Path(config.data_dir)
    curves = {}
    for lang in ("en", "zh"):
        for loss in ("sigmoid", "ipo", "simpo"):
            run = run_config(config, loss=loss, data=str(data_dir / "preference" / f"dpo_{lang}_demo.json"),
                          out_dir=str(out / f"{lang}_{loss}"))
            summary = train(run)
            rows = [json.loads(line) for line in (Path(run.out_dir) / "metrics.jsonl").read_text().splitlines()]
            curves[lang, loss] = {"steps": [r["step"] for r in rows if "val/loss" in r],
                                  "accuracy": [r["val/rewards/accuracy"] for r in rows if "val/loss" in r],
                                  "margin": [r["val/rewards/margin"] for r in rows if "val/loss" in r],
                                  "wall_time_s": summary["wall_time_s"]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for i, lang in enumerate(("en", "zh")):
        for j, key in enumerate(("accuracy", "margin")):
            ax = axes[i, j]
            for loss in ("sigmoid", "ipo", "simpo"):
                ax.plot(curves[lang, loss]["steps"], curves[lang, loss][key], "o-", label=loss, markersize=3)
            ax.set_title(f"dpo_{lang}_demo: held-out reward {key}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "demo_curves.png", dpi=100)
    plt.close(fig)
    print("\n| data | loss | held-out reward accuracy (start -> end) | held-out margin (end) | time |")
    print("|---|---|---|---|---|")
    for (lang, loss), c in curves.items():
        print(f"| dpo_{lang}_demo | {loss} | {c['accuracy'][0]:.1%} -> {c['accuracy'][-1]:.1%} | {c['margin'][-1]:.3f} "
              f"| {format_seconds(c['wall_time_s'])} |")
    result = {f"{lang}_{loss}": c for (lang, loss), c in curves.items()}
    (out / "bench_demo.json").write_text(json.dumps(result, indent=2))
    return result


def bench(config: DPOBenchConfig) -> None:
    if not config.init:
        raise ValueError("--init is required: the model to start from (an SFT checkpoint for arithmetic)")
    (bench_arithmetic if config.benchmark == "arithmetic" else bench_demo)(config)


def main(argv=None):
    main_of(DPOBenchConfig, DPO_PRESETS, __doc__.split("\n\n")[0], bench, argv)


if __name__ == "__main__":
    main()
