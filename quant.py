"""Quantization of a trained model: round-to-nearest, GPTQ and NF4 weights, packed storage, QLoRA; AWQ and
SmoothQuant W8A8 through activation_quant.py.

    python quant.py --ckpt out/shakespeare --method gptq --bits 4 --group-size 128 --out-dir out/shakespeare-gptq4
    python quant.py --ckpt out/shakespeare --method rtn --bits 8 --group-size 0 --out-dir out/shakespeare-int8
    python quant.py --ckpt out/shakespeare --method nf4 --group-size 64 --qlora-steps 200 --out-dir DIR   # QLoRA
    python quant.py --ckpt out/shakespeare --method awq --bits 4 --group-size 128 --out-dir DIR   # activation_quant.py
    python quant.py --ckpt out/shakespeare --method smoothquant --alpha 0.5 --out-dir DIR         # W8A8

The blocks' linear layers (in a mixture-of-experts block those of every expert; routers stay in full
precision) become QuantLinear (quant_linear.py): b-bit codes q, and per output row and group
of `group_size` input columns an fp16 scale s and zero z, w ~ s (q - z) (s rounded to fp16 before any code
is chosen, so the stored model is exactly the evaluated one).
- RTN: each weight to its nearest grid point.
- GPTQ (Frantar et al. 2022, arXiv:2210.17323, Algorithm 1): minimise the layer's output error
  ||W X - Q X||^2 over calibration inputs X, one column at a time, pushing each column's rounding error onto
  the columns not yet quantized through the inverse Hessian H = 2 X X^T:
      H += percdamp * mean(diag H) * I;  U = cholesky(H^-1, upper)
      for each column i:  q_i = quant(w_i);  e_i = (w_i - q_i) / U_ii;  W[:, i:] -= e_i U[i, i:]
  (lazy updates in blocks of 128 columns, optional act-order, group grids found when a group's first column
  is reached, from W as it stands then: the earlier lazy blocks' updates are in it, the current block's not
  yet, as in the reference code IST-DASLab/gptq), layer after layer in the order their inputs are computed,
  each calibrated on inputs that went through the already quantized layers.
- NF4 (Dettmers et al. 2023, QLoRA): the 16 NormalFloat values, a per-group absmax scale.
The --out-dir directory is an ordinary checkpoint (common.load_model reads it) with the tokenizer and a
summary.json; QLoRA trains LoRA adapters on the frozen QuantLinear layers (lora.py), then merges them into a
full-precision model that can be quantized again. Benchmark: python -m bench.quant --ckpt DIR.
"""
import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common import (CHECKPOINT_FILE, UsageError, atomic_write, exit_on_error, load_model, load_tokenizer,
                    peak_memory_mb, read_checkpoint, resolve_device, save_checkpoint)
from evaluate import evaluate_model
from model import Transformer
from moe import MoE
from quant_linear import NF4_VALUES, QuantError, QuantLinear, W8A8Linear, dequantize_codes, set_module
from training import BatchSampler, load_split, read_meta

BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq", "nf4", "awq", "awq-gptq", "smoothquant", "w8a8")
ACTIVATION_METHODS = ("awq", "awq-gptq", "smoothquant", "w8a8")  # activation_quant.py
W8A8_METHODS = ("smoothquant", "w8a8")                        # int8 weights and int8 activations
CALIBRATED_METHODS = ("gptq", "awq", "awq-gptq", "smoothquant")
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# GPTQ's "true sequential" order inside a block: layers that read the same input are done together
SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


class FlagError(QuantError, UsageError):
    """A flag value the user can fix (exit status 2)."""


class GroupSizeError(FlagError):
    """A group size that does not divide a layer's width: the user's flag to change (exit status 2)."""


def sequential_groups(block: nn.Module) -> list[tuple[str, ...]]:
    """SEQUENTIAL_GROUPS of one block. In a mixture-of-experts block the mlp names stand for every expert's
    (and the shared expert's) layers; an expert's layers only ever see the tokens routed to it, so GPTQ
    quantizes each expert with the Hessian of its own tokens. The router (mlp.gate) stays in full precision."""
    mlps = ["mlp."]
    if isinstance(block.mlp, MoE):
        mlps = [f"mlp.experts.{e}." for e in range(len(block.mlp.experts))]
        mlps += ["mlp.shared_expert."] if block.mlp.shared_expert is not None else []
    return [tuple(p + n.removeprefix("mlp.") for p in mlps for n in group) if group[0].startswith("mlp.") else group
            for group in SEQUENTIAL_GROUPS]


