"""Pretrain a nanollm model from scratch on a prepared corpus (see data/prepare.py).

    python data/prepare.py --source ../shared/data/tinyshakespeare/input.txt --out-dir data/shakespeare
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
Outputs in --out-dir: ckpt.pt, train_config.json, metrics.jsonl, loss.png, summary.json and the tokenizer
(and experts.png, the experts' shares of the tokens over training, for a mixture-of-experts model).
"""
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from bpe import Tokenizer
from common import UsageError, resolve_device
from evaluate import evaluate, token_byte_lengths
from moe import moe_stats, plot_expert_shares, reset_moe_stats
from sample import generate
from training import (TRAIN_PRESETS, BatchSampler, RunDir, TrainConfig, check_finite, load_split, main_of,
                      make_optimizer, mixed_precision, new_model, read_meta, rng_state, seed_everything, set_lr)


# bf16 dense peak FLOP/s of devices we know, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def device_peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)



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

    if not config.data:
        raise UsageError("--data is required: a directory written by data/prepare.py")
    run = RunDir(config, "train", master)
    if run.finished:
        if ddp:
            dist.destroy_process_group()
        return run.finished
    data_dir = Path(config.data)
    meta = read_meta(data_dir)
    train_data, val_data = load_split(data_dir, "train", meta), load_split(data_dir, "val", meta)
    tokenizer_path = data_dir / meta["tokenizer"]
    tokenizer = Tokenizer.load(tokenizer_path)
    dtype, autocast, scaler = mixed_precision(config.dtype, device)

    seed_everything(config.seed)
    model = new_model(config, meta["vocab_size"]).to(device)
    optimizer = make_optimizer(model, config, device)
    sampler = BatchSampler(train_data, config.seq_len, config.batch_size, config.seed, rank, world_size)

    if run.resuming:
        ckpt = run.checkpoint
        run.check_model(model.config)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        sampler.generator.set_state(ckpt["sampler"])
    step = run.start(log)
    if master:
        for f in tokenizer_path.parent.glob(tokenizer_path.name + "*"):  # the tokenizer travels with the checkpoint
            shutil.copy(f, run.path / f.name)

    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    if config.fused_ce:
        from kernels.cross_entropy import cross_entropy as fused_cross_entropy
    token_bytes = token_byte_lengths(tokenizer, meta["vocab_size"])
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * world_size
    flops_per_step = raw_model.flops_per_token(config.seq_len) * tokens_per_step
    peak_flops = device_peak_flops(device)
    log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters | {tokens_per_step:,} tokens/step | "
        f"{len(train_data):,} train tokens | device {device} {dtype} | {world_size} process(es)")

    def save():
        run.save_checkpoint(raw_model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            sampler=sampler.generator.get_state(), rng=rng_state(), step=step, elapsed=run.elapsed(),
                            train_config=asdict(config), tokenizer=tokenizer_path.name)

    @run.timed_eval
    def run_eval(max_tokens):
        raw_model.eval()
        reset_moe_stats(raw_model)  # the expert shares below are those of the validation tokens
        metrics = evaluate(raw_model, val_data, config.seq_len, config.batch_size, device, autocast, token_bytes, max_tokens)
        metrics.update(moe_stats(raw_model))
        log(f"eval step {step}: val loss {metrics['val_loss']:.4f} | ppl {metrics['val_ppl']:.2f} | "
            f"bpb {metrics['val_bpb']:.4f}")
        if "moe_expert_share" in metrics:
            log(f"experts: aux loss {metrics['moe_aux_loss']:.3f} | share CV {metrics['moe_share_cv']:.3f} | "
                f"shares per layer {metrics['moe_expert_share']}")
        if config.sample_tokens:
            log("sample: " + repr(generate_sample(raw_model, tokenizer, config.sample_tokens))[:400])
        raw_model.train()
        run.record({"step": step, **metrics})
        if master:
            run.plot()
            plot_expert_shares(run.metrics, run.path / "experts.png")
        return metrics

    model.train()
    stop_reason = "max_steps"
    while step < config.max_steps:
        lr = set_lr(optimizer, config, step, run.elapsed())
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            x, y = (t.to(device) for t in sampler.next_batch())
            sync = not ddp or micro == config.grad_accum - 1  # all-reduce gradients once per step
            with autocast, (model.no_sync() if not sync else nullcontext()):
                # forward: next-token cross-entropy
                if config.fused_ce:
                    logits, _ = model(x)
                    loss = fused_cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
                    loss = loss + raw_model.router_loss()  # the model adds it only to its own loss (MoE)
                else:
                    _, loss = model(x, y)
                loss = loss / config.grad_accum
            # backward (the scaler is a no-op unless fp16)
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        # clip
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        # step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item()
        check_finite(loss_value, step, run.ckpt_path, "try a lower --lr or --dtype float32")
        step += 1

        # log
        if run.log_due(step):
            step_time, _, eta = run.lap(step)
            tokens_per_s = tokens_per_step / step_time
            mfu = [f"MFU {flops_per_step / step_time / (peak_flops * world_size):.1%}"] if peak_flops else []
            run.log_step(step, eta, [f"loss {loss_value:.4f}", f"lr {lr:.2e}", f"grad norm {grad_norm.item():.3f}",
                                     f"{tokens_per_s:,.0f} tok/s", *mfu],
                         {"loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s},
                         log)
        out_of_time = run.stop_reason(step) == "max_time"  # --max-time spent (evaluations included); Ctrl-C exits
        if ddp:  # every process stops at the same step
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if out_of_time:
            stop_reason = "max_time"
            break
        if run.eval_due(step) and master:
            run_eval(config.eval_tokens)
            save()

    summary = {}
    if master:
        final = run_eval(0)  # the whole validation split
        save()
        elapsed = run.elapsed()
        summary = {**final, "tokens_seen": step * tokens_per_step, "wall_time_s": elapsed,
                   "tokens_per_s": (step * tokens_per_step) / max(elapsed, 1e-9), "params": raw_model.num_params()}
        summary = run.finish(summary, step, stop_reason, device,
                             f"val loss {final['val_loss']:.4f} | val bpb {final['val_bpb']:.4f}", log)
    if ddp:
        dist.destroy_process_group()
    return summary


def generate_sample(model, tokenizer, n_tokens: int) -> str:
    """A continuation of <|endoftext|> (a new document), sampled at temperature 0.8, top-k 50."""
    eot = tokenizer.special_tokens["<|endoftext|>"]
    new_tokens = generate(model, [[eot]], max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=0)[0]
    return tokenizer.decode(new_tokens.tolist())


def main(argv=None):
    main_of(TrainConfig, TRAIN_PRESETS, __doc__.split("\n\n")[0], train, argv)


if __name__ == "__main__":
    main()
