"""Tests for kernels/: FlashAttention-2 (forward, backward, decode), fused RMSNorm, fused cross-entropy.

Every kernel is checked against a naive float64 reference written here, on fresh random inputs, with
the relative error max|out - ref| / max|ref| within the dtype's bound (fp32 1e-4, fp16 1e-2; bf16 only
on a GPU, because the interpreter computes bf16 on bit patterns). Every buffer the kernels allocate
with torch.empty / torch.empty_like is filled with NaN first, so an element a kernel forgets to write
fails the comparison. On this CPU-only machine the kernels run in the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py
    TRITON_INTERPRET=1 python -m pytest -q -m slow tests/test_kernels.py     # the full shape sweep
"""
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton.jit decorates the kernels

import kernels.flash_attention as fa  # noqa: E402
from kernels.cross_entropy import cross_entropy  # noqa: E402
from kernels.flash_attention import flash_attention  # noqa: E402
from kernels.rmsnorm import rms_norm  # noqa: E402

if not fa.INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

DEVICE = "cpu" if fa.INTERPRET else "cuda"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([] if fa.INTERPRET else [torch.bfloat16])


@pytest.fixture(autouse=True)
def seeded_and_poisoned(monkeypatch):
    """Fresh random inputs per test, and NaN in every freshly allocated float buffer."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


def test_poison_is_active():
    assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2)).isnan().all()


def rel_err(out, ref):
    """max |out - ref| / max |ref|; NaN anywhere (an unwritten element) makes it NaN and fails `<=`.
    The floor on the denominator is for gradients that cancel to exactly 0 (Tq = Tk = 1 gives dq = dk = 0
    from terms of size ~1): every other output and gradient here has max |ref| of order 1."""
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(0.1)).item()


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# flash attention

def attention_reference(q, k, v, causal, sm_scale, kv_start=None):
    """softmax(sm_scale q k^T + mask) v in float64, K/V repeated per query head; query i at key
    position Tk - Tq + i; rows with no visible key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    Tq, Tk = q.shape[2], k.shape[2]
    key_pos = torch.arange(Tk, device=q.device)
    visible = torch.ones(q.shape[0], 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= key_pos[None, :] <= torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    if kv_start is not None:
        visible &= (key_pos[None, :] >= kv_start[:, None])[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * sm_scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def attention_errors(B, n_heads, n_kv_heads, Tq, Tk, head_dim, causal, dtype, kv_start=None, sm_scale=None,
                     backward=True) -> dict:
    """Relative errors of flash_attention's output (and dq, dk, dv) against the fp64 reference."""
    q = randn(B, n_heads, Tq, head_dim, dtype=dtype).requires_grad_(backward)
    k = randn(B, n_kv_heads, Tk, head_dim, dtype=dtype).requires_grad_(backward)
    v = randn(B, n_kv_heads, Tk, head_dim, dtype=dtype).requires_grad_(backward)
    kv_start = None if kv_start is None else torch.tensor(kv_start, device=DEVICE)
    out = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, kv_start=kv_start)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal, sm_scale or head_dim ** -0.5, kv_start)
    assert out.shape == q.shape and out.dtype == dtype
    errors = {"out": rel_err(out, ref)}
    if backward:
        do = randn(*out.shape, dtype=dtype)
        out.backward(do)
        ref.backward(do.double())
        errors |= {name: rel_err(got, want) for name, got, want in
                   (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad))}
    return errors


def within_tolerance(errors: dict, dtype) -> bool:
    return max(errors.values()) <= TOLERANCE[dtype]


# (B, n_heads, n_kv_heads, Tq, Tk, head_dim, causal, dtype, kv_start): odd lengths, GQA ratios 1/2/4/8,
# head dims 32/64/128, causal and not, queries that are the last Tq of Tk keys, left padding
ATTENTION_CASES = [
    (2, 4, 4, 17, 17, 32, True, torch.float32, None),
    (1, 4, 2, 100, 100, 64, False, torch.float16, None),
    (1, 4, 1, 1, 1, 32, True, torch.float32, None),
    (1, 8, 1, 33, 33, 128, True, torch.float16, None),
    (1, 2, 1, 257, 257, 32, True, torch.float32, None),
    (2, 2, 2, 40, 40, 64, False, torch.float32, None),
    (1, 4, 2, 20, 45, 32, True, torch.float32, None),
    (1, 2, 1, 9, 50, 64, False, torch.float16, None),
    (2, 4, 2, 70, 70, 32, True, torch.float32, [0, 45]),
    (2, 2, 1, 24, 40, 32, False, torch.float16, [5, 37]),
]


