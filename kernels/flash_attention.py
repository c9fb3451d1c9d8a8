"""FlashAttention-2 in Triton: forward, backward, causal or not, grouped-query attention, and a
split-K decode path for the KV cache.

Paper: Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023), Algorithm 1 (forward) and Algorithm 2 (backward); the decode path follows "Flash-Decoding for
long-context inference" (Dao, Haziza, Massa, Sizov, 2023).

    out = softmax(sm_scale * Q K^T + mask) V          Q: (B, n_heads, Tq, D), K, V: (B, n_kv_heads, Tk, D)

Forward (one program per (query tile of BLOCK_M rows, batch, head)): the query tile stays in registers
while K/V tiles of BLOCK_N keys stream past. For each tile, with S = sm_scale * Q K_j^T:
    m_new = max(m, rowmax(S))                         running row maximum
    P     = exp(S - m_new)
    l     = l * exp(m - m_new) + rowsum(P)            running softmax denominator, rescaled
    acc   = acc * exp(m - m_new) + P V_j              unnormalised output, rescaled
and at the end out = acc / l, plus the log-sum-exp L = m + log(l) saved for the backward pass.
Exponentials are computed as exp2 with log2(e) folded into the scale (one multiply saved per score),
so L is stored in base 2. Key tiles that the causal mask or `kv_start` hide completely are never
visited; tiles that are partly masked (the causal diagonal, the ragged last tile, the `kv_start`
edge) run a masked copy of the loop, every other tile an unmasked one.

Backward (recompute instead of storing P): with D_i = rowsum(dO_i * O_i) (a preprocessing kernel),
    P  = exp(S - L)        dV = P^T dO        dP = dO V^T        dS = P * (dP - D)
    dK = sm_scale * dS^T Q                    dQ = sm_scale * dS K
One kernel owns a key tile and accumulates dK, dV over all query tiles (and, for grouped-query
attention, over every query head that reads this K/V head, so nothing is written twice and no atomics
are needed); a second kernel owns a query tile and accumulates dQ over key tiles.

Positions: query i sits at key position Tk - Tq + i, so with a KV cache (Tq < Tk) the queries are the
last Tq positions. `kv_start[b]` masks keys at positions < kv_start[b] (left-padded prompts). Rows that
see no key at all produce zeros, never NaN.

Decode (Tq of 1..a few tokens, no gradient): one program per (key split, batch, K/V head) packs all the
query heads of the group and all Tq queries into the rows of one tile, so each K/V element is read once;
each split writes a partial output and its log-sum-exp, and a reduce kernel combines the splits:
    out = sum_s exp(L_s - L) out_s,   L = log sum_s exp(L_s)
(with a single split, for a short cache or a batch that already fills the GPU, it writes out directly).

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (small fixed blocks, no autotuning).
Tests: `TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py`; speed: `python -m bench.kernels`.
"""
import math

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2_E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction
DECODE_MAX_ROWS = 64  # decode path when n_heads // n_kv_heads * Tq fits one tile of this many rows
INTERPRET_BLOCK = 32  # tile size under the CPU interpreter: small, so short test sequences span several tiles


# ----------------------------------------------------------------------------------------------------
# shared helpers (inlined into the kernels)

@triton.jit
def _key_tile_ranges(start_m, Tq, Tk, kv_start,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_KV_START: tl.constexpr):
    """Key ranges for the query tile starting at row start_m, as three consecutive segments:
    [lo, prefix_end) masked (the `kv_start` edge), [full_lo, full_hi) unmasked, [full_hi, hi) masked
    (the causal diagonal and the ragged end). Every bound except hi is a multiple of BLOCK_N."""
    q_offset = Tk - Tq
    if HAS_KV_START:
        lo = kv_start // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(kv_start, BLOCK_N) * BLOCK_N
    else:
        lo = 0
        full_lo = 0
    if CAUSAL:
        # the last row of the tile sees keys <= start_m + BLOCK_M - 1 + q_offset, the first row
        # sees keys <= start_m + q_offset: tiles ending at or before that need no causal mask
        hi = tl.minimum(Tk, start_m + BLOCK_M + q_offset)
        full_hi = tl.minimum((start_m + q_offset + 1) // BLOCK_N, Tk // BLOCK_N) * BLOCK_N
    else:
        hi = Tk
        full_hi = Tk // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    prefix_end = tl.minimum(full_lo, hi)
    return lo, prefix_end, full_lo, full_hi, hi


@triton.jit
def _visible(offs_m_pos, offs_n, Tk, kv_start, CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr):
    """(rows, keys) mask: key exists, is not left padding, and is not in the future of the query."""
    visible = offs_n[None, :] < Tk
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m_pos[:, None])
    if HAS_KV_START:
        visible = visible & (offs_n[None, :] >= kv_start)
    return visible


