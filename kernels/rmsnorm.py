"""Fused RMSNorm in Triton: one kernel for the forward pass, one for the backward pass.

RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019), in the Hugging Face Llama
convention: normalise in fp32, cast to the input dtype, then multiply by the weight:

    rstd = 1 / sqrt(mean(x^2) + eps)          per row, over the last dim (D)
    y    = (x * rstd).to(x.dtype) * weight

Backward, with n = x * rstd (the normalised row) and g = dy * weight:
    dx = rstd * (g - n * mean(g * n))
    dweight = sum over rows of dy * n
The forward saves rstd (one fp32 per row). In the backward each program walks a strided set of rows
and keeps its own fp32 partial of dweight; the partials (n_programs, D) are summed afterwards, so the
weight gradient is reduced across programs without atomics and deterministically.

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1.
Tests: `TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py`; speed: `python -m bench.kernels`.
"""
import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
MAX_FUSED_DIM = 65536  # a whole row lives in one program's registers


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    normed = (x * rstd).to(Y.dtype.element_ty)  # the cast to the input dtype before the weight (HF Llama)
    tl.store(Y + row * stride_y + cols, (normed.to(tl.float32) * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(X, W, dY, dX, RSTD, dW_partial, stride_x, stride_dy, stride_dx, n_rows, D,
                  BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    for row in tl.range(pid, n_rows, n_programs):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        n = x * rstd
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, 0) / D))
        tl.store(dX + row64 * stride_dx + cols, dx.to(dX.dtype.element_ty), mask=mask)
        dw += dy * n
    tl.store(dW_partial + pid.to(tl.int64) * D + cols, dw, mask=mask)


def _block_and_warps(D):
    block_d = triton.next_power_of_2(D)
    return block_d, min(max(block_d // 256, 1), 16)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        n_rows, D = x2d.shape
        y = torch.empty((n_rows, D), device=x.device, dtype=x.dtype)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block_d, num_warps = _block_and_warps(D)
        _rms_norm_fwd[(n_rows,)](x2d, weight, y, rstd, x2d.stride(0), y.stride(0), D, eps,
                                 BLOCK_D=block_d, num_warps=num_warps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, D = x2d.shape
        dy2d = dy.reshape(n_rows, D)
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx = torch.empty((n_rows, D), device=x2d.device, dtype=x2d.dtype)
        if INTERPRET:
            n_programs = min(n_rows, 4)  # a few programs, so the cross-program weight reduction is tested
        else:
            n_programs = min(n_rows, 4 * torch.cuda.get_device_properties(x2d.device).multi_processor_count)
        dw_partial = torch.empty((n_programs, D), device=x2d.device, dtype=torch.float32)
        block_d, num_warps = _block_and_warps(D)
        _rms_norm_bwd[(n_programs,)](x2d, weight, dy2d, dx, rstd, dw_partial,
                                     x2d.stride(0), dy2d.stride(0), dx.stride(0), n_rows, D,
                                     BLOCK_D=block_d, num_warps=num_warps)
        return dx.view(dy.shape), dw_partial.sum(0).to(weight.dtype), None


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dim of x (any leading shape): (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight,
    computed in fp32; returns x.dtype. weight: (D,). Differentiable in x and weight."""
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} must be (D,) with D = x.shape[-1] "
                         f"(x shape {tuple(x.shape)})")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device}, weight on {weight.device}")
    if x.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("rms_norm: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 "
                           "before importing), or use a CUDA device")
    if x.shape[-1] > MAX_FUSED_DIM:
        raise ValueError(f"rms_norm: last dim {x.shape[-1]} exceeds {MAX_FUSED_DIM}, the largest row one program holds")
    if x.numel() == 0:
        raise ValueError(f"rms_norm: empty input of shape {tuple(x.shape)}")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps))