@pytest.mark.parametrize("B,n_heads,n_kv_heads,Tq,Tk,head_dim,causal,dtype,kv_start", ATTENTION_CASES)
def test_flash_attention_forward_backward(B, n_heads, n_kv_heads, Tq, Tk, head_dim, causal, dtype, kv_start):
    errors = attention_errors(B, n_heads, n_kv_heads, Tq, Tk, head_dim, causal, dtype, kv_start)
    assert within_tolerance(errors, dtype), errors


def test_flash_attention_explicit_scale_and_bf16_on_gpu():
    errors = attention_errors(1, 2, 2, 23, 23, 32, True, torch.float32, sm_scale=0.3)
    assert within_tolerance(errors, torch.float32), errors
    if not fa.INTERPRET:
        errors = attention_errors(2, 8, 2, 300, 300, 128, True, torch.bfloat16)
        assert within_tolerance(errors, torch.bfloat16), errors


@pytest.mark.slow
@pytest.mark.parametrize("T,group,causal,dtype", itertools.product([1, 17, 100, 257], [1, 2, 4, 8], [True, False],
                                                                 DTYPES))
def test_flash_attention_sweep(T, group, causal, dtype):
    for head_dim in (32, 64, 128):
        errors = attention_errors(1, 8, 8 // group, T, T, head_dim, causal, dtype)
        assert within_tolerance(errors, dtype), (head_dim, errors)


# (B, n_heads, n_kv_heads, Tq, Tk, head_dim, causal, dtype, kv_start)
DECODE_CASES = [
    (2, 8, 2, 1, 100, 64, True, torch.float16, None),
    (1, 4, 4, 3, 257, 32, True, torch.float32, None),
    (2, 8, 1, 1, 77, 128, True, torch.float32, [0, 30]),
    (1, 4, 2, 2, 50, 32, False, torch.float16, None),
    (2, 2, 2, 1, 5, 32, True, torch.float32, [4, 0]),
]


@pytest.mark.parametrize("B,n_heads,n_kv_heads,Tq,Tk,head_dim,causal,dtype,kv_start", DECODE_CASES)
def test_flash_attention_decode(monkeypatch, B, n_heads, n_kv_heads, Tq, Tk, head_dim, causal, dtype, kv_start):
    calls = []
    real_decode = fa._decode
    monkeypatch.setattr(fa, "_decode", lambda *args: calls.append(args[0].shape) or real_decode(*args))
    with torch.no_grad():
        errors = attention_errors(B, n_heads, n_kv_heads, Tq, Tk, head_dim, causal, dtype, kv_start, backward=False)
    assert within_tolerance(errors, dtype), errors
    assert len(calls) == 1, "a few queries without gradient must take the split-K decode kernel"


def test_flash_attention_reads_strided_inputs():
    """q, k, v as (B, T, heads, D) transposed to (B, heads, T, D): read in place, same result."""
    B, T, H, D = 2, 21, 4, 32
    q, k, v = (randn(B, T, H, D, dtype=torch.float32).transpose(1, 2) for _ in range(3))
    out = flash_attention(q, k, v, causal=True)
    ref = attention_reference(q, k, v, True, D ** -0.5)
    assert not q.is_contiguous()
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]


def test_flash_attention_rejects_bad_inputs():
    q = randn(1, 4, 8, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        flash_attention(randn(1, 4, 8, 48, dtype=torch.float32), randn(1, 4, 8, 48, dtype=torch.float32),
                        randn(1, 4, 8, 48, dtype=torch.float32))
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        flash_attention(q, randn(1, 3, 8, 32, dtype=torch.float32), randn(1, 3, 8, 32, dtype=torch.float32))
    with pytest.raises(ValueError, match="Tq=8 > Tk=4"):
        flash_attention(q, randn(1, 4, 4, 32, dtype=torch.float32), randn(1, 4, 4, 32, dtype=torch.float32))
    with pytest.raises(ValueError, match="kv_start"):
        flash_attention(q, q, q, kv_start=torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attention(q, q.half(), q)


# ----------------------------------------------------------------------------------------------------
# RMSNorm

def rms_norm_reference(x, weight, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 96), (37, 64), (1, 1, 200)])
def test_rms_norm_forward_backward(shape, dtype):
    x = randn(*shape, dtype=dtype).requires_grad_()
    weight = (1 + 0.5 * randn(shape[-1], dtype=torch.float32)).to(dtype).requires_grad_()
    y = rms_norm(x, weight, 1e-5)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = rms_norm_reference(x64, w64, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref) <= TOLERANCE[dtype]
    dy = randn(*shape, dtype=dtype)
    y.backward(dy)
    ref.backward(dy.double())
    assert rel_err(x.grad, x64.grad) <= TOLERANCE[dtype]
    # 37 rows over 4 programs: the weight gradient is summed across programs' partials
    assert rel_err(weight.grad, w64.grad) <= TOLERANCE[dtype]


