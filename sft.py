"""Supervised fine-tuning on chat data, full or LoRA, with the loss on the assistant's tokens only.

    python sft.py --init out/base --data ../shared/data/sft/identity.json --set name=nanollm --out-dir out/sft
    python sft.py --init out/base --data ../shared/data/sft/alpaca_en_demo.json --lora-rank 8 --out-dir out/lora
    python sft.py --init out/base --data a.json,b.jsonl --pack --max-len 512 --max-steps 1000

InstructGPT's SFT stage (Ouyang et al. 2022) with the masking of Alpaca/Vicuna's training code: each
conversation is rendered in ChatML (chat.py) and only the assistant's tokens, each turn's <|im_end|>
included (so the model learns to stop), are trained on:

    loss = sum_t loss_mask_t * CE_t / sum_t loss_mask_t          (system and user tokens: loss_mask 0)

`--lora-rank R` trains LoRA adapters (Hu et al. 2021, lora.py) on the frozen linear layers, QLoRA when
--init is quantized; `--pack` puts several examples in one sequence of --max-len tokens, each attending
only to itself with positions restarting at 0 (document masking), so no compute goes to padding.
Evaluation on held-out conversations: the masked loss, and the share of greedy answers that end with
<|im_end|> within --eval-new-tokens (the stop rate). The loop, schedule and checkpoints are training.py's.
Outputs in --out-dir: ckpt.pt (the full model, adapters merged: every stage loads it), adapter.pt with
--lora-rank, the tokenizer, sft_config.json, metrics.jsonl, loss.png, summary.json.
"""
import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from chat import (IM_END, PAD, ChatDataError, chat_token_ids, load_chat_files, pad_batch, parse_placeholders,
                  prompt_ids, tokenize_conversations)
from common import UsageError, check_tokenizer, check_trainable, load_model, load_tokenizer, resolve_device
from evaluate import held_out_loss
from lora import apply_lora
from sample import generate
from training import (ExampleSampler, RunConfig, RunDir, TrainingError, check_finite, main_of, make_optimizer,
                      mixed_precision, opt, rng_state, seed_everything, set_lr)


# ----------------------------------------------------------------------------------------------------------
# The loss, on examples or packed sequences

def masked_loss(model, inputs, targets, loss_mask, doc_ids=None):
    """sum(loss_mask * CE) / sum(loss_mask): the mean cross-entropy of the trained tokens (weights allowed),
    plus a mixture-of-experts model's router losses in training."""
    logits, _ = model(inputs, doc_ids=doc_ids)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * loss_mask.flatten()).sum() / loss_mask.sum().clamp(min=1) + model.router_loss(), loss_mask.sum()


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


# ----------------------------------------------------------------------------------------------------------
# Evaluation: greedy answers to held-out prompts

def prompt_room(max_seq_len: int, max_new_tokens: int) -> int:
    """Prompt tokens that fit beside max_new_tokens answer tokens and the one that tells whether it stopped."""
    return max_seq_len - max_new_tokens - 1


@torch.no_grad()
def answer(model, tokenizer, conversations, max_new_tokens: int, batch_size: int = 16):
    """Greedy answers to each conversation's prompt -> [(text, stopped)], stopped = ended with <|im_end|>."""
    end = chat_token_ids(tokenizer)[IM_END]
    keep = prompt_room(model.config.max_seq_len, max_new_tokens)  # long prompts lose their oldest tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{model.config.max_seq_len} tokens")
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
# Config and the loop

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
    # sft.py's defaults of RunConfig's options (their help is RunConfig's)
    max_steps: int = 300
    lr: float = opt(1e-4, "peak learning rate (LoRA usually wants ~10x more than full fine-tuning)")
    min_lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_interval: int = 100


SFT_PRESETS = {
    # the identity benchmark on a 2-core CPU (python -m bench.sft --benchmark identity)
    "cpu-identity": dict(max_len=128, batch_size=8, max_steps=150, lr=1e-3, min_lr=1e-4, warmup_steps=10,
                         eval_fraction=0.0, eval_interval=50, eval_prompts=8),
    # Alpaca EN/ZH: half the answers are longer than 130 tokens, so the eval lets them run to 192
    "cpu-alpaca": dict(max_len=256, batch_size=8, max_steps=400, lr=1e-3, min_lr=1e-4, eval_interval=100,
                       eval_prompts=50, eval_new_tokens=192),
    # peak memory only (python -m bench.sft --benchmark alpaca|memory): a few steps, no evaluation
    "cpu-memory": dict(max_len=128, batch_size=2, max_steps=3, warmup_steps=1, eval_fraction=0.0, eval_prompts=0),
}