@triton.jit
def _load_kv_tile(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, Tk, MASKED: tl.constexpr):
    """The key and value rows offs_n (BLOCK_N, D); rows past Tk read as 0 when the tile may overhang."""
    k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m_pos, offs_d,
                          start, end, Tk, kv_start, qk_scale,
                          BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                          HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Stream key tiles [start, end) past the query tile q (rows, D), updating the running max m_i,
    denominator l_i and unnormalised output acc (rows, D), all fp32, in base-2 units."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k, v = _load_kv_tile(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, Tk, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (rows, BLOCK_N)
        if MASKED:
            s = tl.where(_visible(offs_m_pos, offs_n, Tk, kv_start, CAUSAL, HAS_KV_START), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was accumulated under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------------
# forward

@triton.jit(do_not_specialize=["Tq", "Tk", "seq_bucket"])
def _attn_fwd(Q, K, V, Out, LSE, KV_START,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              n_heads, Tq, Tk, sm_scale,
              seq_bucket,  # only read by the autotuner: re-tune when the length changes scale
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # last query tiles first: under the causal mask they have the most key tiles, and the short
    # ones launched afterwards fill the tail of the grid
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // GROUP  # grouped-query attention: GROUP query heads share this K/V head
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m_pos = offs_m + (Tk - Tq)  # key position of each query row

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < Tq, other=0.0)

    if HAS_KV_START:
        kv_start = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
    else:
        kv_start = 0
    lo, prefix_end, full_lo, full_hi, hi = _key_tile_ranges(start_m, Tq, Tk, kv_start,
                                                            BLOCK_M, BLOCK_N, CAUSAL, HAS_KV_START)
    qk_scale = sm_scale * LOG2_E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_KV_START:
        acc, l_i, m_i = _online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                              offs_m_pos, offs_d, lo, prefix_end, Tk, kv_start, qk_scale,
                                              BLOCK_N, True, CAUSAL, HAS_KV_START, DOT_PRECISION)
    acc, l_i, m_i = _online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                          offs_m_pos, offs_d, full_lo, full_hi, Tk, kv_start, qk_scale,
                                          BLOCK_N, False, CAUSAL, HAS_KV_START, DOT_PRECISION)
    acc, l_i, m_i = _online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                          offs_m_pos, offs_d, full_hi, hi, Tk, kv_start, qk_scale,
                                          BLOCK_N, True, CAUSAL, HAS_KV_START, DOT_PRECISION)

    # rows that saw no key (left padding under the causal mask) output 0 and get L = +inf, so the
    # backward pass recomputes P = exp2(S - L) = 0 for them
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < Tq)
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


# ----------------------------------------------------------------------------------------------------
# backward

