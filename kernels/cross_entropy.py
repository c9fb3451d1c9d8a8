"""Fused cross-entropy over a large vocabulary in Triton, forward and backward, without materialising
the softmax.

For one row of logits x (V entries) and target t:
    loss = logsumexp(x) - x[t]                       dloss/dx = softmax(x) - onehot(t)
The forward pass reads each row once in chunks of BLOCK_V, keeping a running maximum m and a running
sum s of exp(x - m) rescaled whenever m grows (the online log-sum-exp of Milakov & Gimelshein,
"Online normalizer calculation for softmax", 2018); it saves only the per-row log-sum-exp (N fp32
values). The backward pass reads the logits again and writes (exp(x - lse) - onehot) * scale straight
into the logits gradient, so the only (N, V) tensor ever allocated is that gradient, in the logits'
dtype: an unfused `F.cross_entropy(logits.float(), targets)` holds an fp32 copy of the logits, an fp32
log-softmax and an fp32 gradient on top.

The loss is the mean over targets != ignore_index (NaN when every target is ignored, as in torch).

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1.
Tests: `TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py`; speed: `python -m bench.kernels`.
"""
import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
INTERPRET_BLOCK_V = 64  # small chunks under the interpreter, so tests cover several chunks per row


@triton.jit
def _cross_entropy_fwd(Logits, Targets, Loss, LSE, stride_row, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)  # running max
    s = tl.zeros([], tl.float32)  # running sum of exp(x - m)
    for start in tl.range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))  # finite: every chunk holds at least one real logit
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(Targets + row)
    valid = target != ignore_index
    target_logit = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - target_logit, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_bwd(Logits, Targets, LSE, Scale, dLogits, stride_row, stride_drow, V, ignore_index,
                       BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(Targets + row)
    valid = target != ignore_index
    lse = tl.load(LSE + row)
    scale = tl.load(Scale)  # grad_output / n_valid, read on the device so the host never syncs
    for start in tl.range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(Logits + row * stride_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)) * scale
        grad = tl.where(valid, grad, 0.0)  # ignored rows get exactly 0, even when scale is inf
        tl.store(dLogits + row * stride_drow + offs, grad.to(dLogits.dtype.element_ty), mask=offs < V)


def _block_v(V):
    if INTERPRET:
        return INTERPRET_BLOCK_V
    return min(triton.next_power_of_2(V), 8192)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        N, V = logits.shape
        loss_rows = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty(N, device=logits.device, dtype=torch.float32)
        _cross_entropy_fwd[(N,)](logits, targets, loss_rows, lse, logits.stride(0), V, ignore_index,
                                 BLOCK_V=_block_v(V), num_warps=8)
        n_valid = (targets != ignore_index).sum()
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index = ignore_index
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, n_valid = ctx.saved_tensors
        N, V = logits.shape
        scale = (grad_loss.float() / n_valid).reshape(1)
        dlogits = torch.empty_like(logits)
        _cross_entropy_bwd[(N,)](logits, targets, lse, scale, dlogits, logits.stride(0), dlogits.stride(0), V,
                                 ctx.ignore_index, BLOCK_V=_block_v(V), num_warps=8)
        return dlogits, None, None


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean cross-entropy of logits (N, V) against integer targets (N,), skipping targets equal to
    ignore_index. Returns an fp32 scalar (whatever the logits dtype); differentiable in logits."""
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy: expected logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"cross_entropy: logits dtype {logits.dtype}; use float16, bfloat16 or float32")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cross_entropy: targets dtype {targets.dtype}; use int64 or int32")
    if logits.device != targets.device:
        raise ValueError(f"cross_entropy: logits on {logits.device}, targets on {targets.device}")
    if logits.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("cross_entropy: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 "
                           "before importing), or use a CUDA device")
    if logits.shape[0] == 0:
        raise ValueError("cross_entropy: empty batch (N = 0)")
    V = logits.shape[1]
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if out_of_range.any():  # one host sync; a bad target would otherwise read outside the row
        bad = targets[out_of_range][0].item()
        raise ValueError(f"cross_entropy: target {bad} outside [0, {V}) and not ignore_index={ignore_index}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _CrossEntropy.apply(logits, targets.contiguous(), int(ignore_index))
