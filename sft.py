"""Supervised fine-tuning on chat data: full or LoRA, with the loss on the assistant's tokens only.

    python sft.py --init out/base --data ../shared/data/sft/identity.json --set name=nanollm --out-dir out/sft
    python sft.py --init out/base --data ../shared/data/sft/alpaca_en_demo.json --lora-rank 8 --out-dir out/lora
    python sft.py --init out/base --data a.json,b.jsonl --pack --max-len 512 --max-steps 1000

The recipe (InstructGPT's SFT stage; the masking of Alpaca/Vicuna's training code):
- conversations in ChatML (chat.py), from Alpaca, ShareGPT or OpenAI-messages files, `{{name}}`
  placeholders filled by `--set name=VALUE`;
- the loss is the cross-entropy of the assistant's tokens, including each turn's `<|im_end|>` so the
  model learns to stop: sum(loss_mask * CE) / sum(loss_mask), system and user tokens masked;
- full fine-tuning, or `--lora-rank R`: LoRA adapters (lora.py) on the linear layers, the rest frozen;
  QLoRA when --init is a quantized checkpoint (quant.py --out): the adapters train on the frozen
  QuantLinear layers and the saved ckpt.pt is the merged model in full precision;
- `--pack`: several examples share one sequence of `--max-len` tokens, each attending only to itself with
  its positions restarting at 0 (document masking), so no compute goes to padding;
- AdamW with warmup + cosine, checkpoints that resume bit for bit, metrics.jsonl, loss.png, summary.json,
  as in train.py. The evaluation holds out `--eval-fraction` of the conversations (or `--eval-data`):
  masked loss, and the template metrics of greedy answers to the held-out prompts: the share that
  end with `<|im_end|>` (the model stops) within `--eval-new-tokens`.
Outputs in --out-dir: ckpt.pt (the full model, adapters merged, loadable by sample.py and every stage),
adapter.pt with --lora-rank (the adapters alone), the tokenizer, metrics, loss.png, summary.json.
"""
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chat import (IM_END, PAD, ChatDataError, chat_token_ids, load_conversations, pad_batch, parse_placeholders,
                  prompt_ids, tokenize_conversations)
from common import (CHECKPOINT_FILE, RunConfig, append_jsonl, atomic_write, check_trainable, load_model,
                    load_tokenizer, opt, parse_config, peak_memory_mb, read_checkpoint, resolve_device,
                    save_checkpoint, truncate_metrics)
from common import check_resume, check_tokenizer
from lora import apply_lora, lora_state_dict, merged_state_dict, save_adapter
from model import ModelConfig, Transformer
from train import (StepTimer, TrainingError, format_seconds, make_optimizer, plot_losses, progress_line, rng_state,
                   set_lr, set_rng_state)