def finetune(config: SFTConfig) -> dict:
    if not config.init or not config.data:
        raise UsageError("--init (the model to fine-tune) and --data (chat files) are required")
    run = RunDir(config, "sft")
    if run.finished:
        return run.finished
    device = resolve_device(config.device)
    _, autocast, scaler = mixed_precision(config.dtype, device)
    seed_everything(config.seed)

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
    asks_prompts = config.eval_prompts > 0 and len(eval_conversations) > 0  # answers generated at each eval
    if asks_prompts and prompt_room(model.config.max_seq_len, config.eval_new_tokens) < 1:  # now, not at the first eval
        raise UsageError(f"--eval-new-tokens {config.eval_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.config.max_seq_len} tokens: lower it")
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

    if run.resuming:
        ckpt = run.checkpoint
        run.load_weights(model, lora=bool(config.lora_rank))
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state(ckpt["sampler"])
    step = run.start()
    tokenizer.save(run.path / "tokenizer")

    def save():
        run.save_checkpoint(model, lora=bool(config.lora_rank), optimizer=optimizer.state_dict(),
                            sampler=sampler.state(), rng=rng_state(), step=step, elapsed=run.elapsed(),
                            sft_config=asdict(config), tokenizer="tokenizer")

    eval_prompts = [prompt_of(c) for c in eval_conversations[:config.eval_prompts]]

    @run.timed_eval
    def run_eval():
        model.eval()
        with autocast:
            metrics = {"val_loss": held_out_loss(model, eval_examples, pad_id, config.batch_size, device)} \
                if eval_examples else {}
            if eval_prompts:
                answers = answer(model, tokenizer, eval_prompts, config.eval_new_tokens)
                metrics["stop_rate"] = sum(stopped for _, stopped in answers) / len(answers)
                metrics["sample_answer"] = answers[0][0][:200]
        model.train()
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        if metrics:
            print(f"eval step {step}: {shown}" + (f" | answer: {metrics['sample_answer']!r}" if eval_prompts else ""))
        run.record({"step": step, **metrics})
        run.plot()
        return metrics

    initial = run_eval() if step == 0 else run.rows()[0]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    window_tokens = 0
    while not (stop_reason := run.stop_reason(step)):
        lr = set_lr(optimizer, config, step, run.elapsed())
        loss_sum = 0.0
        for _ in range(config.grad_accum):
            batch = make_batch([items[i] for i in sampler.next_indices()], pad_id, device, config.pack)
            # forward: the masked loss of the assistant's tokens
            with autocast:
                loss, n_tokens = masked_loss(model, *batch)
            # backward (the scaler is a no-op unless fp16)
            scaler.scale(loss / config.grad_accum).backward()
            loss_sum += loss.item() / config.grad_accum
            window_tokens += batch[0].numel()
        # clip
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
        # step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        check_finite(loss_sum, step, run.ckpt_path)
        step += 1
        # log
        if run.log_due(step):
            _, window_s, eta = run.lap(step)
            tokens_per_s, window_tokens = window_tokens / window_s, 0
            run.log_step(step, eta, [f"loss {loss_sum:.4f}", f"lr {lr:.2e}", f"grad norm {grad_norm.item():.3f}",
                                     f"{tokens_per_s:,.0f} tok/s"],
                         {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s})
        if run.eval_due(step):
            run_eval()
            save()

    final = run_eval()
    save()
    summary = {**{f"initial_{k}": v for k, v in initial.items() if k in ("val_loss", "stop_rate")}, **final,
               "train_examples": len(examples), "eval_examples": len(eval_examples), "truncated": stats["truncated"],
               "dropped": stats["dropped"], "trainable_params": counts["trainable"], "total_params": counts["total"],
               "grad_and_adam_mb": counts["trainable"] * 12 / 2**20}  # fp32 gradient + AdamW's two moments
    result = " | ".join(([f"val loss {initial.get('val_loss', float('nan')):.4f} -> {final['val_loss']:.4f}"]
                         if "val_loss" in final else [])
                        + ([f"stop rate {initial['stop_rate']:.0%} -> {final['stop_rate']:.0%}"]
                           if "stop_rate" in final else []))
    return run.finish(summary, step, stop_reason, device, result)

def main(argv=None):
    main_of(SFTConfig, SFT_PRESETS, __doc__.split("\n\n")[0], finetune, argv, errors=(ChatDataError,))

if __name__ == "__main__":
    main()
