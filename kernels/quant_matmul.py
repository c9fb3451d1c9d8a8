"""int4 weight-only matmul in Triton: y = x W^T with W read as packed 4-bit codes and dequantized in registers.

The weight layout is quant_linear.py's QuantLinear: qweight (N, K / 2) uint8, two codes per byte with the even
input column in the low nibble; scales and zeros (N, n_groups) fp16; g_idx (K,) int32, the group of
each input column (column // group_size, or the act-order group). Each weight is

    W[n, k] = scales[n, g_idx[k]] * (code[n, k] - zeros[n, g_idx[k]])

so the kernel moves a quarter of the bytes an fp16 weight would (plus the scales): the point at decode,
where a matmul with one token is bound by reading the weights.

Two kernels:
- `_int4_gemm` (prefill, many rows of x): (BLOCK_M, BLOCK_N) output tiles, a loop over K in BLOCK_K
  steps that unpacks a (BLOCK_K, BLOCK_N) weight tile, dequantizes it and feeds tl.dot, fp32 accumulator.
  Each byte is loaded for both of its columns (the second load hits the cache).
- `_int4_gemv` (decode, a few rows of x): one program per (row, BLOCK_N outputs); each byte is loaded
  once and split into its low (even column) and high (odd column) nibble, multiplied by the even and odd
  entries of x, and reduced with tl.sum: no tensor cores, one pass over the weights.

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (how the tests check it on a machine without a GPU).
Test: `TRITON_INTERPRET=1 python -m pytest -q tests/test_quant.py -k triton`.
"""
import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
GEMV_MAX_ROWS = 4  # up to this many rows of x (decode, small batches) go through the GEMV kernel


@triton.jit
def _int4_gemm(X, QW, S, Z, G, B, Y, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
               HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)                      # (BLOCK_M, BLOCK_K)
        wk_mask = k_mask[:, None] & n_mask[None, :]
        packed = tl.load(QW + offs_n[None, :].to(tl.int64) * stride_qn + (offs_k // 2)[:, None],
                         mask=wk_mask, other=0)                                              # (BLOCK_K, BLOCK_N)
        codes = (packed >> ((offs_k % 2) * 4)[:, None].to(tl.uint8)) & 0xF
        group = tl.load(G + offs_k, mask=k_mask, other=0)
        sz_offs = offs_n[None, :].to(tl.int64) * stride_sn + group[:, None]
        scale = tl.load(S + sz_offs, mask=wk_mask, other=0.0).to(tl.float32)
        zero = tl.load(Z + sz_offs, mask=wk_mask, other=0.0).to(tl.float32)
        w = ((codes.to(tl.float32) - zero) * scale).to(x.dtype)                             # (BLOCK_K, BLOCK_N)
        if FP32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int4_gemv(X, QW, S, Z, G, B, Y, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
    row, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, K // 2, BLOCK_KP):  # BLOCK_KP packed bytes = 2 * BLOCK_KP input columns per step
        offs_p = p0 + tl.arange(0, BLOCK_KP)
        p_mask = offs_p < K // 2
        mask = n_mask[:, None] & p_mask[None, :]
        packed = tl.load(QW + offs_n[:, None].to(tl.int64) * stride_qn + offs_p[None, :], mask=mask, other=0)
        x_even = tl.load(X + row * stride_xm + 2 * offs_p, mask=p_mask, other=0.0).to(tl.float32)
        x_odd = tl.load(X + row * stride_xm + 2 * offs_p + 1, mask=p_mask, other=0.0).to(tl.float32)
        g_even = tl.load(G + 2 * offs_p, mask=p_mask, other=0)
        g_odd = tl.load(G + 2 * offs_p + 1, mask=p_mask, other=0)
        base = offs_n[:, None].to(tl.int64) * stride_sn
        s_even = tl.load(S + base + g_even[None, :], mask=mask, other=0.0).to(tl.float32)
        z_even = tl.load(Z + base + g_even[None, :], mask=mask, other=0.0).to(tl.float32)
        s_odd = tl.load(S + base + g_odd[None, :], mask=mask, other=0.0).to(tl.float32)
        z_odd = tl.load(Z + base + g_odd[None, :], mask=mask, other=0.0).to(tl.float32)
        low = (packed & 0xF).to(tl.float32)
        high = (packed >> 4).to(tl.float32)
        acc += tl.sum((low - z_even) * s_even * x_even[None, :] + (high - z_odd) * s_odd * x_odd[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_ym + offs_n, acc.to(Y.dtype.element_ty), mask=n_mask)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                g_idx: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(qweight)^T (+ bias) -> (..., N), in x's dtype."""
    K = x.shape[-1]
    N = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != K:
        raise ValueError(f"qweight must be uint8 (N, K/2) = (N, {K // 2}), got {qweight.dtype} {tuple(qweight.shape)}")
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape ({K},), got {tuple(g_idx.shape)}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    g_idx = g_idx.to(torch.int32).contiguous()
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else scales  # any pointer when there is no bias
    if M <= GEMV_MAX_ROWS:
        block_n, block_kp = (16, 16) if INTERPRET else (64, 64)
        grid = (M, triton.cdiv(N, block_n))
        _int4_gemv[grid](x2, qweight, scales, zeros, g_idx, b, y, N, K, x2.stride(0), qweight.stride(0),
                         scales.stride(0), y.stride(0), HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_KP=block_kp)
    else:
        block_m, block_n, block_k = (16, 16, 32) if INTERPRET else (64, 64, 64)
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _int4_gemm[grid](x2, qweight, scales, zeros, g_idx, b, y, M, N, K, x2.stride(0), qweight.stride(0),
                         scales.stride(0), y.stride(0), HAS_BIAS=has_bias, FP32=x.dtype == torch.float32,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.view(*x.shape[:-1], N)