@dataclass
class QuantSpec:
    method: str = "gptq"         # rtn | gptq | nf4 | awq | awq-gptq | smoothquant | w8a8
    bits: int = 4
    group_size: int = 128        # input columns sharing one scale and zero; 0: one group per row
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    block_size: int = 128        # GPTQ's lazy-update block
    alpha: float | None = None   # AWQ: fixed instead of searched; SmoothQuant: migration strength (None: 0.5)

    def __post_init__(self):
        if self.method not in METHODS:
            raise FlagError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in BITS:
            raise FlagError(f"bits must be one of {BITS}, got {self.bits}")
        if self.method in W8A8_METHODS and self.bits != 8:
            raise FlagError(f"{self.method} is W8A8: bits must be 8, got {self.bits}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise FlagError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.method == "nf4" and self.bits != 4:
            raise FlagError(f"nf4 is a 4-bit data type, got bits={self.bits}")
        if self.group_size < 0:
            raise FlagError(f"group size must be 0 (per channel) or positive, got {self.group_size}")
        if not 0 < self.percdamp < 1:
            raise QuantError(f"percdamp must be in (0, 1), got {self.percdamp}")

    def groups_of(self, in_features: int, name: str = "layer") -> int:
        """The group size actually used for a layer of this width (per channel: the whole row)."""
        if self.group_size == 0:
            return in_features
        if in_features % self.group_size:
            largest = max(d for d in range(1, min(self.group_size, in_features) + 1) if in_features % d == 0)
            raise GroupSizeError(f"--group-size {self.group_size} does not divide the {in_features} input columns of "
                             f"{name}: give a divisor (the largest up to {self.group_size} is {largest}) or 0 (per channel)")
        return self.group_size

    def label(self) -> str:
        if self.method in W8A8_METHODS:
            return "SmoothQuant W8A8" + (f" alpha {self.alpha}" if self.alpha is not None else "") \
                if self.method == "smoothquant" else "W8A8 (not smoothed)"
        group = "pc" if self.group_size == 0 else f"g{self.group_size}"
        kind = "nf" if self.method == "nf4" else "int"
        extra = (" sym" if self.sym else "") + (" act-order" if self.act_order else "") + \
                (" static-groups" if self.static_groups else "")
        return f"{self.method.upper()} {kind}{self.bits} {group}{extra}"


# ----------------------------------------------------------------------------------------------------------
# The grid: scales and zeros for a set of weights, and rounding onto it

def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w (rows, n) -> scale, zero (rows, 1) fp32, both exactly representable in fp16."""
    maxq = 2 ** bits - 1
    w_min = w.min(dim=1, keepdim=True).values.clamp(max=0)  # the grid always contains 0 (padding, ReLU zeros)
    w_max = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        w_max = torch.maximum(-w_min, w_max)
        w_min = -w_max
    empty = (w_min == 0) & (w_max == 0)
    w_min, w_max = w_min.masked_fill(empty, -1.0), w_max.masked_fill(empty, 1.0)
    scale = ((w_max - w_min) / maxq).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-w_min / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def nf4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (rows, n) -> absmax scale (rows, 1) fp32 (fp16-representable), zero unused (0)."""
    scale = w.abs().amax(dim=1, keepdim=True).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    return scale, torch.zeros_like(scale)


def nf4_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(NF4_VALUES, device=w.device)
    return (w / scale)[..., None].sub(values).abs().argmin(-1).float()  # nearest of the 16 values


class Grid:
    """Finds a group's grid and rounds onto it, for the integer grids and NF4 alike."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.nf4 = spec.method == "nf4"

    def params(self, w):
        return nf4_params(w) if self.nf4 else grid_params(w, self.spec.bits, self.spec.sym)

    def codes(self, w, scale, zero):
        return nf4_codes(w, scale) if self.nf4 else quantize_codes(w, scale, zero, self.spec.bits)

    def dequant(self, codes, scale, zero):
        return dequantize_codes(codes, scale, zero, self.nf4)


@dataclass
class Quantized:
    """One quantized weight: codes (out, in) in the original column order, grids per group."""
    codes: torch.Tensor        # (out, in) float holding integers
    scales: torch.Tensor       # (out, n_groups) fp32
    zeros: torch.Tensor        # (out, n_groups) fp32
    g_idx: torch.Tensor        # (in,) group of each input column
    bits: int
    nf4: bool
    ordered_groups: bool       # g_idx == column // group_size: nothing to store

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales[:, self.g_idx], self.zeros[:, self.g_idx], self.nf4)


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "layer") -> Quantized:
    """Round to nearest, group by group."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    group_size = spec.groups_of(in_features, name)
    grid = Grid(spec)
    groups = w.view(out_features, in_features // group_size, group_size)
    scales, zeros, codes = [], [], []
    for g in range(groups.shape[1]):
        scale, zero = grid.params(groups[:, g])
        scales.append(scale)
        zeros.append(zero)
        codes.append(grid.codes(groups[:, g], scale, zero))
    g_idx = torch.arange(in_features, device=w.device) // group_size
    return Quantized(torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1), g_idx, spec.bits,
                     grid.nf4, ordered_groups=True)


# ----------------------------------------------------------------------------------------------------------
# GPTQ

class GPTQ:
    """The Hessian of one linear layer's output error, accumulated from its inputs, and Algorithm 1."""

    def __init__(self, in_features: int, name: str = "layer", device="cpu"):
        self.name = name
        self.H = torch.zeros(in_features, in_features, device=device)  # fp32 always (bf16 X X^T overflows)
        self.n_samples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x (..., in_features): H = 2/n sum_t x_t x_t^T, kept as a running mean over all tokens seen."""
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:  # an MoE expert that no token of this batch was routed to
            return
        self.H *= self.n_samples / (self.n_samples + n)
        self.n_samples += n
        x = math.sqrt(2 / self.n_samples) * x
        self.H += x.T @ x

    def inverse_hessian_cholesky(self, H: torch.Tensor, percdamp: float) -> torch.Tensor:
        """Upper Cholesky factor of (H + damp I)^-1; retries with 10x the damping, then a clear error."""
        mean_diag = torch.mean(torch.diag(H))
        eye = torch.eye(H.shape[0], device=H.device)
        for attempt in range(4):
            damp = percdamp * 10 ** attempt
            L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
            if info == 0:
                H_inv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(H_inv, upper=True)
                if info == 0:
                    return U
        raise QuantError(f"{self.name}: the Hessian is not positive definite even with damping {damp:g} "
                         f"x mean diagonal (too few or degenerate calibration samples?)")

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> tuple[Quantized, float]:
        """Returns the quantized weight and GPTQ's own loss estimate sum (w - q)^2 / U_ii^2 / 2."""
        W = weight.detach().float().clone()                                # (out, in)
        out_features, in_features = W.shape
        group_size = spec.groups_of(in_features, self.name)
        grid = Grid(spec)
        H = self.H.clone()
        n_groups = in_features // group_size
        scales = torch.zeros(out_features, n_groups, device=W.device)
        zeros = torch.zeros(out_features, n_groups, device=W.device)
        if n_groups == 1:  # per channel: one grid per row from the whole row, before dead columns are zeroed
            scales[:], zeros[:] = grid.params(W)
        dead = torch.diag(H) == 0                                          # inputs that are always 0
        H[dead, dead] = 1
        W[:, dead] = 0
        if spec.static_groups and n_groups > 1:  # every group's grid from the unpermuted, not yet updated weights
            for g in range(n_groups):
                scales[:, g:g + 1], zeros[:, g:g + 1] = grid.params(W[:, g * group_size:(g + 1) * group_size])
        upfront = spec.static_groups or n_groups == 1

        perm = torch.arange(in_features, device=W.device)
        if spec.act_order:  # the columns with the largest input energy first, while there is slack left
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        U = self.inverse_hessian_cholesky(H, spec.percdamp)                # (in, in) upper triangular

        block = spec.block_size
        Q = torch.zeros_like(W)                                            # codes, permuted order
        column_group = torch.zeros(in_features, dtype=torch.long, device=W.device)  # permuted order
        losses = torch.zeros_like(W)
        for i1 in range(0, in_features, block):
            i2 = min(i1 + block, in_features)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                col = i1 + i
                if upfront:
                    g = perm[col].item() // group_size
                else:
                    g = col // group_size
                    if col % group_size == 0:
                        # a new group's grid from W, which holds the earlier blocks' updates but not this
                        # block's (W1's): the reference code's choice, kept so results match it bit for bit
                        scales[:, g:g + 1], zeros[:, g:g + 1] = grid.params(W[:, col:col + group_size])
                column_group[col] = g
                w, d = W1[:, i], U1[i, i]
                q = grid.codes(w[:, None], scales[:, g:g + 1], zeros[:, g:g + 1])[:, 0]
                w_hat = grid.dequant(q[:, None], scales[:, g:g + 1], zeros[:, g:g + 1])[:, 0]
                Q[:, col] = q
                losses[:, col] = (w - w_hat) ** 2 / d ** 2 / 2
                err = (w - w_hat) / d                                      # (out,)
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]             # OBS update inside the block
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]                              # lazy: the rest, once per block

        inverse = torch.argsort(perm)
        ordered = not spec.act_order or spec.static_groups
        quantized = Quantized(Q[:, inverse], scales, zeros, column_group[inverse], spec.bits, grid.nf4,
                              ordered_groups=ordered)
        return quantized, losses.sum().item()


