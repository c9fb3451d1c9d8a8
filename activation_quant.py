"""Activation-aware quantization: AWQ (4-bit weights) and SmoothQuant (int8 weights and activations).

    python quant.py --ckpt out/shakespeare --method awq --bits 4 --group-size 128 --out out/shakespeare-awq4
    python quant.py --ckpt out/shakespeare --method awq-gptq --bits 4 --group-size 128     # AWQ scales, then GPTQ
    python quant.py --ckpt out/shakespeare --method smoothquant --alpha 0.5                 # W8A8
    python quant.py --ckpt out/shakespeare --method w8a8                                    # W8A8, not smoothed
    python -m bench.awq                                                                     # the measured table

Both methods rest on one identity. For a linear layer y = W x and any positive vector s over its input
channels,
    W x = (W diag(s)) (diag(s)^-1 x),
and the division of x by s can be folded into whatever produced x, so the float model computes exactly
the same function while the quantizer sees W diag(s) and, for W8A8, x / s. In a Llama block
(scaling_pairs):
    input_layernorm -> q_proj, k_proj, v_proj     RMSNorm's weight divided by s
    v_proj -> o_proj                              v's output rows divided by s (attention mixes tokens,
                                                  not channels; only when n_kv_heads == n_heads)
    post_attention_layernorm -> gate_proj, up_proj
    up_proj -> down_proj                          down reads silu(gate x) * (up x): linear in up's rows

AWQ (Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan & Han 2024, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", arXiv:2306.00978). The weights that matter are those
meeting large activations; multiplying an input channel's column by s > 1 before rounding shrinks its
relative rounding error (the group's grid step barely moves), and the activation pays 1/s exactly. Per
pair, from the calibration inputs X (n_tokens, in) of the linears it feeds (section 3.2 of the paper):
    s_x[j] = mean_t |X[t, j]|                          the average magnitude of input channel j
    s = s_x^alpha / sqrt(max s * min s)                centred on 1 (as the reference code)
    alpha* = argmin over alpha in {0, 1/20, ..., 1} of || f(Q(W diag(s)) diag(s)^-1; X) - f(W; X) ||^2
with Q the round-to-nearest quantizer of the target grid and f the output of the block the readers sit
in, computed with their weights replaced (as the reference code's module2inspect): the whole attention
for q/k/v, the whole MLP for gate/up, the linear itself for o_proj and down_proj (f(W; X) = W X^T, the
paper's equation 4). The attention's softmax and the MLP's gate pass the rounding error on unevenly, so
the block's output, not each linear's, is what the model feels. alpha = 0 is plain RTN, so the search
never does worse than RTN on the calibration sequences. Then the weight clipping search (the reference's auto_clip): per
output row and group, the clipping range r max|w| with r in {1, 0.95, ..., 0.55} that minimises that
group's share of the output error ||(Q(clamp(w, -r max|w|, r max|w|)) - w) x||^2 on a sample of tokens;
not for q_proj and k_proj (as the reference: their errors pass through the attention scores). The
weights are then rounded by RTN (quant.py's grid and QuantLinear storage, the same packed int4 as GPTQ)
or, with --method awq-gptq, by GPTQ (scales only: GPTQ's error feedback takes the place of the clipping).

SmoothQuant (Xiao, Lin, Seznec, Wu, Demouth & Han 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", arXiv:2211.10438). W8A8 quantizes activations per token
(dynamic), so one outlier channel 100x the others sets every token's step and the other channels round
to a few levels; weights are easy (per output channel). Smoothing moves the difficulty to the weights:
    s[j] = max_t |X[t, j]|^alpha / max_i |W[i, j]|^(1 - alpha)      (alpha 0.5 by default)
after which channel j's activation range is max|X_j|^(1-alpha) max|W_j|^(1-alpha) and its weight range
max|X_j|^alpha max|W_j|^alpha: their ratio is (max|X_j| max|W_j|)^(1 - 2 alpha), 1 at alpha = 0.5. The
smoothed linears become quant_linear.W8A8Linear (int8 weights per output channel, per-token int8
activations, torch._int_mm). The reference code smooths the two norm-fed pairs; here every pair above
is smoothed (down_proj's input is where Llama-family models keep their largest outliers).
"""

