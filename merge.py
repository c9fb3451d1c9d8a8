"""Model merging: one model from several fine-tunes of the same base, without training (mergekit's methods).

    python merge.py --method ties --base out/base --models out/en,out/zh --weights 0.5,0.5 --density 0.5 --out-dir out/merged
    python merge.py --method slerp --base out/en --models out/zh --t 0.5 --out-dir out/slerp
    python merge.py --method task_arithmetic --base out/base --models out/sft/adapter.pt,out/math --out-dir out/ta
    python merge.py --config merge.yml --out-dir out/merged           # mergekit's YAML shape (or the same as JSON)
    python merge.py --method task_arithmetic --base out/base --models out/en,out/zh --stats   # cosine, norms

Every input is a full model theta_i, or a task vector tau_i = theta_i - theta_base, computed tensor by
tensor (theta_base: --base). Per tensor, with weights w_i:

  linear           theta = sum_i w_i theta_i / sum_i w_i                    (model soups, Wortsman et al. 2022)
  task_arithmetic  theta = theta_base + lambda sum_i w_i tau_i               (Ilharco et al. 2023)
  slerp            theta = sin((1-t) Omega) / sin(Omega) theta_0 + sin(t Omega) / sin(Omega) theta_1,
                   cos(Omega) = <theta_0, theta_1> / (|theta_0| |theta_1|): the great-circle path between the
                   two directions (Shoemake 1985); theta_0 is --base, t the share of theta_1. When the
                   directions are nearly parallel (|cos Omega| > 0.9995, where sin(Omega) -> 0) it falls back
                   to (1-t) theta_0 + t theta_1, as mergekit does.
  ties             TrIm, Elect sign and merge (Yadav et al. 2023): keep each tau_i's top `density` share of
                   entries by magnitude (the rest zeroed), elect each entry's sign by the sign of the
                   summed mass sum_i w_i tau_i (ties go to +), then average the entries that agree with it:
                   theta = theta_base + lambda sum_i w_i m_i tau_i / sum_i w_i m_i  (m_i: tau_i's sign agrees)
  dare_ties        DARE (Yu et al. 2024) then TIES' sign election: each entry of tau_i is dropped with
  dare_linear      probability p = 1 - density and the survivors rescaled by 1 / (1 - p), so the expectation
                   is unchanged; dare_linear adds the rescaled task vectors as task arithmetic does.

The variants and defaults are mergekit's (its merge_methods/registry.py): `normalize` (divide by the
weights' sum, or by the agreeing weights' sum) is on for linear and ties, off for task_arithmetic and
the DARE ones; `rescale` is on for DARE; ties' trim keeps the k = max(1, int(density * numel)) largest |tau|.
Parameters (weight, density, t) may be one number, a gradient over the layers (a list: layer l of L takes
the linear interpolation at position l / (L - 1); tensors before the layers take the first value, after
them the last), or a list of {filter, value} where the first filter that is a substring of the tensor's
name applies (`self_attn`, `mlp`; no filter: the rest), as in mergekit's YAML.

Inputs (each read tensor by tensor: peak memory about one output model plus one tensor per input):
a nanollm checkpoint (torch.load with mmap), a Hugging Face directory (safetensors' safe_open), a GGUF file
(gguf_io.py's memory-mapped reader, each tensor dequantized when read), or a LoRA adapter file (lora.save_adapter's adapter.pt, the
task vector (alpha / r) B A of each adapted layer applied to --base; linear averages the adapted models and
takes --base only for them). All must share the architecture and
the tokenizer (refused otherwise, naming the first tensor or field that differs). Computation is in fp32;
the output is a nanollm checkpoint directory (ckpt.pt, the tokenizer, merge_config.json), a Hugging Face
directory (--out-format hf) or a GGUF file (--out-format gguf), cast to `dtype` (default: the base's, else
the first model's; a GGUF input counts as float32).
"""
import argparse
import hashlib
import json
import math
import shutil
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import torch

from common import CHECKPOINT_FILE, atomic_write, load_tokenizer, peak_memory_mb, tokenizer_file
from gguf_io import WRITE_TYPES
from hf_io import config_from_hf, save_hf
from lora import base_fingerprint
from model import ModelConfig, Transformer

METHODS = ("linear", "task_arithmetic", "slerp", "ties", "dare_ties", "dare_linear")
# method -> (trim, sign consensus, normalize by default, rescale by default): mergekit's registry
VARIANTS = {"task_arithmetic": (None, False, False, False), "ties": ("magnitude", True, True, False),
            "dare_ties": ("random", True, False, True), "dare_linear": ("random", False, False, True)}
