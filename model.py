"""A Llama-style decoder-only transformer, readable top to bottom.

    tokens -> embed -> n_layers x [ x + Attention(RMSNorm(x)) ; x + SwiGLU(RMSNorm(x)) ] -> RMSNorm -> logits

The pieces and where they come from:
- RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, computed in fp32.
- RoPE (Su et al. 2021) in the Hugging Face "rotate_half" layout, so HF Llama weights load without any
  permutation; with linear (Chen et al. 2023), YaRN (Peng et al. 2023) and Llama-3 context scaling.
- Grouped-query attention (Ainslie et al. 2023): n_kv_heads key/value heads shared by n_heads query
  heads; multi-head (n_kv_heads == n_heads) and multi-query (n_kv_heads == 1) are the special cases.
- SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)).
- Optionally a sparse mixture of SwiGLU experts in place of the MLP (Mixtral / Qwen-MoE): a router sends
  each token to its top-k experts, trained with Switch Transformer's load-balancing loss and ST-MoE's
  router z-loss (moe.py).
- A preallocated KV cache for generation: prefill once, then one token per step, with left-padded
  batches of prompts of different lengths.
- Module names that mirror Hugging Face's: hf_io.py reads Llama / Mistral / Qwen2 / SmolLM / Mixtral / Qwen2-MoE
  checkpoints into this Transformer (load_hf) and writes ones that `transformers` loads (save_hf).

Three attention backends compute the same thing: `naive` (explicit softmax, the readable reference),
`sdpa` (torch's fused scaled_dot_product_attention) and `triton` (kernels/flash_attention.py).

    python model.py                 # table of the presets: parameters and FLOPs per token
    python model.py --preset small  # one preset's full config
"""
import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import MoE, moe_layers

ATTN_BACKENDS = ("naive", "sdpa", "triton")
ROPE_TYPES = ("linear", "yarn", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 768                      # model (residual stream) width
    n_layers: int = 12
    n_heads: int = 12                   # query heads
    n_kv_heads: int = 12                # key/value heads (GQA); must divide n_heads
    hidden_dim: int = 2048              # SwiGLU inner width
    max_seq_len: int = 1024
    head_dim: int | None = None         # None: dim // n_heads (some checkpoints set it explicitly)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # e.g. {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False        # LM head shares the token embedding matrix
    # n > 0: the output layer scores only n tokens (their ids in the buffer head_ids) and one "other" class
    # whose probability is spread evenly over the rest: a draft model's reduced vocabulary (FR-Spec, Zhao et
    # al. 2025), n rows to multiply instead of vocab_size, still a distribution over the whole vocabulary
    head_tokens: int = 0
    attention_bias: bool = False        # biases on q/k/v projections (Qwen2)
    attention_out_bias: bool = False    # bias on the output projection (Llama with attention_bias=True)
    dropout: float = 0.0                # on attention probabilities and on each residual branch
    attn_backend: str = "sdpa"          # "naive" | "sdpa" | "triton"
    # mixture of experts (the section of that name below); None: every block has one dense SwiGLU MLP
    n_experts: int | None = None        # routed experts per block, each a SwiGLU of width hidden_dim
    n_experts_per_token: int = 2        # k: the top-k experts each token is sent to
    norm_topk_prob: bool = True         # renormalise the k routing weights to sum 1 (Mixtral); Qwen-MoE: False
    shared_expert_dim: int = 0          # width of an always-on shared expert behind a sigmoid gate (Qwen-MoE); 0: none
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight in training (Switch Transformer's alpha)
    router_z_loss_coef: float = 0.001   # router z-loss weight in training (ST-MoE)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or give head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_scaling!r}")
        if self.n_experts is not None:
            if self.n_experts < 1:
                raise ValueError(f"ModelConfig.n_experts must be at least 1 (None for a dense MLP), got {self.n_experts}")
            if not 1 <= self.n_experts_per_token <= self.n_experts:
                raise ValueError(f"ModelConfig.n_experts_per_token must be between 1 and n_experts ({self.n_experts}), "
                                 f"got {self.n_experts_per_token}")
        if not 0 <= self.head_tokens < self.vocab_size:
            raise ValueError(f"ModelConfig.head_tokens must be in [0, vocab_size), got {self.head_tokens}")
        if self.head_tokens and self.tie_embeddings:
            raise ValueError("ModelConfig.head_tokens needs an untied output layer (tie_embeddings=False)")
        for name in ("shared_expert_dim", "router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # < 1M parameters: unit tests
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192,
                 max_seq_len=256, tie_embeddings=True),
    # ~11M parameters: trains on a laptop CPU in minutes
    "small": dict(vocab_size=4096, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024,
                  max_seq_len=512, tie_embeddings=True),
    # GPT-2 small's budget (~124M) in Llama shape
    "llama-124m": dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048,
                       max_seq_len=1024, tie_embeddings=True),
    # Llama 3.2 1B's shape
    "llama-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                     max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


# ----------------------------------------------------------------------------------------------------------
# RoPE: rotate each (x_i, x_{i+d/2}) pair of a head by the angle position * inv_freq_i

def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) in fp32 and the cos/sin scale, with optional context scaling.

    inv_freq_i = theta^(-2i/d). Scaling stretches the low frequencies so that positions beyond the
    training length map to angles the model has seen:
      linear: every inv_freq / factor (position interpolation).
      yarn:   interpolate only the dimensions that rotate fewer than beta_slow..beta_fast times over the
              original context (a linear ramp between), and scale cos/sin by 0.1 ln(factor) + 1.
      llama3: divide low frequencies (wavelength > original_len / low_freq_factor) by factor, keep the
              high ones, and interpolate smoothly in between.
    """
    d, theta = config.head_dim, config.rope_theta
    # on the CPU explicitly, also when the model is built on the meta device (load_hf)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original_len = scaling.get("original_max_position_embeddings") or config.max_seq_len
    if kind == "llama3":
        low_wavelen = original_len / scaling["low_freq_factor"]
        high_wavelen = original_len / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_len / wavelen - scaling["low_freq_factor"]) / (
            scaling["high_freq_factor"] - scaling["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    # yarn
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(n_rotations):  # the dimension that rotates n_rotations times over original_len
        return d * math.log(original_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i + hd/2}) of x (B, heads, T, head_dim) by their positions' angles.

    HF's "rotate_half" form: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for the halves x1, x2.
    Transformer.rope() hands over sin with its first half negated, so that rotate_half is a plain roll,
    (x2, x1) * (-sin, sin): bit-identical (negation is exact) and two ops fewer per call.
    cos, sin: (B or 1, 1, T, head_dim).
    """
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