@triton.jit(do_not_specialize=["Tq"])
def _attn_bwd_delta(Out, dOut, Delta,
                    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                    n_heads, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i): the softmax-backward correction term."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                      offs_n, offs_d, start, end, Tq, Tk, kv_start, qk_scale,
                      BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N, D) of one key tile over query tiles [start, end) of one head."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]  # (BLOCK_M, D)
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]  # (BLOCK_M, D)
        if MASKED:
            # rows past Tq load L = +inf, so their P is 0 and they add nothing
            q = tl.load(q_ptrs, mask=offs_m[:, None] < Tq, other=0.0)
            do = tl.load(do_ptrs, mask=offs_m[:, None] < Tq, other=0.0)
            lse = tl.load(lse_base + offs_m, mask=offs_m < Tq, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Tq, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # S^T: (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            # _visible is (rows, keys); here rows are keys, so build the transpose directly
            visible = offs_n[:, None] < Tk
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + (Tk - Tq))
            if HAS_KV_START:
                visible = visible & (offs_n[:, None] >= kv_start)
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["Tq", "Tk", "seq_bucket"])
def _attn_bwd_dkdv(Q, K, V, dOut, LSE, Delta, dK, dV, KV_START,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                   n_kv_heads, Tq, Tk, sm_scale,
                   seq_bucket,  # only read by the autotuner
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bkv = tl.program_id(1)
    b = pid_bkv // n_kv_heads
    kv_h = pid_bkv % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_rows = offs_n[:, None] < Tk
    k = tl.load(K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_rows, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_rows, other=0.0)

    # query tiles that see this key tile, as [lo, prefix_end) masked, [full_lo, full_hi) unmasked,
    # [full_hi, hi) masked (the ragged last query tile)
    q_offset = Tk - Tq
    hi = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # query row m sees key n iff m + q_offset >= n; rows below start_n - q_offset see nothing here
        lo = tl.maximum(start_n - q_offset, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(full_lo, hi)
    else:
        lo = 0
        full_lo = 0
    if HAS_KV_START:
        kv_start = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
        # a tile holding padding keys is masked for every query; one of padding only is skipped
        full_lo = tl.where(start_n < kv_start, hi, full_lo)
        lo = tl.where(start_n + BLOCK_N <= kv_start, hi, lo)
    else:
        kv_start = 0
    full_hi = tl.maximum(Tq // BLOCK_M * BLOCK_M, full_lo)
    prefix_end = tl.minimum(full_lo, hi)

    qk_scale = sm_scale * LOG2_E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(GROUP):  # every query head that reads this K/V head
        h = kv_h * GROUP + g
        bh = b * (n_kv_heads * GROUP) + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + bh.to(tl.int64) * Tq
        delta_base = Delta + bh.to(tl.int64) * Tq
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                   offs_n, offs_d, lo, prefix_end, Tq, Tk, kv_start, qk_scale,
                                   BLOCK_M, True, CAUSAL, HAS_KV_START, DOT_PRECISION)
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                   offs_n, offs_d, full_lo, full_hi, Tq, Tk, kv_start, qk_scale,
                                   BLOCK_M, False, CAUSAL, HAS_KV_START, DOT_PRECISION)
        dk, dv = _dkdv_query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                   offs_n, offs_d, full_hi, hi, Tq, Tk, kv_start, qk_scale,
                                   BLOCK_M, True, CAUSAL, HAS_KV_START, DOT_PRECISION)
    dk *= sm_scale  # S = sm_scale * Q K^T
    tl.store(dK + b.to(tl.int64) * stride_dkb + kv_h.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(dK.dtype.element_ty), mask=key_rows)
    tl.store(dV + b.to(tl.int64) * stride_dvb + kv_h.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=key_rows)


@triton.jit
def _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m_pos, offs_d,
                  start, end, Tk, kv_start, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (BLOCK_M, D) of one query tile over key tiles [start, end)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k, v = _load_kv_tile(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, Tk, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m_pos, offs_n, Tk, kv_start, CAUSAL, HAS_KV_START), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["Tq", "Tk", "seq_bucket"])
def _attn_bwd_dq(Q, K, V, dOut, LSE, Delta, dQ, KV_START,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 n_heads, Tq, Tk, sm_scale,
                 seq_bucket,  # only read by the autotuner
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest tiles first, as in _attn_fwd
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m_pos = offs_m + (Tk - Tq)
    rows = offs_m[:, None] < Tq
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh

    if HAS_KV_START:
        kv_start = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
    else:
        kv_start = 0
    lo, prefix_end, full_lo, full_hi, hi = _key_tile_ranges(start_m, Tq, Tk, kv_start,
                                                            BLOCK_M, BLOCK_N, CAUSAL, HAS_KV_START)
    qk_scale = sm_scale * LOG2_E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_KV_START:
        dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m_pos, offs_d,
                           lo, prefix_end, Tk, kv_start, qk_scale,
                           BLOCK_N, True, CAUSAL, HAS_KV_START, DOT_PRECISION)
    dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m_pos, offs_d,
                       full_lo, full_hi, Tk, kv_start, qk_scale,
                       BLOCK_N, False, CAUSAL, HAS_KV_START, DOT_PRECISION)
    dq = _dq_key_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m_pos, offs_d,
                       full_hi, hi, Tk, kv_start, qk_scale,
                       BLOCK_N, True, CAUSAL, HAS_KV_START, DOT_PRECISION)
    dq *= sm_scale
    tl.store(dQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=rows)


