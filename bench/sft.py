"""sft.py's fine-tuning measured on held-out prompts and in memory, before and after, in one run:

    python -m bench.sft --benchmark identity --init out/base      # does the model learn its new name?
    python -m bench.sft --benchmark alpaca --init out/base        # template following EN/ZH, LoRA vs full
    python -m bench.sft --benchmark memory --init out/base        # peak memory of full vs LoRA fine-tuning

identity: fine-tune on identity.json (preset cpu-identity) and ask 20 held-out "who are you?" prompts
worded unlike the training file; the reference is the same model before SFT: the share of answers that
say "nanollm" and that end with <|im_end|>. alpaca: full fine-tuning against LoRA r=8 (plus a rank-1
adapter on the tied embedding) on alpaca_en_demo and alpaca_zh_demo, each run in its own process so its
peak memory is its own: held-out loss and stop rate before/after, trainable parameters, grad+AdamW
memory, peak RSS, time. memory (also after alpaca): the same full/LoRA pair for 3 steps on a randomly
initialised 63M-parameter model (MEMORY_SHAPE), where weights, gradients and AdamW's moments dominate
the peak as on real model sizes. Every other flag is sft.py's (python -m bench.sft --help).
"""
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from chat import load_conversations
from common import load_model, load_tokenizer, read_checkpoint, save_checkpoint
from model import ModelConfig, Transformer
from sft import SFT_PRESETS, SFTConfig, answer, finetune
from training import TrainingError, main_of, opt

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SFTBenchConfig(SFTConfig):
    benchmark: str = opt("identity", "identity | alpaca (includes memory) | memory",
                         choices=["identity", "alpaca", "memory"])
    data_dir: str = opt("../shared/data", "the shared data folder the benchmarks read")


def run_config(config: SFTBenchConfig, **changes) -> SFTConfig:
    """The sft.py run of one benchmark row: config's sft.py options with `changes`."""
    return SFTConfig(**{**{f.name: getattr(config, f.name) for f in fields(SFTConfig)}, **changes})


# "Who are you?" in words that are not in identity.json: does the model answer with its new name?
IDENTITY_HELD_OUT = [
    "Who are you, exactly?", "What should I call you?", "What's your name?", "Please introduce yourself.",
    "Could you tell me who you are?", "Who am I talking to?", "Introduce yourself, please.", "Tell me your name.",
    "What do people call you?", "May I know your name?", "Who is this?", "Are you an AI assistant? What is your name?",
    "Hey, who are you?", "Hello! Who am I chatting with?", "Give me a short introduction of yourself.",
    "What is your name, assistant?", "Describe yourself in one sentence.", "Who made you and what is your name?",
    "Say your name.", "I'd like to know who you are."]


def identity_rates(ckpt_dir, max_new_tokens: int = 48) -> dict:
    model, tokenizer = load_model(ckpt_dir), load_tokenizer(ckpt_dir)
    answers = answer(model, tokenizer, [[{"role": "user", "content": q}] for q in IDENTITY_HELD_OUT], max_new_tokens)
    return {"says_name": sum("nanollm" in text.lower() for text, _ in answers) / len(answers),
            "stops": sum(stopped for _, stopped in answers) / len(answers), "prompts": len(answers),
            "examples": [f"{q} -> {text}" for q, (text, _) in zip(IDENTITY_HELD_OUT[:3], answers)]}


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("=", "")


def run_isolated(run: SFTConfig) -> dict:
    """finetune(run) in a fresh process, so that its peak memory is its own -> its summary.json."""
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(asdict(run)))  # the run's config, beside its results
    code = subprocess.run([sys.executable, str(REPO / "sft.py"), "--config", str(out / "run.json")]).returncode
    if code:
        raise TrainingError(f"benchmark run {out} failed (exit {code}; its error is above)")
    return json.loads((out / "summary.json").read_text())


# 63M parameters with an 8k vocabulary: fp32 weights (4 bytes each), their gradients (4) and AdamW's two
# moments (8) then outweigh the ~0.5 GB torch and the activations take, as on real model sizes
MEMORY_SHAPE = dict(dim=768, n_layers=8, n_heads=12, n_kv_heads=12, head_dim=64, hidden_dim=2048)


def memory_base(init: str, out_dir: Path) -> str:
    """A randomly initialised MEMORY_SHAPE model with init's vocabulary and tokenizer, saved as a checkpoint."""
    tokenizer = load_tokenizer(init)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**read_checkpoint(init)["model_config"], **MEMORY_SHAPE}))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir / "tokenizer")
    save_checkpoint(out_dir, model, tokenizer="tokenizer")
    return str(out_dir)


