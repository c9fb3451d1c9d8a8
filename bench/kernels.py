"""Triton kernels (kernels/) against torch on a CUDA GPU, in the same run:

    python -m bench.kernels            # every shape
    python -m bench.kernels --quick    # fewer shapes, a minute or two

FlashAttention-2 (kernels/flash_attention.py) against torch SDPA's FlashAttention backend and a naive
softmax(QK^T)V, in TFLOP/s (forward, and forward+backward) and peak memory, for bf16, head dims 64 and
128, sequences 512 to 16k, causal and not (batch * seq = 16k tokens, 2048 model width, as in the
FlashAttention-2 paper); the split-K decode kernel against SDPA for one query over a long KV cache;
fused RMSNorm and fused cross-entropy in GB/s and peak memory against torch.
FLOP counts: forward 4 * B * H * T^2 * D (halved when causal), backward 2.5x forward (five matmuls
against two), the convention of the FlashAttention papers. The kernels' correctness tests run on the
CPU: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py
"""
import argparse
import sys

import torch
import torch.nn.functional as F

DEVICE = "cuda"


def _require_cuda():
    import triton
    if triton.knobs.runtime.interpret or not torch.cuda.is_available():
        sys.exit(f"bench.kernels: needs a CUDA GPU and TRITON_INTERPRET unset (found "
                 f"cuda={torch.cuda.is_available()}, TRITON_INTERPRET={int(bool(triton.knobs.runtime.interpret))}). "
                 "The kernels' correctness tests run on the CPU: "
                 "TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py")

