"""Decode tokens/s on the CPU: sample.py's generation beside transformers' generate on the same weights, one run:

    python -m bench.decode                                   # random weights (the small preset)
    python -m bench.decode --ckpt out/base --draft-ckpt out/draft --bench-tokens 128

First a table of the linear layers alone: one pass over every linear layer of the model on 1 to 64 rows,
torch's x W^T (F.linear) against W x^T (model.few_rows_linear, what model.Linear does up to FEW_ROWS rows
on the CPU). Then decode rows: no cache (recompute every step), the KV cache with and without the W x^T
path, torch.compile, a batch of 8 prompts of different lengths, each against transformers' generate on
the same weights (tests/reference.py's hf_copy: the tokens are checked equal), and speculative decoding
against plain decoding of the target, greedy and sampled. Each row is the fastest of --repeats rounds
that run every case in turn, so background load hits every side alike. Default models have random
weights: the `small` preset, and for speculative decoding an 8-layer target with a 2-layer draft made
of the target's first two layers (an early-exit draft, as in LayerSkip, Elhoushi et al. 2024), so the
acceptance rates are those of random models; pass --ckpt (and --draft-ckpt) to measure trained ones.
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

from common import load_model
from decoding import speculative_generate
import model as model_module
from model import FEW_ROWS, Linear, ModelConfig, Transformer, few_rows_linear
from sample import generate, left_pad
from tests.reference import hf_copy  # the reference side of the comparison


def few_rows_table(model: Transformer, repeats: int) -> None:
    """Milliseconds for one pass over every linear layer of `model` on r rows (tokens), weights as stored:
    x W^T (F.linear) against W x^T (few_rows_linear), the fastest of repeats + 1 passes each."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    megabytes = sum(m.weight.numel() * m.weight.element_size() for m in layers) / 2**20

    def timed(linear, rows):
        xs = {n: torch.randn(rows, n) for n in {m.in_features for m in layers}}
        best = float("inf")
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for m in layers:
                linear(xs[m.in_features], m.weight)
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    print("\n| rows | x W^T (F.linear), ms | W x^T (few_rows_linear), ms | speedup |")
    print("|---:|---:|---:|---:|")
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 8, 16, 32, 64):
            slow, fast = timed(F.linear, rows), timed(few_rows_linear, rows)
            print(f"| {rows} | {slow:.2f} | {fast:.2f} | {slow / fast:.2f}x |")
    print(f"\n{len(layers)} linear layers, {megabytes:.0f} MiB of weights; model.Linear takes W x^T up to "
          f"FEW_ROWS = {FEW_ROWS} rows on the CPU")


def without_few_rows(fn):
    """fn run with model.Linear's W x^T path switched off (F.linear on every row count), for the row without it."""
    def run():
        saved, model_module.FEW_ROWS = model_module.FEW_ROWS, 0
        try:
            return fn()
        finally:
            model_module.FEW_ROWS = saved
    return run


