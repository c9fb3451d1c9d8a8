"""model.py's forward+backward tokens/s on the CPU against transformers, in the same run:

    python -m bench.model              # median of 10 interleaved steps per configuration
    python -m bench.model --iters 20

The `tiny` and `small` presets with the `naive` and `sdpa` attention backends against
`transformers.LlamaForCausalLM` (eager and sdpa attention) built with the same config and weights
(tests/reference.py), steps interleaved so that background load hits every side alike.
"""
import argparse
import time

import torch

from model import ModelConfig, Transformer
from tests.reference import hf_llama_like  # the reference side of the comparison


def bench_model(args):
    """Forward+backward tokens/s on the CPU: nanollm's backends against transformers' LlamaForCausalLM
    with the same config and weights, in the same run."""
    torch.manual_seed(0)
    shapes = {"tiny": (8, 256), "small": (4, 256)}  # preset -> (batch, seq_len)
    print(f"forward+backward tokens/s on {torch.get_num_threads()} CPU threads (median of {args.iters} steps)\n")
    print("| preset | batch x seq | nanollm naive | nanollm sdpa | transformers eager | transformers sdpa | sdpa / HF sdpa |")
    print("|---|---|---|---|---|---|---|")
    for preset, (B, T) in shapes.items():
        config = ModelConfig.from_preset(preset)
        ours = {b: Transformer(ModelConfig.from_preset(preset, attn_backend=b)) for b in ("naive", "sdpa")}
        state = ours["sdpa"].state_dict()
        for m in ours.values():
            m.load_state_dict(state)
        theirs = {impl: hf_llama_like(ours["sdpa"], impl) for impl in ("eager", "sdpa")}
        idx = torch.randint(0, config.vocab_size, (B, T))

        def step_ours(m):
            _, loss = m(idx, idx)
            loss.backward()

        def step_hf(m):
            m(input_ids=idx, labels=idx).loss.backward()

        runs = {"naive": lambda: step_ours(ours["naive"]), "sdpa": lambda: step_ours(ours["sdpa"]),
                "hf-eager": lambda: step_hf(theirs["eager"]), "hf-sdpa": lambda: step_hf(theirs["sdpa"])}
        times = {name: [] for name in runs}
        for name, fn in runs.items():  # warm-up
            fn()
        for _ in range(args.iters):  # interleaved, so background load hits every side alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        tps = {name: B * T / sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        print(f"| {preset} | {B} x {T} | {tps['naive']:,.0f} | {tps['sdpa']:,.0f} | {tps['hf-eager']:,.0f} "
              f"| {tps['hf-sdpa']:,.0f} | {tps['sdpa'] / tps['hf-sdpa']:.2f}x |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=10, help="timed steps per configuration (median reported)")
    bench_model(parser.parse_args(argv))


if __name__ == "__main__":
    main()