def target_names(model: Transformer, quantize_head: bool) -> list[str]:
    names = [f"layers.{i}.{n}" for i, block in enumerate(model.layers) for group in sequential_groups(block) for n in group]
    return names + (["lm_head"] if quantize_head else [])


# ----------------------------------------------------------------------------------------------------------
# Whole models

def relative_output_error(weight: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Q) X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T), D = W - Q, from H = 2 X X^T / n."""
    D = (weight.float() - w_hat)
    return ((D @ H) * D).sum().item() / max(((weight.float() @ H) * weight.float()).sum().item(), 1e-30)


@torch.no_grad()
def quantize_model(model: Transformer, spec: QuantSpec, calib: torch.Tensor | None = None, quantize_head=False,
                   batch_size: int = 16, log=print) -> list[dict]:
    """Replace the target linear layers by QuantLinear in place. calib (n, T) token ids: GPTQ's
    calibration sequences (also used by RTN/NF4 to report output errors when given). Returns one row per layer."""
    names = target_names(model, quantize_head)
    for name in names:  # every layer checked before any work: a bad group size fails at once
        layer = model.get_submodule(name)
        spec.groups_of(layer.in_features, name)
        if layer.in_features % 8:
            raise QuantError(f"{name}: in_features {layer.in_features} is not a multiple of 8 (needed for packing)")
    if spec.method == "gptq" and calib is None:
        raise QuantError("GPTQ needs calibration data")
    if calib is None:
        report = []
        for name in names:
            layer = model.get_submodule(name)
            q = rtn_quantize(layer.weight, spec, name)
            report.append(_layer_row(name, layer.weight, q, None, log))
            set_module(model, name, QuantLinear.from_quantized(q, layer.bias))
        return report

    # Sequential pass: the inputs of block i are the outputs of blocks 0..i-1 as already quantized.
    device = model.embed_tokens.weight.device
    T = calib.shape[1]
    cos, sin = model.rope(torch.arange(T, device=device), model.embed_tokens.weight.dtype, T)
    batches = [calib[i:i + batch_size].to(device) for i in range(0, len(calib), batch_size)]
    hidden = [model.embed_tokens(b) for b in batches]                    # list of (b, T, dim)
    report = []

    class InputsSeen(Exception):
        """Raised once every layer of a group has its input: the rest of the block's forward is not needed."""

    def quantize_group(root, prefix, group_names, run):
        layers = {n: root.get_submodule(n) for n in group_names}
        full = {n: prefix + n for n in group_names}
        hessians = {}  # layers fed the very same tensor (q/k/v, gate/up) share one H: GPTQ.quantize clones it
        fed = {}       # name -> its input in this batch

        def record(name, x):
            twin = next((n for n, seen in fed.items() if seen is x), None)
            if twin is not None:
                hessians[name] = hessians[twin]
            else:
                hessians.setdefault(name, GPTQ(layers[name].in_features, full[name], device)).add_batch(x)
            fed[name] = x
            if len(fed) == len(layers):
                raise InputsSeen
        hooks = [layer.register_forward_pre_hook(lambda m, inp, n=n: record(n, inp[0])) for n, layer in layers.items()]
        for h in hidden:
            fed.clear()
            try:
                run(h)
            except InputsSeen:  # q/k/v need only the norm's output, o_proj the attention's: about half the work
                pass
        for hook in hooks:
            hook.remove()
        for n, layer in layers.items():
            hessians.setdefault(n, GPTQ(layer.in_features, full[n], device))  # an expert no token was routed to
            seen = hessians[n].n_samples > 0  # False for an expert no calibration token was routed to: RTN
            if spec.method == "gptq" and seen:
                hessians[n].name = full[n]  # a shared H: its messages name the layer being quantized
                q, _ = hessians[n].quantize(layer.weight, spec)
            else:
                q = rtn_quantize(layer.weight, spec, full[n])
            report.append(_layer_row(full[n], layer.weight, q, hessians[n].H if seen else None, log))
            set_module(root, n, QuantLinear.from_quantized(q, layer.bias))

    for i, block in enumerate(model.layers):
        for group in sequential_groups(block):
            quantize_group(block, f"layers.{i}.", group, lambda h: block(h, cos, sin))
        hidden = [block(h, cos, sin) for h in hidden]
    if quantize_head:
        quantize_group(model, "", ["lm_head"], lambda h: model.lm_head(model.norm(h)))
    return report