def bench(args):
    """Decode tokens/s on the CPU, nanollm beside transformers' generate on the same weights, one run.

    Default models have random weights: the `small` preset, and for speculative decoding an 8-layer
    target with a 2-layer draft made of the target's first two layers (an early-exit draft, as in
    LayerSkip, Elhoushi et al. 2024), so acceptance rates are those of random models; pass --ckpt
    (and --draft-ckpt) to measure trained ones.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N = args.bench_tokens
    if args.ckpt:
        model = load_model(args.ckpt, "cpu", torch.float32)
        target = model
        draft = load_model(args.draft_ckpt, "cpu", torch.float32) if args.draft_ckpt else None
    else:
        model = Transformer(ModelConfig.from_preset("small")).eval()
        target = Transformer(ModelConfig.from_preset("small", n_layers=8)).eval()
        draft = Transformer(ModelConfig.from_preset("small", n_layers=2)).eval()
        draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    few_rows_table(model, args.repeats)
    V, context = model.config.vocab_size, model.config.max_seq_len
    prompt = torch.randint(V, (16,))
    batch = [torch.randint(V, (n,)) for n in (16, 5, 23, 9, 30, 12, 27, 19)]   # 8 prompts of different lengths
    if max(map(len, batch)) + N > context:
        raise SystemExit(f"--bench-tokens {N} does not fit the model's context of {context} tokens")
    hf_model = hf_copy(model)

    def hf_generate(prompts):
        ids, pad_lens = left_pad(prompts)
        pad_lens = pad_lens if pad_lens is not None else torch.zeros(len(ids), dtype=torch.long)
        mask = (torch.arange(ids.size(1))[None] >= pad_lens[:, None]).long()
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=0,
                                    top_k=None, top_p=None, temperature=None)
        return list(out[:, ids.size(1):])

    def speculative(name, temperature):
        def run():
            tokens, stats = speculative_generate(target, draft, prompt, N, 4, temperature=temperature, seed=0)
            acceptance[name] = stats["acceptance_rate"]
            return [tokens]
        return run

    # name -> (batch size, function returning the new tokens of each row)
    cases = {
        "nanollm, KV cache, x W^T on every row count (FEW_ROWS = 0)": (1, without_few_rows(
            lambda: generate(model, prompt, N, temperature=0))),
        "nanollm, KV cache": (1, lambda: generate(model, prompt, N, temperature=0)),
        "nanollm, KV cache + torch.compile": (1, lambda: generate(model, prompt, N, temperature=0, compile=True)),
        "transformers generate, KV cache": (1, lambda: hf_generate([prompt])),
        "nanollm, KV cache, batch of 8 prompts (5-30 tokens)": (8, lambda: generate(model, batch, N, temperature=0)),
        "transformers generate, batch of 8 prompts": (8, lambda: hf_generate(batch)),
    }
    acceptance, speculative_pairs = {}, []   # (label, plain decoding case, speculative case)
    if draft is not None:
        for temperature in (0.0, 1.0):
            label = "greedy" if temperature == 0 else f"sampling T={temperature:g}"
            plain = f"target ({target.config.n_layers} layers), plain decoding, {label}"
            fast = f"speculative, {draft.config.n_layers}-layer draft, 4 tokens drafted per round, {label}"
            cases[plain] = (1, lambda t=temperature: generate(target, prompt, N, temperature=t, seed=0))
            cases[fast] = (1, speculative(fast, temperature))
            speculative_pairs.append((label, plain, fast))

    print(f"decode tokens/s on {torch.get_num_threads()} CPU thread(s), {N} new tokens per prompt (prefill "
          f"included), fastest of {args.repeats} rounds that run every case in turn", file=sys.stderr)
    start = time.perf_counter()
    generate(model, prompt, 8, temperature=0, compile=True)  # compiles the decode step, once
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    no_cache_tokens = generate(model, prompt, N, temperature=0, use_cache=False)[0].numel()  # one run: it is slow
    rates = {"nanollm, no cache (recompute every step)": no_cache_tokens / (time.perf_counter() - start)}
    outputs = {}
    for round_ in range(args.repeats):
        for name, (_, fn) in cases.items():
            start = time.perf_counter()
            outputs[name] = fn()
            rate = sum(o.numel() for o in outputs[name]) / (time.perf_counter() - start)
            rates[name] = max(rate, rates.get(name, 0.0))
        print(f"  round {round_ + 1}/{args.repeats} done", file=sys.stderr)

    same = torch.equal(outputs["nanollm, KV cache"][0], outputs["transformers generate, KV cache"][0])
    notes = {"nanollm, KV cache + torch.compile": f"compiling took {compile_seconds:.0f} s, once",
             "transformers generate, KV cache": "same tokens as nanollm" if same else "tokens differ from nanollm"}
    notes.update((name, f"acceptance {rate:.2f}") for name, rate in acceptance.items())
    sizes = {name: size for name, (size, _) in cases.items()}
    print(f"\n| {'model: ' + args.ckpt if args.ckpt else 'small preset, random weights'} | batch | tokens/s | |")
    print("|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {sizes.get(name, 1)} | {rate:.1f} | {notes.get(name, '')} |")
    hf = rates["transformers generate, KV cache"]
    print(f"\nKV cache vs recomputation: {rates['nanollm, KV cache'] / rates['nanollm, no cache (recompute every step)']:.1f}x"
          f" (target >= 5x)")
    print(f"nanollm vs transformers, greedy, batch 1: {rates['nanollm, KV cache'] / hf:.2f}x eager, "
          f"{rates['nanollm, KV cache + torch.compile'] / hf:.2f}x compiled (target >= 1.5x); batch 8: "
          f"{rates['nanollm, KV cache, batch of 8 prompts (5-30 tokens)'] / rates['transformers generate, batch of 8 prompts']:.2f}x")
    for label, plain, fast in speculative_pairs:
        print(f"speculative vs plain decoding, {label}: {rates[fast] / rates[plain]:.2f}x at acceptance "
              f"{acceptance[fast]:.2f} (target: faster when acceptance >= 0.7)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a trained model to measure (default: the small preset, random weights)")
    parser.add_argument("--draft-ckpt", help="speculative rows: the draft model (same tokenizer as --ckpt)")
    parser.add_argument("--bench-tokens", type=int, default=256, help="new tokens per run (default: 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row, the fastest kept (default: 2)")
    args = parser.parse_args(argv)
    for name in ("bench_tokens", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bench(args)


if __name__ == "__main__":
    main()