@dataclass
class SFTConfig(RunConfig):
    init: str = opt("", "the model to fine-tune: a nanollm checkpoint directory or a Hugging Face directory")
    data: str = opt("", "chat data: comma-separated .json/.jsonl files (alpaca, sharegpt or messages format)")
    eval_data: str = opt("", "held-out chat data (default: --eval-fraction of --data)")
    out_dir: str = opt("out/sft", "where the checkpoint, adapter, metrics and summary go")
    set: list = field(default_factory=list, metadata={"append": True, "help": "fill a {{KEY}} placeholder: KEY=VALUE"})
    tokenizer: str = opt("", "tokenizer file (default: the one beside --init)")
    max_len: int = opt(512, "longest example in tokens (raises the model's max_seq_len if needed)")
    truncate: str = opt("left", "longer examples: drop the oldest turns/tokens ('left') or the example ('drop')",
                        choices=["left", "drop"])
    skip_bad_records: bool = opt(False, "skip records with missing/bad fields (counted) instead of stopping")
    pack: bool = opt(False, "pack several examples per sequence with document masking")
    think_weight: float = opt(1.0, "loss weight of <think>...</think> reasoning tokens (0: masked)")
    # LoRA
    lora_rank: int = opt(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: float = opt(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA adapters' input")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "comma-separated layer names (or Meta names wq,wk,wv,wo,w1,w2,w3) to adapt")
    rslora: bool = opt(False, "scale LoRA by alpha / sqrt(rank) (rsLoRA)")
    lora_embedding_rank: int = opt(0, "with --lora-rank: rank of a LoRA adapter on the token embedding and the LM "
                                      "head tied to it (0: frozen; 1 adds vocab + dim parameters)")
    # batches
    batch_size: int = opt(8, "examples (or packed sequences) per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    # evaluation
    eval_fraction: float = opt(0.05, "share of --data held out for evaluation when --eval-data is not given")
    eval_prompts: int = opt(16, "held-out prompts answered greedily at each eval (template metrics)")
    eval_new_tokens: int = opt(64, "longest generated answer at eval")
    # system
    dtype: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16",
                     choices=["auto", "float32", "bfloat16"])
    bench: str = opt("", "run a benchmark instead (README): identity | alpaca (includes memory) | memory",
                     choices=["", "identity", "alpaca", "memory"])
    data_dir: str = opt("../shared/data", "the shared data folder the benchmarks read")
    # sft.py's defaults of RunConfig's options (their help is RunConfig's)
    max_steps: int = 300
    lr: float = opt(1e-4, "peak learning rate (LoRA usually wants ~10x more than full fine-tuning)")
    min_lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_interval: int = 100


SFT_PRESETS = {
    # the identity benchmark on a 2-core CPU (sft.py --bench identity)
    "cpu-identity": dict(max_len=128, batch_size=8, max_steps=150, lr=1e-3, min_lr=1e-4, warmup_steps=10,
                         eval_fraction=0.0, eval_interval=50, eval_prompts=8),
    # Alpaca EN/ZH: half the answers are longer than 130 tokens, so the eval lets them run to 192
    "cpu-alpaca": dict(max_len=256, batch_size=8, max_steps=400, lr=1e-3, min_lr=1e-4, eval_interval=100,
                       eval_prompts=50, eval_new_tokens=192),
    # peak memory only (sft.py --bench alpaca|memory): a few steps, no evaluation
    "cpu-memory": dict(max_len=128, batch_size=2, max_steps=3, warmup_steps=1, eval_fraction=0.0, eval_prompts=0),
}


# ----------------------------------------------------------------------------------------------------------
# Data

def load_chat_files(paths: str, placeholders: dict, skip_bad_records: bool) -> list:
    conversations = []
    for path in filter(None, (p.strip() for p in paths.split(","))):
        found, skipped = load_conversations(path, placeholders, skip_bad_records)
        print(f"{path}: {len(found):,} conversations" + (f" ({skipped} bad records skipped)" if skipped else ""))
        conversations += found
    if not conversations:
        raise TrainingError(f"no conversations in {paths!r}")
    return conversations


def pack_examples(examples, max_len: int, pad_id: int):
    """Greedy first-fit packing into sequences of max_len tokens -> list of (ids, loss_mask, doc_ids).

    doc_ids numbers the examples inside a sequence (1, 2, ...; 0 is padding): attention and positions
    follow it, so packing changes no example's loss."""
    bins = []  # [ids, mask, doc_ids]
    for ids, mask in sorted(examples, key=lambda e: -len(e[0])):
        target = next((b for b in bins if len(b[0]) + len(ids) <= max_len), None)
        if target is None:
            target = [[], [], []]
            bins.append(target)
        doc = (target[2][-1] if target[2] else 0) + 1
        target[0] += ids
        target[1] += mask
        target[2] += [doc] * len(ids)
    return bins


class ExampleSampler:
    """Shuffled passes over the examples; its generator state is checkpointed, so resume is exact."""

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


def make_batch(items, pad_id: int, device, packed: bool):
    """(inputs, targets, loss_mask, doc_ids or None) for a list of examples or packed sequences."""
    if not packed:
        return (*pad_batch(items, pad_id, device), None)
    inputs, targets, loss_mask = pad_batch([(ids, mask) for ids, mask, _ in items], pad_id, device)
    doc_ids = torch.zeros_like(inputs)
    for row, (_, _, docs) in enumerate(items):
        doc_ids[row, :len(docs) - 1] = torch.tensor(docs[:-1])
    # a target that belongs to the next example is not predictable from this one's context
    same_doc = torch.zeros_like(loss_mask)
    for row, (_, _, docs) in enumerate(items):
        d = torch.tensor(docs)
        same_doc[row, :len(docs) - 1] = (d[1:] == d[:-1]).float()
    return inputs, targets, loss_mask * same_doc, doc_ids.to(device)


def masked_loss(model, inputs, targets, loss_mask, doc_ids=None):
    """sum(loss_mask * CE) / sum(loss_mask): the mean cross-entropy of the trained tokens (weights allowed)."""
    logits, _ = model(inputs, doc_ids=doc_ids)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * loss_mask.flatten()).sum() / loss_mask.sum().clamp(min=1), loss_mask.sum()


# ----------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def eval_loss(model, examples, pad_id: int, batch_size: int, device) -> float:
    """Masked cross-entropy over every held-out example (token-weighted)."""
    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        inputs, targets, loss_mask = pad_batch(examples[i:i + batch_size], pad_id, device)
        loss, n = masked_loss(model, inputs, targets, loss_mask)
        total, count = total + loss.item() * n.item(), count + n.item()
    return total / max(count, 1)


@torch.no_grad()
def answer(model, tokenizer, conversations, max_new_tokens: int, batch_size: int = 16):
    """Greedy answers to each conversation's prompt -> [(text, stopped)], stopped = ended with <|im_end|>."""
    from sample import generate
    end = chat_token_ids(tokenizer)[IM_END]
    keep = model.config.max_seq_len - max_new_tokens - 1  # long prompts lose their oldest tokens
    if keep < 1:
        raise ValueError(f"--eval-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{model.config.max_seq_len} tokens: lower it")
    out = []
    for i in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tokenizer, c)[-keep:] for c in conversations[i:i + batch_size]]
        new = generate(model, prompts, max_new_tokens=max_new_tokens + 1, temperature=0.0, stop_tokens=[end])
        for p, tokens in zip(prompts, new):
            stopped = len(tokens) <= max_new_tokens and len(p) + len(tokens) < model.config.max_seq_len
            out.append((tokenizer.decode(tokens[:max_new_tokens].tolist()), stopped))
    return out