import torch
import torch.nn as nn

from model import RMSNorm, Transformer
from quant import QuantSpec, grid_params, quantize_codes, quantize_model, target_names
from quant_linear import QuantError, W8A8Linear, dequantize_codes, int8_backend, set_module

ALPHA_GRID = 20        # AWQ: alpha in {0, 1/20, ..., 1}
CLIP_GRID = 20         # AWQ clipping: r in {1, 1 - 1/20, ...} down to 1 - CLIP_MAX_SHRINK (exclusive)
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512      # at most this many of the search's tokens measure the clipping error (the reference's n_sample_token)
QK_NAMES = ("self_attn.q_proj", "self_attn.k_proj")


def check_alpha(alpha: float | None) -> None:
    if alpha is not None and not 0 <= alpha <= 1:
        raise QuantError(f"--alpha must be in [0, 1], got {alpha}")


def check_calibration(calib: torch.Tensor | None, method: str) -> None:
    if calib is None or calib.numel() == 0:
        raise QuantError(f"--method {method} needs calibration data: a prepared data directory (--calib-data, "
                         f"default --data) and --calib-samples > 0")


# ----------------------------------------------------------------------------------------------------------
# Folding scales into the op before: the float model's function is unchanged

def scaling_pairs(block: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """(the op whose output channels absorb 1/s, the linear layers reading that output) in one block."""
    pairs = [("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    if block.self_attn.n_kv_heads == block.self_attn.n_heads:  # o's input channel j is v's output channel j
        pairs.append(("self_attn.v_proj", ("self_attn.o_proj",)))
    pairs += [("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), ("mlp.up_proj", ("mlp.down_proj",))]
    return pairs


@torch.no_grad()
def fold_scales(block: nn.Module, prev_name: str, readers: tuple[str, ...], s: torch.Tensor) -> None:
    """prev's output channels / s, the readers' input columns * s: W x = (W diag(s)) (x / s)."""
    prev = block.get_submodule(prev_name)
    if isinstance(prev, RMSNorm):
        prev.weight.div_(s)
    else:                                                     # a linear layer: its output rows
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)
    for name in readers:
        block.get_submodule(name).weight.mul_(s)


def calibration_hidden(model: Transformer, calib: torch.Tensor, batch_size: int):
    """The embeddings of the calibration sequences in batches, and RoPE's cos, sin for their length."""
    device = model.embed_tokens.weight.device
    T = calib.shape[1]
    cos, sin = model.rope(torch.arange(T, device=device), model.embed_tokens.weight.dtype, T)
    return [model.embed_tokens(calib[i:i + batch_size].to(device)) for i in range(0, len(calib), batch_size)], cos, sin


@torch.no_grad()
def capture_inputs(block: nn.Module, names: list[str], hidden: list[torch.Tensor], cos, sin) -> dict[str, torch.Tensor]:
    """Run the block on every calibration batch; the inputs the named linears saw, name -> (n_tokens, in)."""
    seen = {name: [] for name in names}
    hooks = [block.get_submodule(name).register_forward_hook(
        lambda m, inp, out, name=name: seen[name].append(inp[0].reshape(-1, inp[0].shape[-1]).float()))
        for name in names]
    try:
        for h in hidden:
            block(h, cos, sin)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


# ----------------------------------------------------------------------------------------------------------
# AWQ

def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest onto spec's grid and back, every group at once: what RTN's QuantLinear computes."""
    out_features, in_features = w.shape
    rows = w.reshape(-1, spec.groups_of(in_features))         # (out * n_groups, group_size): one grid a row
    scale, zero = grid_params(rows, spec.bits, spec.sym)
    return dequantize_codes(quantize_codes(rows, scale, zero, spec.bits), scale, zero, False).view(out_features, in_features)


def awq_scale_of(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_x^alpha, divided by sqrt(max s * min s)."""
    s = x_mean.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_search_scale(x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, alpha: float | None = None,
                     n_grid: int = ALPHA_GRID, output=None) -> tuple[torch.Tensor, float, list[float]]:
    """x (n_tokens, in): the input the weights (each (out_i, in)) share. output(ws): the output whose error is
    measured when the readers hold the weights ws (default: their own outputs x @ w.T, the paper's equation 4).
    Returns s (in,), the alpha chosen and the mean squared output error at every alpha tried (alpha given:
    only that one)."""
    x_mean = x.abs().mean(0).clamp(min=1e-4)                  # (in,)
    w = [weight.float() for weight in weights]
    output = output or (lambda ws: x @ torch.cat(ws).T)       # (n_tokens, sum out_i): one error over all readers
    reference = output(w)
    alphas = [alpha] if alpha is not None else [i / n_grid for i in range(n_grid + 1)]
    losses = []
    for a in alphas:
        s = awq_scale_of(x_mean, a)                           # Q(W diag(s)) diag(s)^-1 x = Q(W diag(s)) (x / s)
        losses.append(((output([fake_quant(wi * s, spec) / s for wi in w]) - reference) ** 2).mean().item())
    best = alphas[min(range(len(alphas)), key=losses.__getitem__)]
    return awq_scale_of(x_mean, best), best, losses


def block_output(module: nn.Module, readers: list[nn.Linear], x: torch.Tensor, run):
    """output(ws) for awq_search_scale: run(module, x) with the readers' weights temporarily replaced by ws."""
    def output(ws):
        saved = [r.weight.data for r in readers]
        try:
            for r, w in zip(readers, ws):
                r.weight.data = w.to(r.weight.dtype)
            return run(module, x).float()
        finally:
            for r, w in zip(readers, saved):
                r.weight.data = w
    return output


@torch.no_grad()
def awq_search_clip(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec, n_grid: int = CLIP_GRID,
                    max_shrink: float = CLIP_MAX_SHRINK) -> torch.Tensor:
    """Per output row and group, the clipping bound r max|w| that minimises the group's share of the output
    error on the tokens x (n, in). Returns the bounds (out, n_groups, 1)."""
    out_features, in_features = w.shape
    group_size = spec.groups_of(in_features)
    n_groups = in_features // group_size
    xg = x.view(-1, n_groups, group_size)                     # (n, G, g)
    wg = w.float().view(out_features, n_groups, group_size)   # (out, G, g)
    reference = torch.einsum("ngk,ogk->ogn", xg, wg)          # (out, G, n): each group's partial output
    max_abs = wg.abs().amax(-1, keepdim=True)                 # (out, G, 1)
    best_err = torch.full((out_features, n_groups), float("inf"), device=w.device)
    best_bound = max_abs.clone()
    for i in range(int(max_shrink * n_grid)):
        bound = max_abs * (1 - i / n_grid)
        clipped = fake_quant(wg.clamp(-bound, bound).view(out_features, in_features), spec)
        err = ((torch.einsum("ngk,ogk->ogn", xg, clipped.view_as(wg)) - reference) ** 2).mean(-1)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_bound = torch.where(better[..., None], bound, best_bound)
    return best_bound


@torch.no_grad()
def awq_apply(model: Transformer, spec: QuantSpec, calib: torch.Tensor, alpha: float | None = None, clip: bool = True,
              batch_size: int = 16, search_tokens: int = 4096, log=print) -> dict[str, dict]:
    """Search and fold AWQ's scales (and clip the weights) block by block, in place; the model stays in float
    and computes the same function up to the clipping. Each block's inputs come from the blocks before it as
    transformed. Returns {reader layer: {"awq_alpha", "awq_loss_rtn", "awq_loss"}} (calibration output MSE of
    RTN and of RTN after scaling)."""
    check_alpha(alpha)
    check_calibration(calib, "awq")
    hidden, cos, sin = calibration_hidden(model, calib, batch_size)
    n_seqs, T = calib.shape
    g = torch.Generator().manual_seed(0)
    search = torch.randperm(n_seqs, generator=g)[:max(1, search_tokens // T)]  # the grid search on whole sequences
    clip_sample = torch.randperm(len(search) * T, generator=g)[:CLIP_TOKENS]   # and the clipping on some of their tokens
    inspected = {"input_layernorm": ("self_attn", lambda m, x: m(x, cos, sin)),
                 "post_attention_layernorm": ("mlp", lambda m, x: m(x))}
    info = {}
    for i, block in enumerate(model.layers):
        pairs = scaling_pairs(block)
        inputs = capture_inputs(block, [readers[0] for _, readers in pairs], hidden, cos, sin)
        for prev, readers in pairs:
            x = inputs[readers[0]].view(n_seqs, T, -1)[search.to(hidden[0].device)]  # (n_search, T, in)
            linears = [block.get_submodule(n) for n in readers]
            output = None
            if prev in inspected:                             # the error at the attention's / MLP's output
                module, run = inspected[prev]
                output = block_output(block.get_submodule(module), linears, x, run)
            s, best, losses = awq_search_scale(x.flatten(0, 1), [m.weight for m in linears], spec, alpha,
                                               output=output)
            fold_scales(block, prev, readers, s)
            inputs[readers[0]] = inputs[readers[0]] / s       # what the readers receive from now on
            for n in readers:
                info[f"layers.{i}.{n}"] = {"awq_alpha": best, "awq_loss_rtn": losses[0], "awq_loss": min(losses)}
            if log:
                log(f"  layers.{i}.{prev} -> {', '.join(r.split('.')[-1] for r in readers)}: alpha {best:.2f} | "
                    f"output MSE {min(losses):.3e} (RTN {losses[0]:.3e})")
        if clip:
            for _, readers in pairs:
                x = inputs[readers[0]].view(n_seqs, T, -1)[search.to(hidden[0].device)].flatten(0, 1)
                x = x[clip_sample.to(x.device)]
                for n in readers:
                    if n in QK_NAMES:
                        continue
                    w = block.get_submodule(n).weight
                    bound = awq_search_clip(x, w, spec)
                    grouped = w.data.view(*bound.shape[:2], -1)
                    grouped.copy_(torch.maximum(torch.minimum(grouped, bound), -bound))
        hidden = [block(h, cos, sin) for h in hidden]
    return info


def awq_quantize(model: Transformer, spec: QuantSpec, calib: torch.Tensor, alpha: float | None = None,
                 gptq: bool = False, batch_size: int = 16, search_tokens: int = 4096, log=print) -> list[dict]:
    """AWQ then RTN into QuantLinear (gptq: AWQ's scales without the clipping, then GPTQ). In place; returns
    quantize_model's per-layer rows with each layer's AWQ alpha and calibration errors added."""
    method = "awq-gptq" if gptq else "awq"
    check_calibration(calib, method)
    for name in target_names(model, False):               # a bad group size fails before any work
        spec.groups_of(model.get_submodule(name).in_features, name)
    info = awq_apply(model, spec, calib, alpha, clip=not gptq, batch_size=batch_size, search_tokens=search_tokens,
                     log=log)
    rounding = QuantSpec("gptq" if gptq else "rtn", spec.bits, spec.group_size, spec.sym, spec.act_order,
                         spec.static_groups, spec.percdamp, spec.block_size)
    report = quantize_model(model, rounding, calib if gptq else None, batch_size=batch_size, log=log)
    return [{**row, **info.get(row["layer"], {})} for row in report]


# ----------------------------------------------------------------------------------------------------------
# SmoothQuant and W8A8

def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s[j] = max|X_j|^alpha / max|W_j|^(1 - alpha), W the readers' weights stacked (the reference's clamps)."""
    w_absmax = torch.cat([w.float() for w in weights]).abs().amax(0).clamp(min=1e-5)  # (in,)
    return (x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth(model: Transformer, calib: torch.Tensor, alpha: float = 0.5, batch_size: int = 16, log=print) -> list[dict]:
    """Fold SmoothQuant's scales into every pair of every block, in place (the float model's function is
    unchanged). Returns one row per pair: the largest and the median per-channel activation maximum
    before and after."""
    check_alpha(alpha)
    check_calibration(calib, "smoothquant")
    hidden, cos, sin = calibration_hidden(model, calib, batch_size)
    rows = []
    for i, block in enumerate(model.layers):
        pairs = scaling_pairs(block)
        inputs = capture_inputs(block, [readers[0] for _, readers in pairs], hidden, cos, sin)
        for prev, readers in pairs:
            x_absmax = inputs[readers[0]].abs().amax(0)        # (in,)
            s = smoothing_scales(x_absmax, [block.get_submodule(n).weight for n in readers], alpha)
            fold_scales(block, prev, readers, s)
            after = x_absmax / s
            rows.append({"pair": f"layers.{i}.{prev}", "act_max": x_absmax.max().item(),
                         "act_max_median": x_absmax.median().item(), "smoothed_max": after.max().item(),
                         "smoothed_max_median": after.median().item()})
        hidden = [block(h, cos, sin) for h in hidden]
    if log:
        worst = max(rows, key=lambda r: r["act_max"] / r["act_max_median"])
        log(f"  largest activation outlier: {worst['pair']}: max {worst['act_max']:.1f} = "
            f"{worst['act_max'] / worst['act_max_median']:.0f}x the median channel's -> after smoothing "
            f"{worst['smoothed_max'] / worst['smoothed_max_median']:.1f}x")
    return rows


@torch.no_grad()
def quantize_w8a8(model: Transformer, log=print) -> list[dict]:
    """Every block linear -> W8A8Linear, in place. Returns one row per layer (weight_rel_err)."""
    report = []
    for name in target_names(model, False):
        layer = model.get_submodule(name)
        new = W8A8Linear.from_linear(layer)
        w = layer.weight.float()
        report.append({"layer": name, "weight_rel_err": ((w - new.dequantize()).norm() / w.norm()).item()})
        set_module(model, name, new)
    if log:
        device, k, n = layer.weight.device, layer.in_features, layer.out_features
        log(f"  {len(report)} linear layers -> W8A8Linear, weight rel err mean "
            f"{sum(r['weight_rel_err'] for r in report) / len(report):.5f}; int8 matmul on {device.type}: "
            f"{int8_backend(device, 64, k, n)} for 64 tokens, {int8_backend(device, 1, k, n)} for one (decode)")
    return report


@torch.no_grad()
def input_absmax(model: Transformer, calib: torch.Tensor, names: list[str], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| each named linear layer sees on calib: name -> (in,)."""
    seen = {name: None for name in names}

    def record(name, x):
        m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
        seen[name] = m if seen[name] is None else torch.maximum(seen[name], m)
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, inp, out, n=n: record(n, inp[0])) for n in names]
    try:
        for i in range(0, len(calib), batch_size):
            model(calib[i:i + batch_size].to(model.embed_tokens.weight.device))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def smoothquant_quantize(model: Transformer, calib: torch.Tensor | None, alpha: float | None = 0.5,
                         batch_size: int = 16, log=print) -> list[dict]:
    """W8A8 (alpha None: no smoothing, the naive baseline), in place; returns the per-layer rows."""
    if alpha is not None:
        smooth(model, calib, alpha, batch_size, log)
    return quantize_w8a8(model, log)


def activation_quantize(model: Transformer, spec: QuantSpec, calib: torch.Tensor | None, log=print) -> list[dict]:
    """quant.py's entry point for --method awq | awq-gptq | smoothquant | w8a8."""
    if spec.method != "w8a8" and model.config.n_experts:  # scaling_pairs knows the dense MLP's layers only
        raise QuantError(f"--method {spec.method}: mixture-of-experts models are not supported (the scales fold "
                         f"into a dense MLP's projections, not into each expert's); use --method gptq, rtn or w8a8")
    if spec.method in ("awq", "awq-gptq"):
        return awq_quantize(model, spec, calib, spec.alpha, gptq=spec.method == "awq-gptq", log=log)
    if spec.method == "smoothquant":
        return smoothquant_quantize(model, calib, 0.5 if spec.alpha is None else spec.alpha, log=log)
    return smoothquant_quantize(model, None, None, log=log)