def _time_ms(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def _peak_mib(fn):
    """Peak memory fn allocates on top of what is already live, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _run_or_oom(fn):
    """fn() or None when the GPU runs out of memory (the naive attention at long sequences)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def _fmt(x, spec=".1f"):
    return "OOM" if x is None else format(x, spec)


# ----------------------------------------------------------------------------------------------------
# kernels

def naive_attention(q, k, v, causal):
    """softmax(QK^T / sqrt(D)) V with the (B, H, T, T) scores materialised, softmax in fp32."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        T = q.shape[2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_attention(seq_lens, head_dims, dtype=torch.bfloat16, tokens=16384, model_dim=2048):
    from kernels.flash_attention import flash_attention
    impls = {"triton": lambda q, k, v, c: flash_attention(q, k, v, causal=c),
             "sdpa": sdpa_flash, "naive": naive_attention}
    rows = []
    for head_dim in head_dims:
        for causal in (True, False):
            for T in seq_lens:
                B, H = max(1, tokens // T), model_dim // head_dim
                q, k, v = (torch.randn(B, H, T, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                do = torch.randn_like(q)
                fwd_flop = 4 * B * H * T * T * head_dim / (2 if causal else 1)
                result = {}
                for name, attend in impls.items():
                    fwd = lambda: attend(q, k, v, causal)
                    fwd_bwd = lambda: torch.autograd.grad(attend(q, k, v, causal), (q, k, v), do)
                    fwd_ms = _run_or_oom(lambda: _time_ms(fwd))
                    fwd_bwd_ms = _run_or_oom(lambda: _time_ms(fwd_bwd))
                    result[name] = (None if fwd_ms is None else fwd_flop / fwd_ms / 1e9,
                                    None if fwd_bwd_ms is None else 3.5 * fwd_flop / fwd_bwd_ms / 1e9,
                                    _run_or_oom(lambda: _peak_mib(fwd_bwd)))
                with torch.no_grad():  # sanity on the GPU, where bf16 is computed for real
                    err = ((flash_attention(q, k, v, causal=causal).float() - sdpa_flash(q, k, v, causal).float())
                           .abs().max().item())
                (t_f, t_fb, t_mem), (s_f, s_fb, s_mem), (n_f, n_fb, n_mem) = (result[n] for n in impls)
                ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.0%}"
                rows.append([str(head_dim), "yes" if causal else "no", str(T), f"{B}x{H}",
                             _fmt(t_f), _fmt(s_f), _fmt(n_f), ratio(t_f, s_f),
                             _fmt(t_fb), _fmt(s_fb), _fmt(n_fb), ratio(t_fb, s_fb),
                             _fmt(t_mem, ".0f"), _fmt(s_mem, ".0f"), _fmt(n_mem, ".0f"), f"{err:.1e}"])
                del q, k, v, do
                torch.cuda.empty_cache()
    _table(f"Attention, {str(dtype).removeprefix('torch.')}: TFLOP/s (fwd, fwd+bwd) and fwd+bwd peak MiB",
           ["head dim", "causal", "seq", "B x H", "fwd triton", "fwd sdpa", "fwd naive", "triton/sdpa",
            "f+b triton", "f+b sdpa", "f+b naive", "triton/sdpa", "MiB triton", "MiB sdpa", "MiB naive",
            "max abs diff vs sdpa"], rows)


def bench_decode(cache_lens, dtype=torch.bfloat16, batch=8, n_heads=32, n_kv_heads=8, head_dim=128):
    """One new token per sequence against a KV cache (GQA 4:1): memory bound, so GB/s of K/V read."""
    from kernels.flash_attention import flash_attention
    rows = []
    for Tk in cache_lens:
        q = torch.randn(batch, n_heads, 1, head_dim, device=DEVICE, dtype=dtype)
        k, v = (torch.randn(batch, n_kv_heads, Tk, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
        kv_bytes = 2 * k.numel() * k.element_size()
        triton_ms = _time_ms(lambda: flash_attention(q, k, v, causal=True))
        sdpa_ms = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        err = (flash_attention(q, k, v).float() - F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float())
        rows.append([str(Tk), f"{triton_ms * 1e3:.0f}", f"{sdpa_ms * 1e3:.0f}",
                     f"{kv_bytes / triton_ms / 1e6:.0f}", f"{kv_bytes / sdpa_ms / 1e6:.0f}",
                     f"{err.abs().max().item():.1e}"])
    _table(f"Decode: 1 query, batch {batch}, {n_heads} heads / {n_kv_heads} KV heads, head dim {head_dim}, "
           f"{str(dtype).removeprefix('torch.')}",
           ["cache len", "triton us", "sdpa us", "triton GB/s", "sdpa GB/s", "max abs diff"], rows)


def rms_norm_torch(x, weight, eps):
    """The eager formula of model.py's RMSNorm (HF Llama order)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def bench_rms_norm(dims, tokens=16384, dtype=torch.bfloat16):
    from kernels.rmsnorm import rms_norm
    impls = {"triton": rms_norm, "torch eager": rms_norm_torch,
             "F.rms_norm": lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps)}
    rows = []
    for D in dims:
        x = torch.randn(tokens, D, device=DEVICE, dtype=dtype, requires_grad=True)
        weight = torch.randn(D, device=DEVICE, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        # minimum traffic: forward reads x and writes y; backward reads x and dy and writes dx
        fwd_bytes, fwd_bwd_bytes = 2 * x.numel() * x.element_size(), 5 * x.numel() * x.element_size()
        row = [str(tokens), str(D)]
        for norm in impls.values():
            fwd_ms = _time_ms(lambda: norm(x, weight, 1e-5))
            fwd_bwd_ms = _time_ms(lambda: torch.autograd.grad(norm(x, weight, 1e-5), (x, weight), dy))
            row += [f"{fwd_bytes / fwd_ms / 1e6:.0f}", f"{fwd_bwd_bytes / fwd_bwd_ms / 1e6:.0f}"]
        rows.append(row)
    _table(f"RMSNorm, {str(dtype).removeprefix('torch.')}: GB/s of minimum traffic (fwd, fwd+bwd)",
           ["tokens", "dim"] + [f"{part} {name}" for name in impls for part in ("fwd", "f+b")], rows)


def bench_cross_entropy(vocab_sizes, tokens=16384, dtype=torch.bfloat16):
    from kernels.cross_entropy import cross_entropy
    impls = {"triton": cross_entropy,
             "torch fp32 (model.py)": lambda logits, t: F.cross_entropy(logits.float(), t),
             "torch (logits dtype)": F.cross_entropy}
    rows = []
    for V in vocab_sizes:
        logits = torch.randn(tokens, V, device=DEVICE, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, V, (tokens,), device=DEVICE)
        # minimum traffic: forward reads the logits; backward reads them and writes their gradient
        fwd_bwd_bytes = 3 * logits.numel() * logits.element_size()
        row, peaks = [str(tokens), str(V)], []
        for loss_fn in impls.values():
            step = lambda: torch.autograd.grad(loss_fn(logits, targets), logits)
            ms = _time_ms(step)
            peaks.append(_peak_mib(step))
            row += [f"{fwd_bwd_bytes / ms / 1e6:.0f}", f"{peaks[-1]:.0f}"]
        rows.append(row + [f"{peaks[0] / peaks[1]:.0%}"])
        del logits
        torch.cuda.empty_cache()
    _table(f"Cross-entropy, {str(dtype).removeprefix('torch.')} logits: fwd+bwd GB/s of minimum traffic "
           "and peak MiB on top of the logits (the logits gradient included)",
           ["tokens", "vocab"] + [f"{part} {name}" for name in impls for part in ("GB/s", "MiB")]
           + ["MiB triton / torch fp32"], rows)


def bench_kernels(args):
    _require_cuda()
    torch.set_num_threads(1)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    seq_lens = [512, 2048, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    print("(the first call of each attention shape autotunes the Triton kernels: the first rows take longer)",
          flush=True)
    bench_attention(seq_lens, head_dims=[128] if args.quick else [64, 128])
    bench_decode([1024, 8192] if args.quick else [1024, 4096, 16384, 65536])
    bench_rms_norm([4096] if args.quick else [2048, 4096, 8192])
    bench_cross_entropy([32000] if args.quick else [32000, 128256])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes (about a minute or two)")
    bench_kernels(parser.parse_args(argv))


if __name__ == "__main__":
    main()