# ----------------------------------------------------------------------------------------------------
# decode: split the keys across programs, then reduce

@triton.jit(do_not_specialize=["Tq", "Tk", "keys_per_split"])
def _attn_decode_split(Q, K, V, PartOut, PartLse, Out, KV_START,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                       stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                       n_kv_heads, Tq, Tk, sm_scale, keys_per_split,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       SINGLE_SPLIT: tl.constexpr):
    """One key split of one K/V head: the rows of the tile are (query head g of the group, query i),
    row r = g * Tq + i, so all GROUP * Tq queries share each K/V load. With a single split (a short
    cache, or enough batch x heads to fill the GPU) the result goes straight to Out, with no reduce."""
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    pid_bkv = tl.program_id(1)
    b = pid_bkv // n_kv_heads
    kv_h = pid_bkv % n_kv_heads
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_r < GROUP * Tq
    g = offs_r // Tq
    i = offs_r % Tq
    h = kv_h * GROUP + g  # (BLOCK_R,) query head of each row
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh
                + i[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    offs_m_pos = i + (Tk - Tq)
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    if HAS_KV_START:
        kv_start = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
    else:
        kv_start = 0
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Tk)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    # decode is memory bound: masking every tile costs nothing measurable, so one masked loop
    acc, l_i, m_i = _online_softmax_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                          offs_m_pos, offs_d, lo, hi, Tk, kv_start, sm_scale * LOG2_E,
                                          BLOCK_N, True, CAUSAL, HAS_KV_START, DOT_PRECISION)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        tl.store(Out + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh
                 + i[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))  # an empty split weighs 0 in the reduce
        # PartOut: (B, n_heads, n_splits, Tq, D) fp32, PartLse: (B, n_heads, n_splits, Tq) fp32
        part_row = ((b * (n_kv_heads * GROUP) + h).to(tl.int64) * n_splits + split) * Tq + i
        tl.store(PartOut + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(PartLse + part_row, lse, mask=row_ok)


@triton.jit(do_not_specialize=["Tq", "n_splits"])
def _attn_decode_reduce(PartOut, PartLse, Out, stride_ob, stride_oh, stride_ot, n_heads, Tq, n_splits,
                        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """out = sum_s 2^(L_s - L) out_s with L = log2 sum_s 2^L_s, for one (batch, head, query) row."""
    pid = tl.program_id(0)  # = (b * n_heads + h) * Tq + i
    b = pid // (n_heads * Tq)
    h = (pid // Tq) % n_heads
    i = pid % Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    split_ok = offs_s < n_splits
    part_row = ((b * n_heads + h).to(tl.int64) * n_splits + offs_s) * Tq + i  # (BLOCK_S,)
    lse = tl.load(PartLse + part_row, mask=split_ok, other=float("-inf"))
    part = tl.load(PartOut + part_row[:, None] * HEAD_DIM + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    m = tl.max(lse, 0)
    weight = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # (BLOCK_S,), 0 for empty splits
    total = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i * stride_ot + offs_d,
             out.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------
# launch configuration: autotuned on a GPU, small fixed tiles in the CPU interpreter

def _configs(*shapes):
    """(BLOCK_M, BLOCK_N, num_stages, num_warps) tuples -> triton.Config list."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w) for bm, bn, s, w in shapes]


_TUNE_KEY = ["seq_bucket", "HEAD_DIM", "GROUP", "CAUSAL", "HAS_KV_START"]
# A short hand-picked list per kernel, so the first call compiles a few variants rather than dozens:
# block shapes from the range the Triton fused-attention tutorial tunes over, kept when they compile
# for sm_90 without register spills at head dim 64 or 128 (checked with cuobjdump -res-usage; not
# timed, as no GPU was at hand). Configs that do not fit in shared memory are skipped by the autotuner.
# autotune only builds a wrapper here; it benchmarks at the first GPU launch, so importing this module
# without a GPU is safe.
_attn_fwd_tuned = triton.autotune(
    _configs((128, 128, 3, 8), (128, 64, 3, 8), (128, 64, 2, 8), (128, 32, 3, 8),
             (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 3, 4), (64, 128, 3, 8)),
    key=_TUNE_KEY)(_attn_fwd)
# the dK/dV kernel owns a key tile and streams query tiles (long BLOCK_N, short BLOCK_M), dQ the opposite
_attn_bwd_dkdv_tuned = triton.autotune(
    _configs((32, 128, 3, 8), (64, 128, 3, 8), (32, 64, 3, 4), (32, 64, 3, 8), (16, 64, 3, 8), (32, 32, 3, 8)),
    key=_TUNE_KEY)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(
    _configs((128, 32, 3, 8), (128, 64, 3, 8), (64, 32, 3, 8), (64, 32, 3, 4), (64, 16, 3, 4), (64, 64, 3, 8)),
    key=_TUNE_KEY)(_attn_bwd_dq)


def _launch(kernel, tuned_kernel, grid, *args, **constexprs):
    """Fixed small tiles under the interpreter (autotune needs a GPU); the autotuned kernel on a GPU."""
    if INTERPRET:
        kernel[grid](*args, BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK, **constexprs)
    else:
        tuned_kernel[grid](*args, **constexprs)


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products (the default TF32 would cost ~1e-3 relative error on a GPU)
    return "ieee" if dtype == torch.float32 else "tf32"


def _seq_bucket(Tq, Tk):
    return triton.next_power_of_2(max(Tq, Tk))


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _forward(q, k, v, causal, sm_scale, kv_start):
    """Returns out (like q) and the base-2 log-sum-exp (B, n_heads, Tq) fp32."""
    B, n_heads, Tq, head_dim = q.shape
    Tk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, n_heads, Tq), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * n_heads)
    _launch(_attn_fwd, _attn_fwd_tuned, grid,
            q, k, v, out, lse, kv_start if kv_start is not None else q,  # any pointer when HAS_KV_START is off
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            n_heads, Tq, Tk, sm_scale, _seq_bucket(Tq, Tk),
            GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, CAUSAL=causal,
            HAS_KV_START=kv_start is not None, DOT_PRECISION=_dot_precision(q.dtype))
    return out, lse


def _backward(do, q, k, v, out, lse, causal, sm_scale, kv_start):
    B, n_heads, Tq, head_dim = q.shape
    n_kv_heads, Tk = k.shape[1], k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    delta_block = INTERPRET_BLOCK if INTERPRET else 64
    _attn_bwd_delta[(triton.cdiv(Tq, delta_block), B * n_heads)](
        out, do, delta, *_strides(out), *_strides(do), n_heads, Tq, HEAD_DIM=head_dim, BLOCK_M=delta_block)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim, CAUSAL=causal,
                  HAS_KV_START=kv_start is not None, DOT_PRECISION=_dot_precision(q.dtype))
    kv_start_arg = kv_start if kv_start is not None else q
    _launch(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned,
            lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * n_kv_heads),
            q, k, v, do, lse, delta, dk, dv, kv_start_arg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            n_kv_heads, Tq, Tk, sm_scale, _seq_bucket(Tq, Tk), **common)
    _launch(_attn_bwd_dq, _attn_bwd_dq_tuned,
            lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * n_heads),
            q, k, v, do, lse, delta, dq, kv_start_arg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            n_heads, Tq, Tk, sm_scale, _seq_bucket(Tq, Tk), **common)
    return dq, dk, dv


def _decode(q, k, v, causal, sm_scale, kv_start):
    """Split-K attention for a few queries against a long KV cache (flash-decoding)."""
    B, n_heads, Tq, head_dim = q.shape
    n_kv_heads, Tk = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    block_n = INTERPRET_BLOCK if INTERPRET else 64
    if INTERPRET:
        target_programs = 8  # several splits for small batches, so the tests exercise the reduction
    else:
        target_programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
    # enough splits to fill the machine, each at least one key tile long
    n_splits = max(1, min(triton.cdiv(Tk, block_n), triton.cdiv(target_programs, B * n_kv_heads)))
    keys_per_split = triton.cdiv(triton.cdiv(Tk, n_splits), block_n) * block_n
    n_splits = triton.cdiv(Tk, keys_per_split)
    out = torch.empty_like(q)
    if n_splits == 1:  # the split kernel writes out itself; the partial buffers are not touched
        part_out = part_lse = out
    else:
        part_out = torch.empty((B, n_heads, n_splits, Tq, head_dim), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((B, n_heads, n_splits, Tq), device=q.device, dtype=torch.float32)
    _attn_decode_split[(n_splits, B * n_kv_heads)](
        q, k, v, part_out, part_lse, out, kv_start if kv_start is not None else q,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        n_kv_heads, Tq, Tk, sm_scale, keys_per_split,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_R=max(16, triton.next_power_of_2(group * Tq)), BLOCK_N=block_n,
        CAUSAL=causal, HAS_KV_START=kv_start is not None, DOT_PRECISION=_dot_precision(q.dtype),
        SINGLE_SPLIT=n_splits == 1, num_warps=8)  # 8 warps: no register spills at head dim 128 (sm_90)
    if n_splits == 1:
        return out
    _attn_decode_reduce[(B * n_heads * Tq,)](
        part_out, part_lse, out, *_strides(out), n_heads, Tq, n_splits,
        HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(n_splits))
    return out


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, kv_start):
        out, lse = _forward(q, k, v, causal, sm_scale, kv_start)
        ctx.save_for_backward(q, k, v, out, lse, kv_start)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, kv_start = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.causal, ctx.sm_scale, kv_start)
        return dq, dk, dv, None, None, None


def _check_inputs(q, k, v, causal, kv_start):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D (B, heads, T, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"flash_attention: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("flash_attention: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 "
                           "before importing), or use a CUDA device")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    B, n_heads, Tq, head_dim = q.shape
    _, n_kv_heads, Tk, _ = k.shape
    if k.shape[0] != B or k.shape[3] != head_dim:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {head_dim} not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"flash_attention: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    if Tq == 0 or Tk == 0:
        raise ValueError(f"flash_attention: empty sequence (Tq={Tq}, Tk={Tk})")
    if causal and Tq > Tk:
        raise ValueError(f"flash_attention: causal with Tq={Tq} > Tk={Tk}: queries would precede every key")
    if kv_start is not None:
        if kv_start.shape != (B,) or kv_start.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"flash_attention: kv_start must be an int32/int64 tensor of shape ({B},), "
                             f"got {kv_start.dtype} {tuple(kv_start.shape)}")
        if kv_start.device != q.device:
            raise ValueError(f"flash_attention: kv_start is on {kv_start.device}, q on {q.device}")


def flash_attention(q, k, v, causal=True, sm_scale=None, kv_start=None):
    """Scaled dot-product attention, FlashAttention-2 style.

    q: (B, n_heads, Tq, head_dim); k, v: (B, n_kv_heads, Tk, head_dim) with n_heads % n_kv_heads == 0
    (grouped-query attention reads the shared K/V head in place). Query i sits at key position
    Tk - Tq + i. causal: query sees keys at positions <= its own. sm_scale: default 1/sqrt(head_dim).
    kv_start: optional int tensor (B,), keys at positions < kv_start[b] are hidden from row b.
    Returns out shaped like q; differentiable in q, k, v. Any strides with a contiguous last dim
    (e.g. a (B, T, heads, D) tensor transposed to (B, heads, T, D)) are read in place.
    A few queries without gradient (decoding with a KV cache) take the split-K decode kernel.
    """
    _check_inputs(q, k, v, causal, kv_start)
    head_dim = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if kv_start is not None:
        kv_start = kv_start.contiguous()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    group_rows = q.shape[1] // k.shape[1] * q.shape[2]
    if not needs_grad and group_rows <= DECODE_MAX_ROWS and q.shape[2] < k.shape[2]:
        return _decode(q, k, v, causal, sm_scale, kv_start)
    return _FlashAttention.apply(q, k, v, causal, sm_scale, kv_start)