DOT_THRESHOLD = 0.9995  # |cos Omega| above this: SLERP falls back to linear interpolation
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config fields that change what the weights compute without changing a tensor's shape
ARCH_FIELDS = ("rope_theta", "rope_scaling", "norm_eps", "tie_embeddings", "attention_bias", "attention_out_bias")


class MergeError(ValueError):
    """Bad input: a flag, a config entry, a model that does not fit the others. One line, exit 2."""


# ----------------------------------------------------------------------------------------------------------
# The methods, on one tensor at a time (fp32)

def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1 - t) * v0 + t * v1


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as flat vectors; t = 0 gives v0, t = 1 gives v1."""
    u0, u1 = v0.flatten() / max(v0.norm().item(), eps), v1.flatten() / max(v1.norm().item(), eps)
    cos_omega = torch.dot(u0, u1).clamp(-1.0, 1.0).item()
    if abs(cos_omega) > dot_threshold:  # nearly (anti)parallel: sin(Omega) ~ 0, the chord is the arc
        return lerp(t, v0, v1)
    omega = math.acos(cos_omega)
    s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return s0 * v0 + s1 * v1


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the k = max(1, int(density * numel)) entries of largest |delta| kept, the others zeroed
    (a positive density keeps at least one entry, as mergekit's does)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.abs().flatten().topk(k).indices] = True
    return delta * keep.view_as(delta)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability density (drop with p = 1 - density), rescaled by 1 / density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    kept = delta * keep
    return kept / density if rescale else kept


def merge_task_vectors(deltas: list[torch.Tensor], weights: list[float], consensus: bool, normalize: bool) -> torch.Tensor:
    """sum_i w_i m_i tau_i, divided by sum_i w_i m_i when normalize. Without consensus m_i = 1; with it
    (TIES' sign election) m_i marks the entries whose sign is that of the summed mass sum_i w_i tau_i (a sum
    of 0 counts as +; a zeroed entry agrees with neither sign). Accumulated model by model: no stacked copy."""
    total = sum(w * tau for w, tau in zip(weights, deltas))
    if not consensus:
        divisor = sum(weights)
        return total / (divisor if abs(divisor) > 1e-8 else 1.0) if normalize else total
    elected = torch.where(total >= 0, 1.0, -1.0)
    mixed, divisor = torch.zeros_like(total), torch.zeros_like(total)
    for w, tau in zip(weights, deltas):
        agree = tau.sign() * math.copysign(1.0, w) == elected if w else torch.zeros_like(tau, dtype=torch.bool)
        mixed += torch.where(agree, w * tau, 0.0)
        divisor += agree * w
    divisor[divisor == 0] = 1  # no model agrees (every entry zero): the sum is 0 anyway
    return mixed / divisor if normalize else mixed


def merge_tensor(method: str, base: torch.Tensor | None, tensors: list[torch.Tensor], params: list[dict],
                 options: dict, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One merged tensor. params[i]: model i's weight / density for this tensor; options: the method's
    global ones (t, normalize, rescale, lambda); generators[i]: model i's DARE randomness for this tensor."""
    weights = [p.get("weight", 1.0) for p in params]
    if method == "linear":
        return merge_task_vectors(tensors, weights, consensus=False, normalize=options.get("normalize", True))
    if method == "slerp":
        return slerp(options["t"], base, tensors[0])
    trim, consensus, normalize, rescale = VARIANTS[method]
    deltas = []
    for i, (theta, p) in enumerate(zip(tensors, params)):
        delta, density = theta - base, p.get("density", 1.0)
        if trim == "magnitude":
            delta = magnitude_trim(delta, density)
        elif trim == "random":
            delta = random_drop(delta, density, generators[i], options.get("rescale", rescale))
        deltas.append(delta)
    mixed = merge_task_vectors(deltas, weights, consensus, options.get("normalize", normalize))
    return base + options.get("lambda", 1.0) * mixed


# ----------------------------------------------------------------------------------------------------------
# Parameters: a number, a gradient over the layers, or filtered values (mergekit's evaluate_setting)

def tensor_position(name: str, n_layers: int) -> float:
    """Where a tensor sits in the depth, for gradients: 0 before the layers, l / (L - 1) in layer l, 1 after."""
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        return layer / (n_layers - 1) if n_layers > 1 else 1.0
    return 0.0 if name.startswith("embed_tokens") else 1.0