# ----------------------------------------------------------------------------------------------------
# cross-entropy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(16, 500), (5, 64), (9, 7)])
def test_cross_entropy_forward_backward(N, V, dtype):
    logits = (3 * randn(N, V, dtype=torch.float32)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[::3] = -100
    loss = cross_entropy(logits, targets)
    logits64 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(logits64, targets, ignore_index=-100)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= TOLERANCE[dtype] * abs(ref.item())
    (2.5 * loss).backward()  # a grad_output other than 1 must scale the gradient
    (2.5 * ref).backward()
    assert rel_err(logits.grad, logits64.grad) <= TOLERANCE[dtype]
    assert (logits.grad[::3] == 0).all()


def test_cross_entropy_custom_ignore_index_and_all_ignored():
    logits = randn(6, 40, dtype=torch.float32).requires_grad_()
    targets = torch.tensor([1, 0, 39, 0, 7, 0], device=DEVICE)
    loss = cross_entropy(logits, targets, ignore_index=0)
    assert torch.allclose(loss.double(), F.cross_entropy(logits.double(), targets, ignore_index=0), rtol=1e-5)
    all_ignored = cross_entropy(logits, torch.full((6,), -100, device=DEVICE))
    all_ignored.backward()
    assert all_ignored.isnan()  # mean over no targets, as torch.nn.functional.cross_entropy
    assert (logits.grad == 0).all()


def test_cross_entropy_rejects_bad_targets():
    logits = randn(4, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="target 10 outside"):
        cross_entropy(logits, torch.tensor([0, 10, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(logits, torch.zeros(3, dtype=torch.long, device=DEVICE))


# ----------------------------------------------------------------------------------------------------
# the model with attn_backend="triton" (flash attention + fused RMSNorm) against "sdpa"

MODEL_CONFIG = dict(vocab_size=97, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=32)


def sdpa_and_triton_models():
    from model import ModelConfig, Transformer
    sdpa = Transformer(ModelConfig(**MODEL_CONFIG, attn_backend="sdpa")).to(DEVICE)
    triton_model = Transformer(ModelConfig(**MODEL_CONFIG, attn_backend="triton")).to(DEVICE)
    triton_model.load_state_dict(sdpa.state_dict())
    return sdpa, triton_model


def test_model_triton_backend_matches_sdpa_loss_and_grads():
    sdpa, triton_model = sdpa_and_triton_models()
    idx = torch.randint(0, MODEL_CONFIG["vocab_size"], (2, 24), device=DEVICE)
    targets = torch.randint(0, MODEL_CONFIG["vocab_size"], (2, 24), device=DEVICE)
    targets[0, :5] = -100
    _, loss_sdpa = sdpa(idx, targets)
    _, loss_triton = triton_model(idx, targets)
    loss_sdpa.backward()
    loss_triton.backward()
    assert abs(loss_triton.item() - loss_sdpa.item()) <= 1e-5 * abs(loss_sdpa.item())
    grads_sdpa = dict(sdpa.named_parameters())
    for name, p in triton_model.named_parameters():
        assert rel_err(p.grad, grads_sdpa[name].grad.double()) <= 1e-4, name


def test_model_triton_backend_kv_cache_decode_matches_sdpa():
    """Left-padded prefill (flash kernel with kv_start) then one-token steps (split-K decode kernel)."""
    from model import KVCache
    sdpa, triton_model = sdpa_and_triton_models()
    pad_lens = torch.tensor([0, 3], device=DEVICE)
    prompt = torch.randint(0, MODEL_CONFIG["vocab_size"], (2, 8), device=DEVICE)
    steps = torch.randint(0, MODEL_CONFIG["vocab_size"], (2, 3), device=DEVICE)
    logits = {}
    with torch.no_grad():
        for name, model in (("sdpa", sdpa), ("triton", triton_model)):
            model.eval()
            cache = KVCache(model.config, 2, max_seq_len=16, device=DEVICE, pad_lens=pad_lens)
            prefill, _ = model(prompt, kv_cache=cache)
            decoded = [model(steps[:, i:i + 1], start_pos=8 + i, kv_cache=cache)[0] for i in range(3)]
            # padding positions are garbage by construction (sdpa lets them see themselves, the kernel
            # gives them zeros): compare only real tokens
            logits[name] = torch.cat([prefill[0], prefill[1, 3:], *(d.reshape(2, -1) for d in decoded)])
    assert rel_err(logits["triton"], logits["sdpa"].double()) <= 1e-4
