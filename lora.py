"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al. 2021, arXiv:2106.09685).

A wrapped layer computes

    y = W x + (alpha / r) * B A x          A: (r, in), B: (out, r), r << min(in, out)

with W frozen. A starts Kaiming-uniform (as in the paper's reference code, loralib) and B at zero, so
training starts exactly at the base model; dropout acts on the adapter's input only. rsLoRA (Kalajdzievski
2023) scales by alpha / sqrt(r) instead, which keeps the update's size stable as r grows. Merging
folds B A into W (inference at the base model's cost); unmerging takes it out again.

The token embedding can carry an adapter too (`embedding_rank`, as PEFT's LoRA on an nn.Embedding):
E' = E + (alpha / r) A B with A (vocab, r) at zero and B (r, dim) Gaussian. When the LM head is tied to
the embedding the head follows (logits h E'^T), so even r = 1 lets every token's logit move by its own
amount: what fine-tuning on text unlike the pretraining mix needs most (sft.py's Alpaca benchmark).

    from lora import apply_lora, disable_adapters, save_adapter, load_adapter, merge_lora
    counts = apply_lora(model, targets=["q_proj", "v_proj"], r=8, alpha=16)   # freezes the rest
    with disable_adapters(model): ...     # the base model, e.g. DPO's reference, without a second copy
    save_adapter(model, "out/adapter.pt")  # the adapters alone: a few hundred KB for a small model

The base layer may be any module with `in_features`, `out_features` and a forward (quant_linear.py's
QuantLinear: QLoRA). Targets name the layers by their last name component (model.py follows
Hugging Face: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or Meta's Llama names (wq wk
wv wo w1 w2 w3), or an fnmatch pattern over the full name ("layers.0.*").
"""
import hashlib
import math
from contextlib import contextmanager
from fnmatch import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import atomic_write
from quant_linear import QuantLinear

# Meta's Llama names -> Hugging Face names (w1 is the gate, w3 the up projection, w2 the down)
META_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
              "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALayer(nn.Module):
    """What every adapted layer shares: the scaling, the on/off and merged flags, merge and unmerge of
    delta_weight() (the subclass's (alpha/r) B A, shaped like base.weight) into the frozen base weight."""
    def __init__(self, base: nn.Module, r: int, alpha: float, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.base = base
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.merged = False
        self.enabled = True

    @property
    def active(self) -> bool:
        return self.enabled and not self.merged

    def _check_mergeable(self):
        if not isinstance(getattr(self.base, "weight", None), nn.Parameter) or not self.base.weight.is_floating_point():
            raise TypeError(f"cannot merge into a {type(self.base).__name__} base (quantized?): dequantize it first")

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self._check_mergeable()
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}"


class LoRALinear(LoRALayer):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, r, alpha, rslora)
        # the adapters live where the base layer does; a quantized base (QLoRA) has integer buffers, no float weight
        tensors = [*base.parameters(), *base.buffers()]
        float_params = [p for p in base.parameters() if p.is_floating_point()]
        factory = {"device": tensors[0].device if tensors else None,
                   "dtype": float_params[0].dtype if float_params else torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as loralib does
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        y = self.base(x)
        if not self.active:
            return y
        # (..., in) -> (..., r) -> (..., out): never forms the (out, in) product B A
        return y + (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)


class LoRAEmbedding(LoRALayer):
    """A token embedding E (vocab, dim) adapted to E + (alpha/r) A B: A (vocab, r) starts at zero (the
    factor a token indexes, so training starts at the base model), B (r, dim) Gaussian, as PEFT's
    embedding LoRA. Row v of A is token v's coordinates in the r directions of B."""
    def __init__(self, base: nn.Embedding, r: int, alpha: float, rslora: bool = False):
        super().__init__(base, r, alpha, rslora)
        vocab, dim = base.weight.shape
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(vocab, r, **factory))
        self.lora_B = nn.Parameter(torch.randn(r, dim, **factory) / math.sqrt(dim))

    @property
    def weight(self) -> nn.Parameter:  # the base matrix, for code that reads embed_tokens.weight's device or dtype
        return self.base.weight

    def forward(self, idx):                                               # (B, T) -> (B, T, dim)
        y = self.base(idx)
        if not self.active:
            return y
        return y + (self.lora_A[idx] @ self.lora_B * self.scaling).to(y.dtype)

    def project(self, h):
        """A tied LM head's logits h E'^T = h E^T + (alpha/r) (h B^T) A^T: (..., dim) -> (..., vocab),
        without forming the (vocab, dim) update."""
        logits = F.linear(h, self.base.weight)
        if not self.active:
            return logits
        return logits + ((h.to(self.lora_B.dtype) @ self.lora_B.T) @ self.lora_A.T * self.scaling).to(logits.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_A @ self.lora_B) * self.scaling  # (vocab, dim)


class TiedLMHead(nn.Module):
    """Stands in for an LM head whose weight is the token embedding's while that embedding carries a
    LoRAEmbedding: the logits come from the adapted embedding, so input and output stay one matrix. It
    holds no weights of its own (the state dict has the embedding's once); `original` is the head it
    replaced, put back by merge_and_unload."""
    def __init__(self, embedding: LoRAEmbedding, original: nn.Module):
        super().__init__()
        self.__dict__.update(embedding=embedding, original=original)  # references, not submodules

    @property
    def weight(self) -> nn.Parameter:  # the base (unadapted) matrix, for code that reads a head's weight
        return self.embedding.base.weight

    def forward(self, h):
        return self.embedding.project(h)


def lora_layers(model: nn.Module) -> list[LoRALayer]:
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def _targeted(name: str, targets) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(last == META_NAMES.get(t, t) or fnmatch(name, t) for t in targets)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, targets=None, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               rslora: bool = False, embedding_rank: int = 0) -> dict:
    """Wrap every targeted linear layer in a LoRALinear and freeze everything else; embedding_rank > 0
    also wraps the token embedding(s) in a LoRAEmbedding of that rank, and a head tied to one in a
    TiedLMHead.

    Returns {"trainable": n, "total": n, "layers": n}. A target that matches no layer is an error
    (a typo would otherwise train nothing)."""
    targets = list(targets or ALL_LINEAR)
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [(name, module) for name, module in model.named_modules()
              if hasattr(module, "in_features") and hasattr(module, "out_features") and _targeted(name, targets)]
    if not chosen:
        raise ValueError(f"LoRA targets {targets} match no linear layer (names look like "
                         f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]})")
    unmatched = [t for t in targets if not any(_targeted(name, [t]) for name, _ in chosen)]
    if unmatched:
        raise ValueError(f"LoRA target(s) {unmatched} match no linear layer")
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)] if embedding_rank else []
    if embedding_rank and not embeddings:
        raise ValueError("embedding_rank > 0 but the model has no nn.Embedding")
    tied = {id(m.weight) for _, m in embeddings}
    if any(id(getattr(m, "weight", None)) in tied for _, m in chosen):
        raise ValueError("a LoRA target is tied to the token embedding: use embedding_rank for it instead")
    for name, module in chosen:
        _replace(model, name, LoRALinear(module, r, alpha, dropout, rslora))
    for name, module in embeddings:
        adapter = LoRAEmbedding(module, embedding_rank, alpha, rslora)
        heads = [(n, m) for n, m in model.named_modules()
                 if m is not module and getattr(m, "weight", None) is module.weight]  # tied to this embedding
        _replace(model, name, adapter)
        for head_name, head in heads:
            _replace(model, head_name, TiedLMHead(adapter, head))
    model.lora_config = {"targets": targets, "r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora,
                         "embedding_rank": embedding_rank}
    # taken now, while every base weight is as loaded: a merge and unmerge later leaves rounding in them
    model.lora_base_fingerprint = base_fingerprint({name + ".weight": getattr(m.base, "weight", None)
                                                    for name, m in model.named_modules() if isinstance(m, LoRALayer)})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters()),
            "layers": len(chosen) + len(embeddings)}


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model is its base model (adapters off, merged ones taken out)."""
    layers = lora_layers(model)
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.enabled = True
            if merged:
                layer.merge()


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layers back (a normal model)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALayer):
            module.merge()
            _replace(model, name, module.base)
        elif isinstance(module, TiedLMHead):  # its weight is the embedding's, merged above or below
            _replace(model, name, module.original)
    model.__dict__.pop("lora_config", None)
    return model


def merged_state_dict(model: nn.Module) -> dict:
    """The state dict of the model with every adapter folded in, under the base model's names (what
    merge_and_unload(model).state_dict() gives), computed without touching the model. QuantLinear
    layers (QLoRA) come out dequantized, as plain `weight`s: the merged model is a full-precision one."""
    adapted = {name + ".base.weight": layer for name, layer in model.named_modules()
               if isinstance(layer, LoRALayer) and layer.active}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    packed = {f"{name}.{buffer}" for name, m in quantized.items() for buffer, _ in m.named_buffers()}
    state = {k: v for k, v in model.state_dict().items() if k not in packed}
    for name, m in quantized.items():
        state[name + ".weight"] = m.dequantize()
    merged = {}
    for key, value in state.items():
        if ".lora_A" in key or ".lora_B" in key:
            continue
        if key in adapted:  # one (out, in) delta at a time: the peak stays one model copy above the model
            merged[key.replace(".base.", ".")] = (value + adapted[key].delta_weight().to(value.dtype)).detach()
        else:
            merged[key.replace(".base.", ".")] = value.detach().clone()
    for name, head in model.named_modules():  # a tied head: the (merged) embedding once more, as before LoRA
        if isinstance(head, TiedLMHead):
            embedding = next(n for n, m in model.named_modules() if m is head.embedding)
            merged[name + ".weight"] = merged[embedding + ".weight"]
    return merged


def lora_state_dict(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}


def base_fingerprint(weights: dict) -> str | None:
    """sha256 of the base weights an adapter changes ({name: tensor}), as float32 in name order; None when
    one of them is not a float matrix (a quantized base, QLoRA). Saved with the adapter and compared before it
    is applied (load_adapter, merge.py), so an adapter trained on one model is never folded into another of
    the same shapes: the DPO adapter of an SFT model into the base model, say. The same weights read in
    float32 from a float32 or bf16 checkpoint or a GGUF file hash alike; cast to bf16 first they do not."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        if w is None or not w.is_floating_point():
            return None
        digest.update(name.encode())
        digest.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_adapter(model: nn.Module, path) -> None:
    """The adapters, their config and the fingerprint of the base weights they adapt, atomically; nothing
    of the base model."""
    if not lora_layers(model):
        raise ValueError("the model has no LoRA adapters to save")
    payload = {"lora": lora_state_dict(model), "lora_config": model.lora_config,
               "base_fingerprint": model.lora_base_fingerprint}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Apply the adapters saved at `path` to a base model (adding the LoRA layers if it has none)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        state, config = payload["lora"], payload["lora_config"]
    except Exception as e:  # torch.load raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{path}: not a LoRA adapter file ({type(e).__name__}: {e})") from None
    if not lora_layers(model):
        apply_lora(model, **config)
    missing = set(lora_state_dict(model)) - set(state)
    unexpected = set(state) - set(lora_state_dict(model))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter does not fit this model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    expected = payload.get("base_fingerprint")  # absent from adapters saved before it was recorded
    if expected and model.lora_base_fingerprint not in (None, expected):
        raise ValueError(f"{path}: trained on another base model: the weights it adapts differ from this "
                         f"model's (same shapes, other values)")
    model.load_state_dict(state, strict=False)
    return model