# ----------------------------------------------------------------------------------------------------------
# Attention backends. All take q (B, n_heads, Tq, hd), k and v (B, n_kv_heads, Tk, hd) and return (B, n_heads, Tq, hd).
# Queries are the last Tq of the Tk positions (Tq == Tk in training; Tq < Tk when decoding from a KV cache).
# kv_start (B,) or None: keys before kv_start[b] are left padding and are never attended to.

def attention_mask(Tq: int, Tk: int, kv_start: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean (B or 1, 1, Tq, Tk), True where query i may attend key j.

    Causal: j <= i + (Tk - Tq). Left padding: j >= kv_start[b]. A padding query would then see no key
    at all (softmax of nothing is NaN), so every query always sees itself: padded rows stay finite
    and real tokens never look at them.
    """
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(Tk, device=device)[None, :]           # (1, Tk)
    mask = k_pos <= q_pos
    if kv_start is None:
        return mask[None, None]
    not_padding = k_pos[None] >= kv_start[:, None, None]       # (B, 1, Tk)
    return (mask[None] & (not_padding | (k_pos == q_pos)[None]))[:, None]


def naive_attention(q, k, v, kv_start, dropout_p):
    """softmax(q k^T / sqrt(d) + mask) v, written out (GQA by repeating each K/V head n_heads/n_kv_heads times)."""
    n_rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5                       # (B, H, Tq, Tk)
    scores = scores.masked_fill(~attention_mask(q.size(2), k.size(2), kv_start, q.device), float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs @ v


def sdpa_attention(q, k, v, kv_start, dropout_p):
    """torch's fused kernel; its own causal flag when the mask is plain causal, an explicit mask otherwise."""
    Tq, Tk = q.size(2), k.size(2)
    if kv_start is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)
    if kv_start is None and Tq == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True)
    mask = attention_mask(Tq, Tk, kv_start, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)


def triton_attention(q, k, v, kv_start, dropout_p):
    """FlashAttention-2 in Triton (kernels/flash_attention.py); same masking rules."""
    if dropout_p > 0:
        raise ValueError("attn_backend='triton' has no attention dropout; set dropout=0 or use 'sdpa'")
    from kernels.flash_attention import flash_attention
    return flash_attention(q, k, v, causal=True, kv_start=kv_start)


