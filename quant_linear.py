"""The quantized linear layer and its packed storage: what any script needs to run a quant.py checkpoint.

quant.py finds the codes (RTN, GPTQ, NF4); this file only stores and runs them, so common.load_model can
rebuild a quantized model without importing the quantization algorithms (and quant.py, which imports
common, stays out of common's imports).

A weight of (out, in) is stored as b-bit codes q packed along the input dimension, 8 codes in `bits`
bytes (int4: two per byte, the even column in the low nibble), with an fp16 scale s and zero z per
output row and group of `group_size` input columns, w = s (q - z); NF4 codes index the 16 NormalFloat
values instead, w = s NF4[q]. A quantized checkpoint is an ordinary nanollm ckpt.pt whose state dict
holds these buffers, plus a `quant_config` entry whose "layers" (quant_layout) say which layers are
QuantLinear and of what shape; `replace_with_quant_layers` puts them in place before the state dict is
loaded.

On CUDA a 4-bit QuantLinear runs through kernels/quant_matmul.py (dequantization in registers);
elsewhere it dequantizes the whole weight and calls F.linear.

Int4CPULinear is the CPU's decoding path for 4-bit weights (sample.py --weights int4): torch's int4 kernel
reads the packed codes and unpacks them in registers, so a decode step reads 8x fewer weight bytes than
fp32 (plus a bf16 scale and zero per group); int4_decode_layers puts it in a model's blocks.

W8A8Linear (SmoothQuant's W8A8, activation_quant.py) quantizes activations too: int8 weights with an fp16
scale per output row, and each token's input rounded to int8 with its own scale at run time,
    y_t = d_x[t] d_w * (x_q[t] @ w_q^T),   d_x[t] = max_j |x_tj| / 127,   d_w[i] = max_j |w_ij| / 127,
the product of two int8 matrices accumulated in int32 by torch._int_mm where torch has it for the device
and shape (int8_backend says which), else simulated with the same integers in fp32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# NF4: the 16 values of bitsandbytes / the QLoRA paper (appendix E), in increasing order
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171180725, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, nf4: bool) -> torch.Tensor:
    """w = s (q - z) for the integer grids, w = s NF4[q] for NF4 (zero unused); scale and zero broadcast
    against the codes."""
    if nf4:
        return torch.tensor(NF4_VALUES, device=codes.device)[codes.long()] * scale
    return scale * (codes.float() - zero)


class QuantError(ValueError):
    """Bad quantization input (bits, group size, a Hessian that cannot be factored): one line, no traceback."""


# ----------------------------------------------------------------------------------------------------------
# Packing: 8 codes of b bits -> b bytes (one little-endian 8b-bit word), along the input dimension

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integer codes in [0, 2^bits) -> (rows, cols * bits / 8) uint8.

    Every 8 consecutive codes of a row become one little-endian word of `bits` bytes, code k at bit k * bits.
    Example, int4, one row of 8 codes [1, 2, 3, 4, 5, 6, 7, 15]:
        word = 1 | 2 << 4 | 3 << 8 | 4 << 12 | 5 << 16 | 6 << 20 | 7 << 24 | 15 << 28 = 0xF7654321
        bytes, low first: [0x21, 0x43, 0x65, 0xF7]
    so byte j holds column 2j in its low nibble and column 2j + 1 in its high one (what unpack and the
    kernel read). int3 packs the same 8 codes into 3 bytes, a code may then straddle two bytes."""
    rows, cols = codes.shape
    if cols % 8:
        raise QuantError(f"cannot pack {cols} columns: need a multiple of 8")
    if bits == 8:
        return codes.to(torch.uint8)
    groups = codes.to(torch.int64).view(rows, cols // 8, 8)
    words = (groups << (bits * torch.arange(8, device=codes.device))).sum(-1)          # (rows, cols/8)
    packed = (words[..., None] >> (8 * torch.arange(bits, device=codes.device))) & 0xFF  # (rows, cols/8, bits)
    return packed.to(torch.uint8).view(rows, cols * bits // 8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack: (rows, cols * bits / 8) uint8 -> (rows, cols) uint8 codes."""
    if bits == 8:
        return packed
    rows = packed.shape[0]
    if bits == 4:  # the same as below, cheaper: byte j holds column 2j in its low nibble, 2j + 1 in its high one
        return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(rows, -1)
    groups = packed.to(torch.int64).view(rows, -1, bits)
    words = (groups << (8 * torch.arange(bits, device=packed.device))).sum(-1)         # (rows, cols/8)
    codes = (words[..., None] >> (bits * torch.arange(8, device=packed.device))) & ((1 << bits) - 1)
    return codes.to(torch.uint8).view(rows, -1)


# ----------------------------------------------------------------------------------------------------------
# The layer

class _Fp16Scales(nn.Module):
    def _apply(self, fn, recurse=True):
        """model.to(dtype) moves the layer but keeps its scales and zeros in fp16: a cast to bf16 would
        round them (fewer mantissa bits), changing the stored model, and the Triton kernel reads fp16."""
        kept = {name: self._buffers[name] for name in ("scales", "zeros") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        return self


class QuantLinear(_Fp16Scales):
    """A linear layer whose weight is stored as packed b-bit codes with fp16 scales and zeros per group.

    Buffers: qweight (out, in * bits / 8) uint8, scales and zeros (out, n_groups) fp16, g_idx (in,) int32
    only when the groups are not contiguous (act-order without static groups), bias as the original.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 has_g_idx: bool = False, nf4: bool = False, device=None):
        super().__init__()
        if in_features % 8:
            raise QuantError(f"QuantLinear needs in_features divisible by 8, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.nf4 = bits, group_size, nf4
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device) if has_g_idx else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, q, bias: torch.Tensor | None = None) -> "QuantLinear":
        """From quant.py's Quantized: codes (out, in), scales and zeros (out, n_groups), g_idx, bits, nf4."""
        out_features, in_features = q.codes.shape
        group_size = in_features // q.scales.shape[1]
        layer = cls(in_features, out_features, q.bits, group_size, bias is not None, not q.ordered_groups, q.nf4,
                    device=q.codes.device)
        layer.qweight.copy_(pack(q.codes.to(torch.uint8), q.bits))
        layer.scales.copy_(q.scales)
        layer.zeros.copy_(q.zeros)
        if layer.g_idx is not None:
            layer.g_idx.copy_(q.g_idx)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """(out, in) fp32 weight."""
        codes = unpack(self.qweight, self.bits)
        scales, zeros = self.scales.float(), self.zeros.float()
        if self.g_idx is not None:  # act-order: each column's group looked up
            g = self.g_idx.long()
            return dequantize_codes(codes, scales[:, g], zeros[:, g], self.nf4)
        # contiguous groups: (out, n_groups, group_size) against one scale and zero per group, no gather
        grouped = codes.view(self.out_features, -1, self.group_size)
        weight = dequantize_codes(grouped, scales[..., None], zeros[..., None], self.nf4)
        return weight.view(self.out_features, self.in_features)

    def forward(self, x):
        if x.is_cuda and self.bits == 4 and not self.nf4:
            from kernels.quant_matmul import int4_matmul
            return int4_matmul(x, self.qweight, self.scales, self.zeros, self.group_index().int(), self.bias)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self):
        kind = "nf4" if self.nf4 else f"int{self.bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"group_size={self.group_size}, g_idx={self.g_idx is not None}")


def int8_backend(device: torch.device, rows: int, in_features: int, out_features: int) -> str:
    """Which int8 matmul W8A8Linear runs for this device and shape: torch._int_mm (int32 accumulation) on the
    CPU, and on CUDA for more than 16 rows with both widths multiples of 8 (its kernel's limits); else the
    same integer product simulated in fp32 (exact while every |accumulator| < 2^24)."""
    if not hasattr(torch, "_int_mm"):
        return "simulated"
    if device.type == "cpu":
        return "torch._int_mm"
    if device.type == "cuda" and rows > 16 and in_features % 8 == 0 and out_features % 8 == 0:
        return "torch._int_mm"
    return "simulated"


def int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """x_q (M, K) int8 @ w_q (N, K)^T int8 -> (M, N): int32 from torch._int_mm, or the same values in fp32."""
    if int8_backend(x_q.device, x_q.shape[0], x_q.shape[1], w_q.shape[0]) == "torch._int_mm":
        return torch._int_mm(x_q, w_q.t())
    return x_q.float() @ w_q.float().t()


def quantize_per_row_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x (rows, n) -> codes (rows, n) int8 in [-127, 127], scale (rows, 1) fp32."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float16).tiny)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class W8A8Linear(_Fp16Scales):
    """SmoothQuant's W8A8 linear layer: int8 weight (out, in) with an fp16 scale per output row; the input is
    quantized per token at run time (dynamic), the matmul is int8 x int8 (int8_matmul).

    Buffers: qweight (out, in) int8, scales (out,) fp16, bias as the original."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "W8A8Linear":
        """Per output row: d_w = max|w| / 127 (rounded to fp16 first, so the stored scale is the one used)."""
        w = layer.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).half().float().clamp(min=torch.finfo(torch.float16).tiny)
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device=w.device)
        new.qweight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        new.scales.copy_(scale)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    def dequantize(self) -> torch.Tensor:
        """(out, in) fp32: the weight the int8 codes stand for."""
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).float()                          # (tokens, in)
        x_q, x_scale = quantize_per_row_int8(x2)                                  # per token: (tokens, 1)
        y = int8_matmul(x_q, self.qweight).float() * x_scale * self.scales.float()  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8"


# ----------------------------------------------------------------------------------------------------------
# Decoding on the CPU from 4-bit weights

INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel takes


def int4_minmax(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest on the asymmetric grid of llama.cpp's Q4_1, per row and group of group_size columns:
    d = (max - min) / 15, q = round((w - min) / d) in [0, 15], w ~ d q + min. (out, in) -> codes (out, in)
    uint8, d and min (out, in / group_size) fp32. Weights already on such a grid (a Q4_1 file's, dequantized)
    come back with their own codes."""
    rows, cols = w.shape
    groups = w.detach().float().view(rows, cols // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float16).tiny)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    return codes.to(torch.uint8).view(rows, cols), scale, low


class Int4CPULinear(nn.Module):
    """A 4-bit weight-only linear layer for decoding on the CPU: torch's int4 kernel
    (aten._weight_int4pack_mm_for_cpu, the one gpt-fast runs on CPUs) multiplies bf16 activations by the
    packed codes, unpacking them in registers, so a decode step reads 0.625 bytes per weight (4 bits + a bf16
    scale and zero per 32) instead of fp32's 4. For a group of the weight,
        w = d q + m = (q - 8) d + zero,   zero = m + 8 d      (the kernel's form),
    with d and zero rounded to bf16 and the input and output rounded to bf16 (8 significant bits), so outputs
    differ from the same weights in fp32 by ~2^-8 relative. The packed layout is the kernel's own (it may
    differ between CPUs): built when a model is loaded for decoding, never saved (buffers not persistent).

    Needs out_features % 16 == 0 and in_features % group_size == 0; int4_decode_layers skips other layers.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None = None):
        """codes (out, in) in [0, 15]; scale d and minimum m (out, n_groups): w = d q + m."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scale.shape[1]
        if self.group_size not in INT4_KERNEL_GROUPS:
            raise QuantError(f"Int4CPULinear: group size {self.group_size} is not one of {INT4_KERNEL_GROUPS}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).cpu(), 1)
        scale, zero = scale.float(), minimum.float() + 8 * scale.float()
        self.register_buffer("packed", packed, persistent=False)
        # (n_groups, out, 2): the kernel's layout of scale and zero
        self.register_buffer("scales_zeros", torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous(),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def supports(cls, in_features: int, out_features: int, group_size: int) -> bool:
        return out_features % 16 == 0 and in_features % group_size == 0 and group_size in INT4_KERNEL_GROUPS

    @classmethod
    def from_linear(cls, layer: nn.Linear, group_size: int = 32) -> "Int4CPULinear":
        """Rounded to Q4_1's grid (int4_minmax)."""
        codes, scale, low = int4_minmax(layer.weight, group_size)
        return cls(codes, scale, low, layer.bias)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> "Int4CPULinear":
        """A 4-bit QuantLinear's own codes, w = s (q - z) = s q + m with m = -s z; its groups must be contiguous
        (no g_idx). A group wider than the kernel's becomes equal groups of 32 sharing its scale (same weight)."""
        codes = unpack(layer.qweight, 4)
        s, m = layer.scales.float(), -layer.scales.float() * layer.zeros.float()   # (out, n_groups)
        repeat = 1 if layer.group_size in INT4_KERNEL_GROUPS else layer.group_size // 32
        return cls(codes, s.repeat_interleave(repeat, dim=1), m.repeat_interleave(repeat, dim=1), layer.bias)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)                          # (tokens, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def storage_bytes(self) -> int:
        """Bytes read per call: the packed codes and the bf16 scales and zeros (and a bias)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_zeros, self.bias) if t is not None)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group_size={self.group_size}"


def int4_decode_layers(model: nn.Module, group_size: int = 32) -> tuple[int, int]:
    """Every linear layer of the model's blocks becomes an Int4CPULinear, in place, for decoding on the CPU:
    a float nn.Linear rounded to Q4_1's grid in groups of group_size (for a Q4_1 .gguf: the file's own codes),
    a 4-bit QuantLinear (quant.py, contiguous groups) with its own codes. The embeddings and the LM head stay
    as they are (a 4-bit head costs far more accuracy than a block's layer). Returns (replaced, left as they
    were): a layer the kernel cannot take (act-order groups, NF4, another bit width, a shape it does not
    support) keeps its own forward."""
    replaced = kept = 0
    for name, layer in list(model.named_modules()):
        if name.endswith("lm_head"):
            continue
        if isinstance(layer, QuantLinear):
            group = layer.group_size if layer.group_size in INT4_KERNEL_GROUPS else 32
            ok = (layer.bits == 4 and not layer.nf4 and layer.g_idx is None and layer.group_size % 32 == 0
                  and Int4CPULinear.supports(layer.in_features, layer.out_features, group))
            new = Int4CPULinear.from_quant_linear(layer) if ok else None
        elif isinstance(layer, nn.Linear):
            ok = Int4CPULinear.supports(layer.in_features, layer.out_features, group_size)
            new = Int4CPULinear.from_linear(layer, group_size) if ok else None
        else:
            continue
        if new is None:
            kept += 1
            continue
        set_module(model, name, new)
        replaced += 1
    return replaced, kept


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """root's submodule `name` (dotted) becomes `module`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ----------------------------------------------------------------------------------------------------------
# A quantized model: which layers are QuantLinear, saved beside the state dict and rebuilt before loading it

def quant_layout(model: nn.Module) -> dict:
    """{layer name: its shape arguments} for every QuantLinear and W8A8Linear in the model ({} if none)."""
    layout = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layout[name] = {"bits": m.bits, "group_size": m.group_size, "nf4": m.nf4, "g_idx": m.g_idx is not None,
                            "bias": m.bias is not None}
        elif isinstance(m, W8A8Linear):
            layout[name] = {"w8a8": True, "bias": m.bias is not None}
    return layout


def replace_with_quant_layers(model: nn.Module, layout: dict) -> nn.Module:
    """Put an empty QuantLinear of the recorded shape at every layer named in `layout` (in place), ready
    for load_state_dict."""
    for name, c in layout.items():
        layer = model.get_submodule(name)
        if c.get("w8a8"):
            set_module(model, name, W8A8Linear(layer.in_features, layer.out_features, c["bias"]))
            continue
        set_module(model, name, QuantLinear(layer.in_features, layer.out_features, c["bits"], c["group_size"],
                                            c["bias"], c["g_idx"], c["nf4"]))
    return model