def prompt_of(conversation):
    """The conversation up to (not including) its last assistant message."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last]


# ----------------------------------------------------------------------------------------------------------

def finetune(config: SFTConfig) -> dict:
    if not config.init or not config.data:
        raise TrainingError("--init (the model to fine-tune) and --data (chat files) are required")
    device = resolve_device(config.device)
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    tokenizer = load_tokenizer(config.init, config.tokenizer or None)
    check_tokenizer(config.init, tokenizer, config.tokenizer or None)
    pad_id = chat_token_ids(tokenizer)[PAD]
    placeholders = parse_placeholders(config.set)
    conversations = load_chat_files(config.data, placeholders, config.skip_bad_records)
    if config.eval_data:
        eval_conversations = load_chat_files(config.eval_data, placeholders, config.skip_bad_records)
    else:
        random.Random(config.seed).shuffle(conversations)
        n_eval = int(len(conversations) * config.eval_fraction)
        eval_conversations, conversations = conversations[:n_eval], conversations[n_eval:]
    examples, stats = tokenize_conversations(tokenizer, conversations, config.max_len, config.truncate,
                                             config.think_weight)
    eval_examples, _ = tokenize_conversations(tokenizer, eval_conversations, config.max_len, config.truncate,
                                              config.think_weight)
    if not examples:
        raise TrainingError(f"every example is longer than --max-len {config.max_len} (dropped); raise it")
    print(f"{len(examples):,} training examples ({stats['truncated']} truncated, {stats['dropped']} dropped at "
          f"--max-len {config.max_len}), {len(eval_examples):,} held out; "
          f"{sum(sum(1 for w in m[1:] if w) for _, m in examples):,} trained tokens")
    items = pack_examples(examples, config.max_len, pad_id) if config.pack else examples

    model = load_model(config.init, device=device)
    check_trainable(model, config.init, config.lora_rank)
    if config.max_len > model.config.max_seq_len:  # RoPE's table grows on demand: just allow longer inputs
        model.config.max_seq_len = config.max_len
    largest_id = max([len(tokenizer.ranks) - 1, *tokenizer.special_tokens.values()])
    if largest_id >= model.config.vocab_size:
        raise TrainingError(f"the tokenizer's ids go up to {largest_id}, beyond the model's vocab_size {model.config.vocab_size}")
    counts = {"trainable": model.num_params(), "total": model.num_params()}
    if config.lora_rank:
        counts = apply_lora(model, config.lora_targets.split(","), config.lora_rank, config.lora_alpha,
                            config.lora_dropout, config.rslora, config.lora_embedding_rank)
    print(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['trainable'] / 1e6:.3f}M trainable "
          f"({counts['trainable'] / counts['total']:.2%}){' (LoRA r=%d)' % config.lora_rank if config.lora_rank else ''}")
    optimizer = make_optimizer(model, config, device)
    sampler = ExampleSampler(len(items), config.batch_size, config.seed)

    out_dir = Path(config.out_dir)
    step, elapsed_before = 0, 0.0
    if config.resume and (out_dir / CHECKPOINT_FILE).exists():
        ckpt = read_checkpoint(out_dir)
        check_resume(ckpt, model.config, out_dir / CHECKPOINT_FILE)
        if config.lora_rank:
            model.load_state_dict(ckpt["lora"], strict=False)
        else:
            model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        step, elapsed_before = ckpt["step"], ckpt["elapsed"]
        truncate_metrics(out_dir / "metrics.jsonl", step)
        print(f"resumed from {out_dir / CHECKPOINT_FILE} at step {step}")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.jsonl").write_text("")
    tokenizer.save(out_dir / "tokenizer")
    (out_dir / "sft_config.json").write_text(json.dumps(asdict(config), indent=2))

    def save():
        state = {"optimizer": optimizer.state_dict(), "sampler": sampler.state(), "rng": rng_state(), "step": step,
                 "elapsed": elapsed, "sft_config": asdict(config), "tokenizer": "tokenizer"}
        if config.lora_rank:  # the merged model for every later stage, the adapters to resume from
            save_adapter(model, out_dir / "adapter.pt")
            state["lora"] = lora_state_dict(model)
            payload = {"model": merged_state_dict(model), "model_config": asdict(model.config), **state}
            atomic_write(out_dir / CHECKPOINT_FILE, lambda tmp: torch.save(payload, tmp))
        else:
            save_checkpoint(out_dir, model, **state)

    def record(row):
        append_jsonl(out_dir / "metrics.jsonl", row)

    eval_prompts = [prompt_of(c) for c in eval_conversations[:config.eval_prompts]]

    def run_eval():
        model.eval()
        with autocast:
            metrics = {"val_loss": eval_loss(model, eval_examples, pad_id, config.batch_size, device)} \
                if eval_examples else {}
            if eval_prompts:
                answers = answer(model, tokenizer, eval_prompts, config.eval_new_tokens)
                metrics["stop_rate"] = sum(stopped for _, stopped in answers) / len(answers)
                metrics["sample_answer"] = answers[0][0][:200]
        model.train()
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        if metrics:
            print(f"eval step {step}: {shown}" + (f" | answer: {metrics['sample_answer']!r}" if eval_prompts else ""))
        record({"step": step, **metrics})
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        return metrics

    if step == 0:
        initial = run_eval()
    else:
        initial = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
    model.train()
    t_start = time.time()
    elapsed = elapsed_before
    timer, window_tokens = StepTimer(config, step), 0
    stop_reason = "max_steps"
    while step < config.max_steps:
        lr = set_lr(optimizer, config, step, elapsed)
        loss_sum = 0.0
        for _ in range(config.grad_accum):
            batch = make_batch([items[i] for i in sampler.next_indices()], pad_id, device, config.pack)
            with autocast:
                loss, n_tokens = masked_loss(model, *batch)
            (loss / config.grad_accum).backward()
            loss_sum += loss.item() / config.grad_accum
            window_tokens += batch[0].numel()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   config.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss_sum):
            raise TrainingError(f"loss is {loss_sum} at step {step + 1}; try a lower --lr")
        step += 1
        elapsed = elapsed_before + time.time() - t_start
        if step % config.log_interval == 0 or step == config.max_steps:
            _, window_s, eta = timer.lap(step, elapsed)
            tokens_per_s, window_tokens = window_tokens / window_s, 0
            print(progress_line(step, config.max_steps, eta, f"loss {loss_sum:.4f}", f"lr {lr:.2e}",
                                f"grad norm {grad_norm.item():.3f}", f"{tokens_per_s:,.0f} tok/s"))
            record({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm.item(),
                    "tokens_per_s": tokens_per_s, "elapsed": elapsed})
        if config.max_time and elapsed >= config.max_time:
            stop_reason = "max_time"
            break
        if step % config.eval_interval == 0 and step < config.max_steps:
            run_eval()
            save()
            timer.skip_pause()

    final = run_eval()
    save()
    summary = {**{f"initial_{k}": v for k, v in initial.items() if k in ("val_loss", "stop_rate")}, **final,
               "step": step, "stop_reason": stop_reason, "wall_time_s": elapsed, "train_examples": len(examples),
               "eval_examples": len(eval_examples), "truncated": stats["truncated"], "dropped": stats["dropped"],
               "trainable_params": counts["trainable"], "total_params": counts["total"],
               "grad_and_adam_mb": counts["trainable"] * 12 / 2**20,  # fp32 gradient + AdamW's two moments
               "peak_memory_mb": peak_memory_mb(device)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"done: {step} steps in {format_seconds(elapsed)} ({stop_reason})"
          + (f" | val loss {initial.get('val_loss', float('nan')):.4f} -> {final['val_loss']:.4f}" if "val_loss" in final else "")
          + (f" | stop rate {initial['stop_rate']:.0%} -> {final['stop_rate']:.0%}" if "stop_rate" in final else "")
          + f" | summary in {out_dir / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (README): python sft.py --bench identity|alpaca --init out/base

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
    code = subprocess.run([sys.executable, __file__, "--config", str(out / "run.json")]).returncode
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


def bench(config: SFTConfig) -> None:
    from dataclasses import replace
    if not config.init:
        raise TrainingError("--bench needs --init: the pretrained model to fine-tune")
    data = Path(config.data_dir) / "sft"
    out = Path(config.out_dir)
    rows, result = [], {}
    if config.bench == "identity":
        train_questions = {c[0]["content"].strip().lower() for c in load_conversations(data / "identity.json")[0]}
        assert not train_questions & {q.lower() for q in IDENTITY_HELD_OUT}, "a held-out prompt is in the training file"
        before = identity_rates(config.init)
        run = replace(config, **SFT_PRESETS["cpu-identity"], bench="", data=str(data / "identity.json"),
                      set=["name=nanollm", "author=the nanollm authors"], out_dir=str(out / "identity"))
        summary = finetune(run)
        after = identity_rates(run.out_dir)
        result = {"before": before, "after": after, "steps": summary["step"], "wall_time_s": summary["wall_time_s"]}
        rows = [("before SFT", before), ("after SFT", after)]
        print(f"\n| {len(IDENTITY_HELD_OUT)} held-out prompts | answer says 'nanollm' | answer ends with <|im_end|> |\n|---|---:|---:|")
        for name, r in rows:
            print(f"| {name} | {r['says_name']:.0%} | {r['stops']:.0%} |")
        print("\n".join(after["examples"]))
    elif config.bench == "alpaca":  # template following in EN and ZH, and LoRA against full fine-tuning
        print("\n| run | trainable params | eval loss before | after | stop rate before | after | at each eval | "
              "grad+Adam MB | peak RSS MB | wall s |\n|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
        # LoRA: r=8 on the seven projections plus a rank-1 adapter on the tied embedding/LM head (the frozen
        # embedding, 55% of this model, is most of what LoRA on the linears alone misses; README)
        for name, file, rank in [("zh full", "alpaca_zh_demo.json", 0), ("zh LoRA r=8", "alpaca_zh_demo.json", 8),
                                 ("en full", "alpaca_en_demo.json", 0), ("en LoRA r=8", "alpaca_en_demo.json", 8)]:
            preset = dict(SFT_PRESETS["cpu-alpaca"])
            preset["lr"] *= 5 if rank else 1  # adapters start at zero and want a larger step
            s = result[name] = run_isolated(replace(config, **preset, bench="", data=str(data / file), lora_rank=rank,
                                                    lora_embedding_rank=1 if rank else 0, out_dir=str(out / slug(name))))
            rows = [json.loads(r) for r in (out / slug(name) / "metrics.jsonl").read_text().splitlines()]
            s["stop_rate_by_step"] = {r["step"]: r["stop_rate"] for r in rows if "stop_rate" in r}
            print(f"| {name} | {s['trainable_params']:,} ({s['trainable_params'] / s['total_params']:.1%}) | "
                  f"{s['initial_val_loss']:.3f} | {s['val_loss']:.3f} | {s['initial_stop_rate']:.0%} | "
                  f"{s['stop_rate']:.0%} | {' '.join(f'{r:.0%}' for r in s['stop_rate_by_step'].values())} | "
                  f"{s['grad_and_adam_mb']:.1f} | {s['peak_memory_mb']:.0f} | {s['wall_time_s']:.0f} |", flush=True)
    if config.bench in ("alpaca", "memory"):
        # Peak memory where the weights dominate: at 2M parameters torch itself and the activations set the peak
        # RSS, so the same full/LoRA pair runs a few steps on a randomly initialised model of MEMORY_SHAPE.
        base = memory_base(config.init, out / "memory_base")
        print("\n| 3 steps on a MEMORY_SHAPE model | parameters | trainable | grad+Adam MB | "
              "peak memory MB |\n|---|---:|---:|---:|---:|")
        for name, rank in [("memory full", 0), ("memory LoRA r=8", 8)]:
            s = result[name] = run_isolated(replace(config, **SFT_PRESETS["cpu-memory"], bench="", init=base,
                                                    data=str(data / "alpaca_en_demo.json"), lora_rank=rank,
                                                    lora_embedding_rank=1 if rank else 0,
                                                    out_dir=str(out / slug(name))))
            print(f"| {name} | {s['total_params'] / 1e6:.1f}M | {s['trainable_params']:,} | "
                  f"{s['grad_and_adam_mb']:.0f} | {s['peak_memory_mb']:.0f} |", flush=True)
    (out / f"bench_{config.bench}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))


def main(argv=None):
    config = parse_config(SFTConfig, SFT_PRESETS, __doc__.split("\n\n")[0], argv)
    try:
        bench(config) if config.bench else finetune(config)
    except (TrainingError, ChatDataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