ATTENTION = {"naive": naive_attention, "sdpa": sdpa_attention, "triton": triton_attention}


# ----------------------------------------------------------------------------------------------------------
# Modules

# Up to this many rows (tokens) a linear layer on the CPU computes y^T = W x^T instead of y = x W^T. Same
# product; torch's CPU BLAS runs x W^T on a few rows as one matrix-vector pass per row at about a third of
# the memory bandwidth, and decoding one sequence is nothing but such calls, while W x^T with two or more
# columns is a matrix product that streams W once at full speed (python -m bench.decode, its first table:
# 1.3-2.5x on 1-4 rows, even at 8, a little slower from 16 on the small preset's weights on one thread).
FEW_ROWS = 8


def few_rows_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) computed as (W x^T)^T; one row is sent as two columns (the same row twice),
    since a single column goes back to the slow matrix-vector pass."""
    rows = x.numel() // x.size(-1)
    x2 = x.reshape(rows, x.size(-1)).contiguous()                         # (rows, in), rows in memory
    if rows == 1:
        x2 = torch.cat((x2, x2))  # a copy: a stride-0 view of the one row is as slow as the one column
    # (out, rows) -> (rows, out), copied to rows in memory: left a transposed view, it would make the next
    # layer's input column-major (elementwise ops keep the layout), which BLAS multiplies far slower
    y = (weight @ x2.t())[:, :rows].t().contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.size(0))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict), with few-row CPU products through few_rows_linear
    (a weight stored transposed in memory goes to F.linear: W x^T on it is several times slower)."""

    def forward(self, x):
        if x.device.type == "cpu" and 0 < x.numel() // self.in_features <= FEW_ROWS and self.weight.is_contiguous():
            return few_rows_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, use_triton: bool = False):
        super().__init__()
        self.eps, self.use_triton = eps, use_triton
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.use_triton:
            from kernels.rmsnorm import rms_norm
            return rms_norm(x, self.weight, self.eps)
        if x.dtype == self.weight.dtype == torch.float32:  # the formula below in one op (bit-identical in fp32)
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # normalise in fp32 (bf16 mean-of-squares loses precision), cast back, then scale: HF's order
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = Linear(config.dim, config.n_heads * config.head_dim, bias=config.attention_bias)
        self.k_proj = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.attention_bias)
        self.v_proj = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.attention_bias)
        self.o_proj = Linear(config.n_heads * config.head_dim, config.dim, bias=config.attention_out_bias)
        self.attend = ATTENTION[config.attn_backend]
        self.dropout = config.dropout

    def forward(self, x, cos, sin, start_pos=0, kv_cache=None, doc_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, n_heads, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv_start = None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)  # (B, n_kv_heads, start_pos + T, hd)
            kv_start = kv_cache.pad_lens
        dropout_p = self.dropout if self.training else 0.0
        if doc_mask is not None:  # packed sequences: an explicit (B, 1, T, T) mask, through SDPA
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask, dropout_p=dropout_p, enable_gqa=True)
        else:
            y = self.attend(q, k, v, kv_start, dropout_p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or config.hidden_dim
        self.gate_proj = Linear(config.dim, hidden_dim, bias=False)
        self.up_proj = Linear(config.dim, hidden_dim, bias=False)
        self.down_proj = Linear(hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        use_triton = config.attn_backend == "triton"
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps, use_triton)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps, use_triton)
        self.mlp = MoE(config, MLP) if config.n_experts else MLP(config)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, start_pos=0, kv_cache=None, doc_mask=None):
        x = x + self.residual_dropout(self.self_attn(self.input_layernorm(x), cos, sin, start_pos, kv_cache, doc_mask))
        return x + self.residual_dropout(self.mlp(self.post_attention_layernorm(x)))