def evaluate_setting(setting, name: str, position: float, where: str):
    """The value of a parameter setting for the tensor `name` at depth `position` (see the docstring)."""
    if isinstance(setting, bool) or not isinstance(setting, (int, float, list)):
        raise MergeError(f"{where}: expected a number, a list of numbers or a list of {{filter, value}}, got {setting!r}")
    if isinstance(setting, (int, float)):
        return float(setting)
    if setting and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        scaled = position * (len(setting) - 1)
        i0 = int(scaled)
        i1, frac = min(len(setting) - 1, i0 + 1), scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for rule in setting:
        if not isinstance(rule, dict) or "value" not in rule or set(rule) - {"filter", "value"}:
            raise MergeError(f"{where}: a list of rules needs {{filter, value}} entries, got {rule!r}")
        if rule.get("filter") in (None, "*") or rule["filter"] in name:
            return evaluate_setting(rule["value"], name, position, where)
    return None


# ----------------------------------------------------------------------------------------------------------
# Inputs: each gives its config, its tokenizer and tensor(name) in fp32, one tensor at a time

def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """The state dict's names and shapes for a config; a tied LM head is left out (it is the embedding)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config.tie_embeddings)}


class Source:
    """One input model. `tensor(name)` returns a fresh fp32 copy of one tensor; `dtype` is its storage dtype."""
    path: str
    config: ModelConfig
    dtype: torch.dtype

    def names(self) -> dict[str, tuple]:
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def tokenizer_path(self) -> Path:
        return Path(self.path)


class StateDictSource(Source):
    """A nanollm checkpoint: ckpt.pt memory-mapped, so a tensor is read from disk when it is used."""
    def __init__(self, path, state: dict, config: ModelConfig):
        self.path, self.state, self.config = str(path), state, config
        self.dtype = state["embed_tokens.weight"].dtype

    def names(self):
        return {k: tuple(v.shape) for k, v in self.state.items()
                if not (k == "lm_head.weight" and self.config.tie_embeddings)}

    def tensor(self, name):
        return self.state[name].to(torch.float32, copy=True)


class HFSource(Source):
    """A Hugging Face directory: config.json, safetensors (single or sharded) opened with safe_open."""
    def __init__(self, path: Path):
        from safetensors import safe_open
        self.path = str(path)
        self.config = config_from_hf(json.loads((path / "config.json").read_text()), str(path / "config.json"))
        index = path / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        self.files, self.where = [], {}
        for shard in shards:
            if not (path / shard).exists():
                raise MergeError(f"{path / shard}: no such safetensors file")
            handle = safe_open(path / shard, framework="pt")
            self.files.append(handle)
            for key in handle.keys():
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and self.config.tie_embeddings):
                    continue
                self.where[key.removeprefix("model.")] = (handle, key)
        handle, key = self.where.get("embed_tokens.weight", (None, None))
        self.dtype = handle.get_slice(key).get_dtype() if handle else "F32"
        self.dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(self.dtype, torch.float32)

    def names(self):
        return {name: tuple(handle.get_slice(key).get_shape()) for name, (handle, key) in self.where.items()}

    def tensor(self, name):
        handle, key = self.where[name]
        return handle.get_tensor(key).to(torch.float32)


class AdapterSource(Source):
    """A LoRA adapter file (lora.save_adapter) on the base model: theta = theta_base + (alpha / r) B A for
    each adapted linear layer, + (alpha / r) A B for an adapted token embedding (a tied head follows it)."""
    def __init__(self, path: Path, payload: dict, base: Source):
        self.path, self.base, self.config, self.dtype = str(path), base, base.config, base.dtype
        self.alpha, self.rslora = payload["lora_config"]["alpha"], payload["lora_config"].get("rslora", False)
        self.factors = {}  # base weight name -> {"lora_A": A, "lora_B": B}
        for key, value in payload["lora"].items():
            module, factor = key.rsplit(".", 1)               # "layers.0.self_attn.q_proj", "lora_A"
            self.factors.setdefault(module + ".weight", {})[factor] = value
        unknown = sorted(set(self.factors) - set(base.names()))
        if unknown:
            raise MergeError(f"{path}: adapter for {unknown[0]}, which the base model {base.path} does not have")
        expected = payload.get("base_fingerprint")  # absent from adapters saved before it was recorded
        if expected and base_fingerprint({name: base.tensor(name) for name in self.factors}) != expected:
            raise MergeError(f"{path}: trained on another base model than {base.path}: the weights it adapts "
                             f"differ (same shapes, other values)")

    def names(self):
        return self.base.names()

    def tensor(self, name):
        theta = self.base.tensor(name)
        if name in self.factors:
            A, B = self.factors[name]["lora_A"].float(), self.factors[name]["lora_B"].float()
            # a linear layer: B (out, r) @ A (r, in); the embedding: A (vocab, r) @ B (r, dim), its own rank
            embedding = name == "embed_tokens.weight"
            r = A.shape[1] if embedding else A.shape[0]
            theta += (A @ B if embedding else B @ A) * (self.alpha / (math.sqrt(r) if self.rslora else r))
        return theta

    def tokenizer_path(self):
        return self.base.tokenizer_path()


class GGUFSource(Source):
    """A GGUF file (gguf_io.py): memory-mapped, each tensor dequantized to fp32 when read, its Q/K rows put
    back in Hugging Face's order where llama.cpp's converter permuted them."""
    def __init__(self, path: Path):
        import gguf_io
        self.gguf_io, self.path = gguf_io, str(path)
        try:
            self.gguf = gguf_io.GGUFFile(path)
            self.config = gguf_io.config_from_gguf(self.gguf)
        except gguf_io.GGUFError as e:
            raise MergeError(str(e)) from None
        self.permuted = self.gguf.field("general.architecture") in gguf_io.PERMUTED_ARCHITECTURES
        self.dtype = torch.float32  # quantized blocks have no float dtype of their own: the output is fp32

    def names(self):
        shapes = expected_shapes(self.config)
        return {key: self.gguf.tensors[self.gguf_io.gguf_name(key)][1] for key in shapes
                if self.gguf_io.gguf_name(key) in self.gguf.tensors}

    def tensor(self, name):
        tensor = self.gguf.tensor(self.gguf_io.gguf_name(name))
        if self.permuted and ".q_proj." in name:
            tensor = self.gguf_io.unpermute_rope_rows(tensor, self.config.n_heads)
        elif self.permuted and ".k_proj." in name:
            tensor = self.gguf_io.unpermute_rope_rows(tensor, self.config.n_kv_heads)
        return tensor


def open_source(path: str, base: Source | None = None) -> Source:
    """Any supported input, by what the path holds."""
    p = Path(path)
    if not p.exists():
        raise MergeError(f"{path}: no such file or directory")
    if p.suffix == ".gguf":
        return GGUFSource(p)
    if p.is_dir() and (p / "config.json").exists() and not (p / CHECKPOINT_FILE).exists():
        return HFSource(p)
    ckpt_file = p / CHECKPOINT_FILE if p.is_dir() else p
    if not ckpt_file.exists():
        raise MergeError(f"{path}: neither a nanollm checkpoint ({CHECKPOINT_FILE}), a Hugging Face directory "
                         f"(config.json), a .gguf file nor a LoRA adapter file")
    try:  # mmap: the tensors stay on disk until a merge step reads them
        payload = torch.load(ckpt_file, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # torch.load raises many kinds for a file that is not a checkpoint
        raise MergeError(f"{ckpt_file}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(payload, dict) and "lora" in payload and "lora_config" in payload and "model" not in payload:
        if base is None:
            raise MergeError(f"{path}: a LoRA adapter is a task vector on a base model: give --base")
        return AdapterSource(p, payload, base)
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise MergeError(f"{ckpt_file}: not a nanollm checkpoint (no 'model' and 'model_config' entries)")
    if "quant_config" in payload:
        raise MergeError(f"{path}: a quantized checkpoint (quant.py); merge the full-precision models, then quantize")
    return StateDictSource(p, payload["model"], ModelConfig(**payload["model_config"]))


def tokenizer_identity(source: Source) -> tuple[str, object]:
    """A fingerprint of what the weights are tied to, the id of every token (its ranks and special tokens;
    not the pre-split regex, which two readers of one vocabulary may spell differently), and the tokenizer
    itself (None when only its file can be read: then the fingerprint is the file's bytes)."""
    directory = source.tokenizer_path()
    try:
        tok = load_tokenizer(directory)
    except FileNotFoundError:
        raise MergeError(f"{source.path}: no tokenizer beside the model (a merge keeps its inputs' tokenizer)") from None
    except (ValueError, NotImplementedError, KeyError) as e:
        path = tokenizer_file(directory)
        if path.suffix != ".json":
            raise MergeError(f"{source.path}: its tokenizer cannot be read ({e})") from None
        return hashlib.sha256(path.read_bytes()).hexdigest(), None
    h = hashlib.sha256(json.dumps(sorted(tok.special_tokens.items())).encode())
    for token, rank in sorted(tok.ranks.items(), key=lambda item: item[1]):
        h.update(token + b"\0%d\n" % rank)
    return h.hexdigest(), tok


def check_compatible(sources: list[Source]) -> dict[str, tuple]:
    """Every input has the first one's tensors, shapes, architecture fields and tokenizer, or a MergeError
    names the first thing that differs. Returns the tensor names and shapes."""
    ref = sources[0]
    shapes = ref.names()
    for source in sources:
        have = source.names()
        for name, shape in shapes.items():
            if name not in have:
                raise MergeError(f"{source.path}: has no tensor {name} ({ref.path} has {shape})")
            if tuple(have[name]) != shape:
                raise MergeError(f"{source.path}: tensor {name} has shape {tuple(have[name])}, {ref.path} has {shape}")
        extra = sorted(set(have) - set(shapes))
        if extra:
            raise MergeError(f"{source.path}: tensor {extra[0]} is not in {ref.path}")
        for field in ARCH_FIELDS:
            mine, theirs = getattr(source.config, field), getattr(ref.config, field)
            if mine != theirs and not (isinstance(mine, float) and math.isclose(mine, theirs, rel_tol=1e-6)):  # GGUF: fp32
                raise MergeError(f"{source.path}: config {field}={mine!r}, {ref.path} has {theirs!r}")
    fingerprint = tokenizer_identity(ref)[0]
    for source in sources[1:]:
        if tokenizer_identity(source)[0] != fingerprint:
            raise MergeError(f"{source.path}: its tokenizer differs from {ref.path}'s (merged models must share one)")
    return shapes


# ----------------------------------------------------------------------------------------------------------
# The merge configuration (mergekit's YAML shape) and the streaming loop

def read_config_file(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise MergeError(f"--config {path}: {e.strerror}") from None
    if Path(path).suffix == ".json":
        try:
            config = json.loads(text)
        except ValueError as e:
            raise MergeError(f"--config {path}: not valid JSON ({e})") from None
    else:
        import yaml
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MergeError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise MergeError(f"--config {path}: expected a mapping with merge_method and models")
    return config


def normalize_config(config: dict, where: str = "config") -> dict:
    """Check a mergekit-shaped config and bring it to {merge_method, base_model, models: [{model,
    parameters}], parameters, dtype, out_dtype}; a single full-depth slice becomes models."""
    known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise MergeError(f"{where}: unsupported key {unknown[0]!r} (supported: {', '.join(sorted(known))})")
    method = config.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"{where}: merge_method {method!r} is not one of {', '.join(METHODS)}")
    if "slices" in config:
        if "models" in config or not isinstance(config["slices"], list) or len(config["slices"]) != 1:
            raise MergeError(f"{where}: give models, or exactly one slice (nanollm merges whole models)")
        models = [{"model": s["model"], "parameters": s.get("parameters") or {}, "layer_range": s.get("layer_range")}
                  for s in config["slices"][0].get("sources", [])]
    else:
        models = config.get("models")
    if not isinstance(models, list) or not models:
        raise MergeError(f"{where}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    entries = []
    for i, entry in enumerate(models):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise MergeError(f"{where}: models[{i}] needs a model path")
        params = entry.get("parameters") or {}
        bad = sorted(set(params) - {"weight", "density"})
        if bad:
            raise MergeError(f"{where}: models[{i}].parameters: unsupported {bad[0]!r} (weight, density)")
        entries.append({"model": entry["model"], "parameters": params, "layer_range": entry.get("layer_range")})
    params = config.get("parameters") or {}
    # int8_mask is mergekit's memory saving for the sign masks: accepted, nothing to do here
    bad = sorted(set(params) - {"t", "weight", "density", "normalize", "rescale", "lambda", "int8_mask"})
    if bad:
        raise MergeError(f"{where}: parameters: unsupported {bad[0]!r}")
    base = config.get("base_model")
    if method == "slerp":
        others = [e for e in entries if e["model"] != base]
        if base is None and len(entries) == 2:
            base, others = entries[0]["model"], entries[1:]
        if base is None or len(others) != 1:
            raise MergeError(f"{where}: slerp interpolates two models: base_model (--base; t = 0) and one other (t = 1)")
        if "t" not in params:
            raise MergeError(f"{where}: slerp needs parameters.t (--t; 0: the base model, 1: the other)")
        entries = others
    elif method == "linear":
        if base in [e["model"] for e in entries]:
            base = None  # mergekit's shape: the base is one of the models averaged
    else:
        if base is None:
            raise MergeError(f"{where}: {method} adds task vectors theta_i - theta_base: give base_model (--base)")
        entries = [e for e in entries if e["model"] != base]
        if not entries:
            raise MergeError(f"{where}: {method} needs at least one model besides base_model (--base)")
    for field in ("dtype", "out_dtype"):
        if config.get(field) is not None and config[field] not in DTYPES:
            raise MergeError(f"{where}: {field} {config[field]!r} is not one of {', '.join(DTYPES)}")
    return {"merge_method": method, "base_model": base, "models": entries, "parameters": params,
            "dtype": config.get("dtype"), "out_dtype": config.get("out_dtype")}


def dare_generator(seed: int, model_index: int, name: str) -> torch.Generator:
    """DARE's randomness for one (model, tensor): fixed by the seed, whatever order tensors are merged in."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{model_index}:{name}".encode()))


def anonymous_memory_mb() -> float:
    """This process's resident anonymous memory (Linux; 0 elsewhere): its RSS without the pages of the
    memory-mapped input files, which the kernel may drop and read again at will."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def merge_models(config: dict, seed: int = 0, progress: bool = True) -> tuple[dict, ModelConfig, Source]:
    """Run a normalized config: returns the merged state dict (fp32 tensors, tied head left out), the
    output ModelConfig and the source whose tokenizer the output takes."""
    method, params = config["merge_method"], config["parameters"]
    base = open_source(config["base_model"]) if config["base_model"] else None
    models = [open_source(e["model"], base) for e in config["models"]]
    if method == "linear" and base is not None and not any(isinstance(m, AdapterSource) for m in models):
        raise MergeError(f"linear averages the models listed; base_model (--base) {base.path} is not one of them "
                         f"(linear takes a base only for LoRA adapter inputs, which apply to it)")
    sources = ([base] if base else []) + models
    shapes = check_compatible(sources)
    ref = sources[0]
    n_layers = ref.config.n_layers
    for entry in config["models"]:
        if entry["layer_range"] not in (None, [0, n_layers], (0, n_layers)):
            raise MergeError(f"{entry['model']}: layer_range {entry['layer_range']} must be [0, {n_layers}] "
                             f"(nanollm merges whole models)")
    merged, start, peak_anon = {}, time.time(), 0.0
    for done, (name, shape) in enumerate(shapes.items(), 1):
        position = tensor_position(name, n_layers)
        options = {key: evaluate_setting(value, name, position, f"parameters.{key}")
                   if key in ("t", "weight", "density", "lambda") else value for key, value in params.items()}
        per_model = []
        for i, entry in enumerate(config["models"]):
            own = {**{k: params[k] for k in ("weight", "density") if k in params}, **entry["parameters"]}
            values = {k: evaluate_setting(v, name, position, f"{entry['model']}: {k}") for k, v in own.items()}
            per_model.append({k: v for k, v in values.items() if v is not None})
        for p in per_model:
            if not 0 < p.get("density", 1.0) <= 1:
                raise MergeError(f"density {p['density']} for {name}: must be in (0, 1]")
        if method == "slerp" and options.get("t") is None:
            raise MergeError(f"parameters.t: no value applies to {name} (add a rule without a filter)")
        generators = [dare_generator(seed, i, name) for i in range(len(models))] if method.startswith("dare") else None
        merged[name] = merge_tensor(method, base.tensor(name) if base else None, [m.tensor(name) for m in models],
                                    per_model, options, generators)
        peak_anon = max(peak_anon, anonymous_memory_mb())
        if progress and (done % max(1, len(shapes) // 10) == 0 or done == len(shapes)):
            print(f"merged {done}/{len(shapes)} tensors | {time.time() - start:.1f}s | peak RSS "
                  f"{peak_memory_mb('cpu'):.0f} MB, of it anonymous {peak_anon:.0f} MB", flush=True)
    return merged, ref.config, ref


def task_vector_stats(config: dict) -> dict:
    """How the task vectors tau_i = theta_i - theta_base of a config's models relate, streamed tensor by
    tensor over the whole model: each one's norm relative to the base's, their pairwise cosine, and the
    share of entries that both change where the signs disagree (what TIES' election has to settle)."""
    config = normalize_config(config)
    if config["base_model"] is None:
        raise MergeError("--stats compares task vectors: give --base (and a method that takes one, e.g. task_arithmetic)")
    base = open_source(config["base_model"])
    models = [open_source(e["model"], base) for e in config["models"]]
    shapes = check_compatible([base, *models])
    n = len(models)
    dots, base_sq = torch.zeros(n, n, dtype=torch.float64), 0.0
    conflicts, both = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for name in shapes:
        theta = base.tensor(name)
        base_sq += theta.double().square().sum().item()
        deltas = [m.tensor(name) - theta for m in models]
        for i in range(n):
            for j in range(i, n):
                dots[i, j] += torch.dot(deltas[i].flatten().double(), deltas[j].flatten().double()).item()
                moved = (deltas[i] != 0) & (deltas[j] != 0)
                both[i, j] += moved.sum().item()
                conflicts[i, j] += (moved & (deltas[i].sign() != deltas[j].sign())).sum().item()
    norms = dots.diagonal().sqrt()
    pairs = {f"{i},{j}": {"cosine": dots[i, j].item() / max(norms[i].item() * norms[j].item(), 1e-30),
                          "sign_conflict": conflicts[i, j].item() / max(both[i, j].item(), 1)}
             for i in range(n) for j in range(i + 1, n)}
    return {"models": [e["model"] for e in config["models"]], "relative_norm": (norms / math.sqrt(base_sq)).tolist(),
            "pairs": pairs}


def out_dtype(config: dict, ref: Source) -> torch.dtype:
    name = config.get("out_dtype") or config.get("dtype")
    return DTYPES[name] if name else ref.dtype


def write_output(out_dir: Path, merged: dict, model_config: ModelConfig, dtype: torch.dtype, tokenizer_source: Source,
                 merge_config: dict, out_format: str = "nanollm", gguf_type: str = "f32") -> None:
    """A nanollm checkpoint (ckpt.pt written atomically, the tokenizer, merge_config.json), a Hugging Face
    directory (config.json, model.safetensors, the tokenizer) or model.gguf (gguf_io.save_gguf, gguf_type)."""
    state = {name: tensor.to(dtype) for name, tensor in merged.items()}
    if model_config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    out_dir.mkdir(parents=True, exist_ok=True)
    _, tok = tokenizer_identity(tokenizer_source)
    source_file = tokenizer_file(tokenizer_source.tokenizer_path())
    if source_file.suffix == ".json" and json.loads(source_file.read_text(encoding="utf-8")).get("format") != "nanollm-bpe":
        shutil.copyfile(source_file, out_dir / "tokenizer.json")  # a Hugging Face tokenizer: kept byte for byte
        tokenizer_name = None
    else:  # bpe.py's own files (from a nanollm checkpoint, or read from a GGUF file's metadata)
        tok.save(out_dir / "tokenizer")
        tokenizer_name = "tokenizer"
    (out_dir / "merge_config.json").write_text(json.dumps(merge_config, indent=2) + "\n")
    if out_format in ("hf", "gguf"):
        with torch.device("meta"):
            model = Transformer(model_config)
        model.load_state_dict(state, assign=True)
        if model_config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if out_format == "hf":
            save_hf(model, out_dir)
        else:
            from gguf_io import save_gguf
            if tok is None:
                raise MergeError(f"{tokenizer_source.path}: its tokenizer cannot be written to GGUF (bpe.py does not read it)")
            save_gguf(model, tok, out_dir / "model.gguf", qtype=gguf_type)
        return
    payload = {"model": state, "model_config": asdict(model_config), "merge_config": merge_config}
    if tokenizer_name:
        payload["tokenizer"] = tokenizer_name
    atomic_write(out_dir / CHECKPOINT_FILE, lambda tmp: torch.save(payload, tmp))


def run(config: dict, out_dir, seed: int = 0, out_format: str = "nanollm", overwrite: bool = False,
        progress: bool = True, gguf_type: str = "f32", where: str = "config") -> Path:
    """Normalize `config` (`where` names it in errors), merge, write out_dir; refuses to overwrite a
    checkpoint or an input."""
    config = normalize_config(config, where)
    out_dir = Path(out_dir)
    inputs = [config["base_model"], *[e["model"] for e in config["models"]]]
    for path in filter(None, inputs):
        if Path(path).resolve() in (out_dir.resolve(), (out_dir / CHECKPOINT_FILE).resolve()):
            raise MergeError(f"--out-dir {out_dir} is an input of the merge ({path}): choose another directory")
    target = out_dir / {"nanollm": CHECKPOINT_FILE, "hf": "model.safetensors", "gguf": "model.gguf"}[out_format]
    if target.exists() and not overwrite:
        raise MergeError(f"--out-dir {out_dir} already holds {target.name} (pass --overwrite to replace it)")
    merged, model_config, ref = merge_models(config, seed, progress)
    dtype = out_dtype(config, ref)
    write_output(out_dir, merged, model_config, dtype, ref, {**config, "seed": seed}, out_format, gguf_type)
    if progress:
        print(f"wrote {out_dir} ({config['merge_method']} of {len(config['models'])} model(s), {str(dtype).removeprefix('torch.')})")
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# CLI

def floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise MergeError(f"{flag} {text!r}: expected comma-separated numbers") from None


def config_from_flags(args) -> dict:
    """The flags as a mergekit-shaped config: one entry per --models path with its weight and density."""
    if not args.method or not args.models:
        raise MergeError("give --config FILE, or --method and --models")
    models = args.models.split(",")
    per_model = {}
    for flag, key in (("--weights", "weights"), ("--density", "density")):
        value = getattr(args, key)
        if value is None:
            continue
        numbers = floats(value, flag)
        if len(numbers) == 1:
            numbers *= len(models)
        if len(numbers) != len(models):
            raise MergeError(f"{flag} {value!r}: one value, or one per model ({len(models)})")
        per_model[key] = numbers
    entries = [{"model": path, "parameters": {("weight" if k == "weights" else k): v[i] for k, v in per_model.items()}}
               for i, path in enumerate(models)]
    params = {k: v for k, v in (("t", args.t), ("lambda", args.scale), ("normalize", args.normalize),
                                ("rescale", args.rescale)) if v is not None}
    return {"merge_method": args.method, "base_model": args.base, "models": entries, "parameters": params,
            "dtype": args.dtype}


def truth(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return text.lower() in ("true", "1", "yes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="YAML (mergekit's shape):\n  merge_method: ties\n  base_model: out/base\n"
                                            "  models:\n    - model: out/en\n      parameters: {weight: 0.5, density: 0.5}\n"
                                            "    - model: out/zh\n      parameters: {weight: 0.5, density: 0.5}\n"
                                            "  parameters: {normalize: true}\n  dtype: float32")
    parser.add_argument("--config", help="a merge config in mergekit's YAML shape (.yml/.yaml) or the same as .json")
    parser.add_argument("--method", choices=METHODS, help="merge method (instead of --config)")
    parser.add_argument("--base", help="the base model: task vectors are taken against it; slerp's t = 0 end")
    parser.add_argument("--models", help="comma-separated models: nanollm checkpoints, Hugging Face directories, "
                                         ".gguf files, LoRA adapter files (adapter.pt, applied to --base)")
    parser.add_argument("--weights", help="one weight, or one per model (default 1 each)")
    parser.add_argument("--density", help="share of each task vector kept (ties, dare_*): one, or one per model (default 1)")
    parser.add_argument("--t", type=float, help="slerp: 0 gives --base, 1 the other model")
    parser.add_argument("--lambda", dest="scale", type=float, help="scale of the merged task vector (default 1)")
    parser.add_argument("--normalize", type=truth,
                        help="divide by the sum of the (agreeing) weights: true|false (default: the method's)")
    parser.add_argument("--rescale", type=truth,
                        help="dare_*: rescale kept entries by 1/density: true|false (default true)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="output dtype (default: the base's, else the first model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
    parser.add_argument("--out-dir", help="where the merged model goes")
    parser.add_argument("--stats", action="store_true", help="write no model: print the task vectors' norms (relative "
                                                             "to --base's), pairwise cosines and sign conflicts")
    parser.add_argument("--out-format", choices=["nanollm", "hf", "gguf"], default="nanollm",
                        help="nanollm checkpoint (ckpt.pt), Hugging Face directory (config.json + safetensors) "
                             "or OUT_DIR/model.gguf")
    parser.add_argument("--gguf-type", default="f32", choices=WRITE_TYPES, help="--out-format gguf: how matrices "
                                                                            "are stored (gguf_io.py)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out-dir")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        where = f"--config {args.config}" if args.config else "flags"
        if args.config:
            given = [f for f in ("method", "base", "models", "weights", "density", "t", "scale", "normalize", "rescale",
                                 "dtype") if getattr(args, f) is not None]
            if given:
                flag = {"scale": "lambda"}.get(given[0], given[0])
                raise MergeError(f"--config and --{flag} both given: put everything in the config file")
            config = read_config_file(args.config)
        else:
            config = config_from_flags(args)
        if args.stats:
            stats = task_vector_stats(config)
            for i, (model, norm) in enumerate(zip(stats["models"], stats["relative_norm"])):
                print(f"tau_{i} = {model} - base: |tau| / |theta_base| = {norm:.4f}")
            for pair, v in stats["pairs"].items():
                print(f"tau_{pair.replace(',', ', tau_')}: cosine {v['cosine']:+.4f}, opposite signs on "
                      f"{v['sign_conflict']:.1%} of the entries both change")
            return 0
        if not args.out_dir:
            raise MergeError("--out-dir: required (where the merged model goes)")
        run(config, args.out_dir, args.seed, args.out_format, args.overwrite, gguf_type=args.gguf_type, where=where)
    except MergeError as e:
        parser.exit(2, f"merge.py: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