def bench(config: SFTBenchConfig) -> None:
    if not config.init:
        raise TrainingError("--init is required: the pretrained model to fine-tune")
    data = Path(config.data_dir) / "sft"
    out = Path(config.out_dir)
    rows, result = [], {}
    if config.benchmark == "identity":
        train_questions = {c[0]["content"].strip().lower() for c in load_conversations(data / "identity.json")[0]}
        assert not train_questions & {q.lower() for q in IDENTITY_HELD_OUT}, "a held-out prompt is in the training file"
        before = identity_rates(config.init)
        run = run_config(config, **SFT_PRESETS["cpu-identity"], data=str(data / "identity.json"),
                      set=["name=nanollm", "author=the nanollm authors"], out_dir=str(out / "identity"))
        summary = finetune(run)
        after = identity_rates(run.out_dir)
        result = {"before": before, "after": after, "steps": summary["step"], "wall_time_s": summary["wall_time_s"]}
        rows = [("before SFT", before), ("after SFT", after)]
        print(f"\n| {len(IDENTITY_HELD_OUT)} held-out prompts | answer says 'nanollm' | answer ends with <|im_end|> |\n|---|---:|---:|")
        for name, r in rows:
            print(f"| {name} | {r['says_name']:.0%} | {r['stops']:.0%} |")
        print("\n".join(after["examples"]))
    elif config.benchmark == "alpaca":  # template following in EN and ZH, and LoRA against full fine-tuning
        print("\n| run | trainable params | eval loss before | after | stop rate before | after | at each eval | "
              "grad+Adam MB | peak RSS MB | wall s |\n|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
        # LoRA: r=8 on the seven projections plus a rank-1 adapter on the tied embedding/LM head (the frozen
        # embedding, 55% of this model, is most of what LoRA on the linears alone misses; README)
        for name, file, rank in [("zh full", "alpaca_zh_demo.json", 0), ("zh LoRA r=8", "alpaca_zh_demo.json", 8),
                                 ("en full", "alpaca_en_demo.json", 0), ("en LoRA r=8", "alpaca_en_demo.json", 8)]:
            preset = dict(SFT_PRESETS["cpu-alpaca"])
            preset["lr"] *= 5 if rank else 1  # adapters start at zero and want a larger step
            s = result[name] = run_isolated(run_config(config, **preset, data=str(data / file), lora_rank=rank,
                                                    lora_embedding_rank=1 if rank else 0, out_dir=str(out / slug(name))))
            rows = [json.loads(r) for r in (out / slug(name) / "metrics.jsonl").read_text().splitlines()]
            s["stop_rate_by_step"] = {r["step"]: r["stop_rate"] for r in rows if "stop_rate" in r}
            print(f"| {name} | {s['trainable_params']:,} ({s['trainable_params'] / s['total_params']:.1%}) | "
                  f"{s['initial_val_loss']:.3f} | {s['val_loss']:.3f} | {s['initial_stop_rate']:.0%} | "
                  f"{s['stop_rate']:.0%} | {' '.join(f'{r:.0%}' for r in s['stop_rate_by_step'].values())} | "
                  f"{s['grad_and_adam_mb']:.1f} | {s['peak_memory_mb']:.0f} | {s['wall_time_s']:.0f} |", flush=True)
    if config.benchmark in ("alpaca", "memory"):
        # Peak memory where the weights dominate: at 2M parameters torch itself and the activations set the peak
        # RSS, so the same full/LoRA pair runs a few steps on a randomly initialised model of MEMORY_SHAPE.
        base = memory_base(config.init, out / "memory_base")
        print("\n| 3 steps on a MEMORY_SHAPE model | parameters | trainable | grad+Adam MB | "
              "peak memory MB |\n|---|---:|---:|---:|---:|")
        for name, rank in [("memory full", 0), ("memory LoRA r=8", 8)]:
            s = result[name] = run_isolated(run_config(config, **SFT_PRESETS["cpu-memory"], init=base,
                                                    data=str(data / "alpaca_en_demo.json"), lora_rank=rank,
                                                    lora_embedding_rank=1 if rank else 0,
                                                    out_dir=str(out / slug(name))))
            print(f"| {name} | {s['total_params'] / 1e6:.1f}M | {s['trainable_params']:,} | "
                  f"{s['grad_and_adam_mb']:.0f} | {s['peak_memory_mb']:.0f} |", flush=True)
    (out / f"bench_{config.benchmark}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))


def main(argv=None):
    main_of(SFTBenchConfig, SFT_PRESETS, __doc__.split("\n\n")[0], bench, argv)


if __name__ == "__main__":
    main()