def _layer_row(name, weight, q: Quantized, H, log) -> dict:
    w_hat = q.dequantize()
    row = {"layer": name, "weight_rel_err": ((weight.float() - w_hat).norm() / weight.float().norm()).item()}
    if H is not None:
        row["output_rel_err"] = relative_output_error(weight, w_hat, H)
    if log:
        log(f"  {name:28s} weight rel err {row['weight_rel_err']:.4f}" +
            (f" | output rel err {row['output_rel_err']:.5f}" if H is not None else ""))
    return row


def calibration_tokens(data_dir, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n_samples random windows of seq_len tokens from the train split of a prepared data directory."""
    data_dir = Path(data_dir)
    data = load_split(data_dir, "train", read_meta(data_dir))
    if len(data) <= seq_len:
        raise QuantError(f"{data_dir}: train split has {len(data)} tokens, fewer than --calib-seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - seq_len, (n_samples,), generator=g).tolist()
    return torch.from_numpy(np.stack([data[s:s + seq_len] for s in starts]).astype(np.int64))


def linear_bytes(model: nn.Module, names: list[str]) -> tuple[int, int]:
    """(bytes the named layers take as stored, bytes the same weights take in fp16)."""
    stored, fp16 = 0, 0
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, (QuantLinear, W8A8Linear)):
            stored += layer.storage_bytes()
            fp16 += layer.in_features * layer.out_features * 2
        else:
            stored += layer.weight.numel() * layer.weight.element_size()
            fp16 += layer.weight.numel() * 2
    return stored, fp16


# ----------------------------------------------------------------------------------------------------------
# Saving and loading a quantized checkpoint

def save_quantized(model: Transformer, out_dir, spec: QuantSpec, source_dir=None, extra: dict | None = None) -> Path:
    """out_dir/ckpt.pt (common.save_checkpoint: the state dict with the QuantLinear buffers, the model
    config, quant_config = the spec and the quantized layers); the tokenizer files beside the source
    checkpoint are copied along."""
    out_dir = Path(out_dir)
    if source_dir is not None:  # first: save_checkpoint records the identity of the tokenizer beside it
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in Path(source_dir).iterdir():
            if f.name.startswith("tokenizer"):
                shutil.copy(f, out_dir / f.name)
    return save_checkpoint(out_dir, model, quant_config=asdict(spec), **(extra or {}))


# ----------------------------------------------------------------------------------------------------------
# QLoRA

def merge_qlora(model: Transformer) -> Transformer:
    """A full-precision copy of a QLoRA model: every QuantLinear dequantized and the adapters folded in
    (lora.merged_state_dict). The result can be quantized again."""
    from lora import merged_state_dict
    merged = Transformer(model.config).to(next(model.parameters()).device)
    merged.load_state_dict(merged_state_dict(model))
    return merged.eval()


def train_qlora(model: Transformer, data: np.ndarray, steps: int, lr: float = 1e-3, batch_size: int = 8,
                seq_len: int = 64, seed: int = 0, log=print) -> list[float]:
    """A minimal QLoRA loop: AdamW on the adapters only, next-token loss on random windows. Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QuantError("no trainable parameters: apply_lora(model, ...) first")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sampler = BatchSampler(data, seq_len, batch_size, seed)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for step in range(steps):
        x, y = (t.to(device) for t in sampler.next_batch())
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"qlora step {step + 1}/{steps} | loss {loss.item():.4f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------
# Evaluation and the CLI

def val_metrics(model, data_dir, seq_len: int, max_tokens: int = 0) -> dict:
    """val_loss, val_ppl, val_bpb of the data's val split (evaluate.evaluate_model, in fp32 as quantized)."""
    return evaluate_model(model, None, data=data_dir, seq_len=seq_len, batch_size=32, max_tokens=max_tokens,
                          dtype="float32")


def data_dir_of(ckpt_dir, given: str | None) -> Path:
    """--data, else the data directory the checkpoint was trained on (train.py records it)."""
    if given:
        return Path(given)
    path = Path(ckpt_dir)
    trained_here = (path / CHECKPOINT_FILE).is_file() if path.is_dir() else path.suffix == ".pt"  # not a .gguf or HF dir
    data = (read_checkpoint(ckpt_dir).get("train_config") or {}).get("data") if trained_here else None
    if not data:
        raise FlagError(f"{ckpt_dir}: the model does not name its training data; give --data (calibration and "
                        f"perplexity) or --calib-data with --no-eval (calibration only)")
    return Path(data)


def run_one(args, spec: QuantSpec, data_dir: Path, log=print) -> tuple[Transformer, dict]:
    model = load_model(args.ckpt, device=args.device)
    seq_len = args.calib_seq_len or min(512, model.config.max_seq_len)
    calib = calibration_tokens(Path(args.calib_data) if args.calib_data else data_dir, args.calib_samples, seq_len,
                               args.seed) if spec.method in CALIBRATED_METHODS else None
    t0 = time.time()
    if spec.method in ACTIVATION_METHODS:
        from activation_quant import activation_quantize  # it imports this module: imported when used
        report = activation_quantize(model, spec, calib, log=log)
    else:
        report = quantize_model(model, spec, calib, args.quantize_head, log=log)
    elapsed = time.time() - t0
    names = target_names(model, args.quantize_head)
    stored, fp16 = linear_bytes(model, names)
    return model, {"report": report, "quant_time_s": elapsed, "linear_bytes": stored, "linear_fp16_bytes": fp16}


def qlora(args, model: Transformer, spec: QuantSpec, data_dir: Path) -> dict:
    """LoRA on the frozen quantized model, then the adapters merged and the result quantized again.
    Returns the perplexities of both for summary.json."""
    from lora import apply_lora, save_adapter
    seq_len = model.config.max_seq_len
    counts = apply_lora(model, r=8, alpha=16)
    print(f"QLoRA: {counts['trainable']:,} trainable parameters in {counts['layers']} adapters")
    train_data = load_split(data_dir, "train", read_meta(data_dir))
    train_qlora(model, train_data, args.qlora_steps, lr=args.qlora_lr, batch_size=16, seq_len=seq_len, seed=args.seed)
    if args.out_dir:
        save_adapter(model, Path(args.out_dir) / "adapter.pt")
    adapted = val_metrics(model, data_dir, seq_len, args.eval_tokens)
    merged = merge_qlora(model)
    calib = calibration_tokens(data_dir, args.calib_samples, args.calib_seq_len or min(512, seq_len), args.seed) \
        if spec.method == "gptq" else None
    quantize_model(merged, spec, calib, args.quantize_head, log=None)
    requantized = val_metrics(merged, data_dir, seq_len, args.eval_tokens)
    print(f"| {spec.label()} + LoRA ({args.qlora_steps} steps) | {adapted['val_ppl']:.3f} | {adapted['val_bpb']:.4f} |")
    print(f"| merged and quantized again | {requantized['val_ppl']:.3f} | {requantized['val_bpb']:.4f} |")
    return {"qlora_steps": args.qlora_steps, "qlora_val_ppl": adapted["val_ppl"], "qlora_val_bpb": adapted["val_bpb"],
            "requantized_val_ppl": requantized["val_ppl"], "requantized_val_bpb": requantized["val_bpb"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trained model: a nanollm checkpoint directory or a Hugging Face directory")
    p.add_argument("--out-dir", "--out", dest="out_dir", help="where to write the quantized checkpoint (omit: evaluate only)")
    p.add_argument("--method", default="gptq", choices=METHODS)
    p.add_argument("--bits", type=int, help=f"bits per weight, one of {BITS} (default: 8 for smoothquant and w8a8, else 4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale/zero (0: per output channel)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (zero fixed at the middle)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="GPTQ act-order: group grids fixed before reordering")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening, a fraction of the mean Hessian diagonal")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (GPTQ, AWQ, SmoothQuant)")
    p.add_argument("--calib-data", help="prepared data directory whose train split calibrates (default: --data)")
    p.add_argument("--alpha", type=float, help="SmoothQuant's migration strength in [0, 1] (default 0.5); "
                                               "AWQ: use this alpha instead of searching [0, 1]")
    p.add_argument("--calib-seq-len", type=int, default=0, help="tokens per calibration sequence (0: min(512, model context))")
    p.add_argument("--data", help="prepared data directory: train split for calibration, val split for perplexity "
                                  "(default: the one the checkpoint was trained on)")
    p.add_argument("--quantize-head", action="store_true", help="quantize the LM head too")
    p.add_argument("--eval-tokens", type=int, default=0, help="validation tokens for perplexity (0: the whole split)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity table")
    p.add_argument("--qlora-steps", type=int, default=0, help="QLoRA: train LoRA adapters (all block linears, r 8, "
                                                             "alpha 16) on the quantized model for this many steps")
    p.add_argument("--qlora-lr", type=float, default=1e-3, help="QLoRA learning rate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    return p.parse_args(argv)


def check_out(ckpt, out) -> None:
    """Refuse an --out that would overwrite the model being quantized, or another full-precision
    checkpoint (a training run's), before anything is computed or written."""
    if not out:
        return
    source, target = Path(ckpt).resolve(), Path(out).resolve()
    source_dir = source if source.is_dir() else source.parent
    if source_dir in (target, target.parent if target.name == CHECKPOINT_FILE else None):
        raise UsageError(f"--out-dir {out} is --ckpt's directory: the quantized checkpoint would replace the model it "
                         f"is made from; give another --out-dir")
    existing = target / CHECKPOINT_FILE
    if existing.is_file() and "quant_config" not in torch.load(existing, map_location="cpu", mmap=True,
                                                                weights_only=False):
        raise UsageError(f"--out-dir {out} holds a full-precision checkpoint ({existing}), which would be replaced; "
                         f"give another --out-dir")


def model_fp16_bytes(model: Transformer) -> int:
    """Bytes of the model's weights in fp16 (a quantized layer counted as its full matrix, a tied one once)."""
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (QuantLinear, W8A8Linear)))
    return 2 * (sum(p.numel() for p in model.parameters()) + quantized)


def error_stats(report: list[dict]) -> dict:
    """Mean and max of the per-layer errors quantize_model reports, and the worst layer."""
    stats = {}
    for key in ("weight_rel_err", "output_rel_err"):
        values = [row[key] for row in report if key in row]
        if values:
            stats[f"{key}_mean"], stats[f"{key}_max"] = sum(values) / len(values), max(values)
    worst = max(report, key=lambda row: row.get("output_rel_err", row["weight_rel_err"]))
    return {**stats, "worst_layer": worst["layer"]}


def main(argv=None):
    args = parse_args(argv)
    try:
        check_out(args.ckpt, args.out_dir)
        t0 = time.time()
        args.device = resolve_device(args.device)
        needs_data = (args.method in CALIBRATED_METHODS and not args.calib_data) or not args.no_eval \
            or args.qlora_steps
        data_dir = data_dir_of(args.ckpt, args.data) if needs_data else None
        if args.method in ACTIVATION_METHODS and (args.quantize_head or args.qlora_steps):
            raise FlagError(f"--method {args.method} quantizes the block linears only: --quantize-head and "
                             f"--qlora-steps are for rtn, gptq and nf4")
        if args.method in CALIBRATED_METHODS and args.calib_samples < 1:
            raise FlagError(f"--method {args.method} needs calibration data: --calib-samples must be at least 1, "
                             f"got {args.calib_samples}")
        bits = args.bits if args.bits is not None else (8 if args.method in W8A8_METHODS else 4)
        spec = QuantSpec(args.method, bits, args.group_size, args.sym, args.act_order, args.static_groups,
                         args.percdamp, alpha=args.alpha)
        for flag, directory in (("--calib-data", args.calib_data), ("--data", data_dir)):
            if directory and not (Path(directory) / "meta.json").is_file():
                raise FlagError(f"{flag} {directory}: not a directory written by data/prepare.py (no meta.json)")
        print(f"{spec.label()}: quantizing {args.ckpt}")
        model, info = run_one(args, spec, data_dir)
        linear_ratio = info["linear_bytes"] / info["linear_fp16_bytes"]
        print(f"quantized in {info['quant_time_s']:.1f} s | linear layers {info['linear_bytes'] / 1e6:.3f} MB = "
              f"{linear_ratio:.3f}x of fp16")
        fp16_bytes = model_fp16_bytes(model)
        summary = {"source": str(args.ckpt), **asdict(spec), "label": spec.label(), "quantize_head": args.quantize_head,
                   "quant_time_s": info["quant_time_s"], "linear_mb": info["linear_bytes"] / 2**20,
                   "linear_fp16_mb": info["linear_fp16_bytes"] / 2**20, "linear_vs_fp16": linear_ratio,
                   "model_fp16_mb": fp16_bytes / 2**20, **error_stats(info["report"])}
        if args.out_dir:
            source = Path(args.ckpt) / CHECKPOINT_FILE
            tokenizer_name = read_checkpoint(args.ckpt).get("tokenizer") if source.exists() else None
            if Path(args.ckpt).suffix == ".gguf":  # the tokenizer lives inside the file: saved beside the weights
                load_tokenizer(args.ckpt).save(Path(args.out_dir) / "tokenizer")
                tokenizer_name = "tokenizer"
            path = save_quantized(model, args.out_dir, spec, Path(args.ckpt) if Path(args.ckpt).is_dir() else None,
                                  extra={"tokenizer": tokenizer_name} if tokenizer_name else None)
            summary.update(ckpt_mb=path.stat().st_size / 2**20, ckpt_vs_fp16=path.stat().st_size / fp16_bytes)
            if source.exists():  # a training checkpoint: fp32 weights and the optimizer state
                summary["source_ckpt_mb"] = source.stat().st_size / 2**20
            print(f"wrote {path}: {path.stat().st_size / 1e6:.3f} MB on disk = {summary['ckpt_vs_fp16']:.3f}x of the "
                  f"model in fp16 ({fp16_bytes / 1e6:.3f} MB)"
                  + (f"; source {source.stat().st_size / 1e6:.3f} MB" if source.exists() else ""))
        if not args.no_eval:
            seq_len = model.config.max_seq_len
            fp = val_metrics(load_model(args.ckpt, device=args.device), data_dir, seq_len, args.eval_tokens)
            q = val_metrics(model, data_dir, seq_len, args.eval_tokens)
            summary.update({"fp_val_ppl": fp["val_ppl"], "fp_val_bpb": fp["val_bpb"], "val_loss": q["val_loss"],
                            "val_ppl": q["val_ppl"], "val_bpb": q["val_bpb"], "val_tokens": q["val_tokens"]})
            print("\n| model | val ppl | val bpb |\n|---|---|---|")
            print(f"| full precision | {fp['val_ppl']:.3f} | {fp['val_bpb']:.4f} |")
            print(f"| {spec.label()} | {q['val_ppl']:.3f} | {q['val_bpb']:.4f} |")
        if args.qlora_steps:
            summary.update(qlora(args, model, spec, data_dir))
        if args.out_dir:  # written last: a summary.json means the stage finished
            summary.update(wall_time_s=time.time() - t0, peak_memory_mb=peak_memory_mb(args.device), layers=info["report"])
            summary_path = Path(args.out_dir) / "summary.json"
            atomic_write(summary_path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
            print(f"summary in {summary_path}")
    except (QuantError, ValueError, FileNotFoundError) as e:
        exit_on_error(e)


if __name__ == "__main__":
    main()