class KVCache:
    """Keys and values of every layer, preallocated as (batch, n_kv_heads, max_seq_len, head_dim).

    `pad_lens` (batch,) is the number of left-padding tokens of each row when prompts of different
    lengths are batched: those keys are masked out and each row's positions start at 0 on its first
    real token. Rewinding (speculative decoding) is just calling forward with an earlier start_pos.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int | None = None,
                 dtype=torch.float32, device="cpu", pad_lens: torch.Tensor | None = None):
        self.max_seq_len = max_seq_len or config.max_seq_len
        if self.max_seq_len > config.max_seq_len:
            raise ValueError(f"KV cache length {self.max_seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
        shape = (config.n_layers, batch_size, config.n_kv_heads, self.max_seq_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        if pad_lens is not None:
            pad_lens = torch.as_tensor(pad_lens, dtype=torch.long, device=device)
            if pad_lens.shape != (batch_size,):
                raise ValueError(f"pad_lens must have shape ({batch_size},), got {tuple(pad_lens.shape)}")
        self.pad_lens = pad_lens

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    def update(self, layer_idx: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv_heads, T, hd) at [start_pos, start_pos + T); return everything up to there."""
        end = start_pos + k.size(2)
        self.keys[layer_idx, :, :, start_pos:end] = k
        self.values[layer_idx, :, :, start_pos:end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, config.attn_backend == "triton")
        self.lm_head = Linear(config.dim, config.head_tokens + 1 if config.head_tokens else config.vocab_size, bias=False)
        if config.head_tokens:
            self.register_buffer("head_ids", torch.arange(config.head_tokens))  # set by whoever builds the model
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Kept out of the state dict and out of .to(dtype): RoPE angles need fp32 even in a bf16 model.
        self.inv_freq, self.rope_scale = rope_frequencies(config)
        self.rope_table = None  # (n, 2 * head_dim): cos | signed sin of positions [0, n), built by rope()
        self.apply(self._init_weights)
        # GPT-2 / Llama scaled init: each residual branch's output projection gets std / sqrt(2 n_layers),
        # so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count (a tied LM head counted once); non_embedding leaves out the token embedding table;
        active counts only the k experts a token runs through of each mixture-of-experts block's E."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        c = self.config
        if active and c.n_experts:
            n -= c.n_layers * (c.n_experts - c.n_experts_per_token) * 3 * c.dim * c.hidden_dim
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token, PaLM appendix B: 6 N + 12 L H hd T.

        N counts every weight that takes part in a matmul (the LM head included, tied or not, the
        embedding lookup excluded); the second term is the attention scores and weighted sum. With experts,
        N counts the k experts a token runs through, not the E the model holds.
        """
        c = self.config
        n_matmul = self.num_params(non_embedding=True, active=True)
        n_matmul += self.lm_head.weight.numel() if c.tie_embeddings else 0
        return 6 * n_matmul + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None, pad_lens=None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_seq_len, p.dtype, p.device, pad_lens)

    def rope(self, positions: torch.Tensor, dtype, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for integer positions (T,) or (B, T), all < end -> (1 or B, 1, T, head_dim); sin's first
        half is negated (apply_rope's convention).

        Rows of a table computed once in fp32 (regrown, doubling, when a later call reaches further), so a
        decode step only looks up one row instead of recomputing T x head_dim sines and cosines.
        """
        table = self.rope_table
        if table is None or table.size(0) < end or table.device != positions.device:
            n = min(max(end, 2 * (table.size(0) if table is not None else 0)), self.config.max_seq_len)
            angles = torch.arange(n, device=positions.device).float()[:, None] * self.inv_freq.to(positions.device)
            cos, sin = angles.cos(), angles.sin()                             # (n, head_dim / 2)
            # cos | cos | -sin | sin: the rotate_half layout, with apply_rope's sign folded into sin
            self.rope_table = table = torch.cat((cos, cos, -sin, sin), dim=-1) * self.rope_scale
        cos, sin = F.embedding(positions, table).to(dtype).chunk(2, dim=-1)   # each (T, hd) or (B, T, hd)
        if positions.dim() == 1:
            cos, sin = cos[None], sin[None]
        return cos[:, None], sin[:, None]

    def forward(self, idx, targets=None, loss_mask=None, start_pos: int = 0, kv_cache: KVCache | None = None,
                doc_ids=None):
        """idx (B, T) token ids -> (logits (B, T, vocab) , loss or None).

        targets (B, T): next-token ids, -100 ignored; loss_mask (B, T): 0 drops a target from the mean.
        With kv_cache, idx holds the tokens at positions [start_pos, start_pos + T) and their keys/values
        are appended to the cache (prefill: the whole prompt with start_pos=0; decode: one token at a time).
        doc_ids (B, T): packed training sequences (sft.py --pack); each token attends only to earlier tokens
        of its own document and its position counts from that document's first token.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seq_len), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        limit = kv_cache.max_seq_len if kv_cache is not None else self.config.max_seq_len
        if start_pos + T > limit:
            raise ValueError(f"sequence of {start_pos + T} tokens (start_pos={start_pos} + {T}) exceeds "
                             f"{'the KV cache length' if kv_cache is not None else 'max_seq_len'} {limit}")
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"batch of {B} rows but the KV cache holds {kv_cache.batch_size}")
        # (a compiled graph skips this data-dependent check, which would split it in two; inductor's own
        # embedding lookup still checks its index bounds)
        lowest, highest = idx.aminmax() if idx.numel() and not torch.compiler.is_compiling() else (0, 0)
        if lowest < 0 or highest >= self.config.vocab_size:
            bad = idx[(idx < 0) | (idx >= self.config.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

        positions = torch.arange(start_pos, start_pos + T, device=idx.device)             # (T,)
        if kv_cache is not None and kv_cache.pad_lens is not None:
            positions = (positions[None] - kv_cache.pad_lens[:, None]).clamp(min=0)      # (B, T)
        doc_mask = None
        if doc_ids is not None:
            if kv_cache is not None:
                raise ValueError("doc_ids (packed sequences) is for training; it cannot be used with a KV cache")
            t = torch.arange(T, device=idx.device)
            starts = torch.ones_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            positions = t - torch.where(starts, t, 0).cummax(dim=1).values                  # (B, T)
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]                          # (B, T, T)
            doc_mask = (same_doc & (t[None, :] <= t[:, None]))[:, None]                    # (B, 1, T, T)
        x = self.embed_dropout(self.embed_tokens(idx))                                    # (B, T, dim)
        cos, sin = self.rope(positions, x.dtype, start_pos + T)
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos, kv_cache, doc_mask)
        logits = self.lm_head(self.norm(x))                          # (B, T, vocab) or (B, T, head_tokens + 1)
        if self.config.head_tokens:
            logits = self.whole_vocabulary(logits)                                        # (B, T, vocab)

        loss = None
        if targets is not None:
            if loss_mask is not None:
                targets = targets.masked_fill(loss_mask == 0, -100)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            if self.training and self.config.n_experts:
                loss = loss + self.router_loss()
        return logits, loss

    def whole_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, head_tokens + 1) -> (B, T, vocab_size): each of the vocab_size - n tokens outside head_ids
        gets the "other" logit minus log(vocab_size - n). Their exponentials sum to exp(other), so the
        softmax over the vocabulary gives head_ids the probabilities of the small softmax and the rest an
        equal share of "other"'s: every loss and evaluation on whole-vocabulary logits works unchanged."""
        other = logits[..., -1:] - math.log(self.config.vocab_size - self.config.head_tokens)   # (B, T, 1)
        full = other.expand(*logits.shape[:-1], self.config.vocab_size).clone()                 # (B, T, vocab)
        full[..., self.head_ids] = logits[..., :-1]
        return full

    def router_loss(self) -> torch.Tensor | float:
        """The MoE training terms of the last forward: aux_coef * mean aux + z_coef * mean z over the layers;
        0 for a dense model. A training loop that takes its loss from the logits (sft, dpo, rlhf, distill)
        adds it, as forward does to its own loss in training mode, right after the forward that trains."""
        layers = moe_layers(self)
        if not layers:
            return 0.0
        aux = torch.stack([m.aux_loss for m in layers]).mean()
        z = torch.stack([m.z_loss for m in layers]).mean()
        return self.config.router_aux_loss_coef * aux + self.config.router_z_loss_coef * z


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="nanollm model presets: parameter counts and FLOPs per token.")
    parser.add_argument("--preset", choices=list(PRESETS), help="print this preset's full config")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length for the FLOPs/token column")
    args = parser.parse_args(argv)
    if args.preset:
        print(json.dumps(asdict(ModelConfig.from_preset(args.preset)), indent=2))
        return
    print(f"| preset | params | non-embedding | layers | dim | heads / kv | training FLOPs/token (T={args.seq_len}) |")
    print("|---|---|---|---|---|---|---|")
    for name in PRESETS:
        config = ModelConfig.from_preset(name)
        with torch.device("meta"):  # shapes only: no memory for llama-1b
            model = Transformer(config)
        print(f"| {name} | {model.num_params() / 1e6:.2f}M | {model.num_params(non_embedding=True) / 1e6:.2f}M "
              f"| {config.n_layers} | {config.dim} | {config.n_heads} / {config.n_kv_heads} "
              f"| {model.flops_per_token(args.seq_len) / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
