"""hf_io.py: Hugging Face checkpoints in and out of model.py's Transformer: Llama, Mistral, Qwen2, SmolLM,
Mixtral and Qwen2-MoE directories (config.json + safetensors, one file or sharded).

model.py's module names mirror Hugging Face's, so a state-dict key is Hugging Face's minus "model." and the
weights load without any permutation (RoPE in the "rotate_half" layout). What needs mapping is the config
(config_from_hf, config_to_hf: classic rope_scaling and transformers 5's rope_parameters) and Mixtral's
expert names (MIXTRAL_NAMES). transformers itself is not needed: tests/test_model.py checks the logits
against it.

    from hf_io import load_hf, save_hf
    model = load_hf("path/to/SmolLM2-135M")   # a Transformer
    save_hf(model, "out/hf")                  # transformers.AutoModelForCausalLM.from_pretrained reads it
"""
import json
import os
from pathlib import Path

import torch

from model import ROPE_TYPES, ModelConfig, Transformer

HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                    "qwen2_moe": "Qwen2MoeForCausalLM"}
# Mixtral's tensor names -> ours (Qwen2-MoE's): experts.{e}.w1 / w3 / w2 are gate / up / down
MIXTRAL_NAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."))


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Map a Hugging Face config dict (classic top-level rope_theta/rope_scaling or transformers 5's
    rope_parameters) to ModelConfig; raise on anything the model would silently compute differently."""
    def need(key):
        if key not in hf:
            raise ValueError(f"{source}: missing field {key!r}")
        return hf[key]

    model_type = need("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(HF_MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    sliding = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen2_moe") and not hf.get("use_sliding_window", False):
        sliding = None
    if sliding is not None and sliding < need("max_position_embeddings"):
        raise ValueError(f"{source}: sliding_window={sliding} is in use (< max_position_embeddings="
                         f"{hf['max_position_embeddings']}); nanollm attends to the full context and would differ")

    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not rope:
        rope = dict(hf.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    rope.pop("partial_rotary_factor", None)
    if rope_type == "default":
        rope_scaling = None
    elif rope_type in ROPE_TYPES:
        rope_scaling = {"rope_type": rope_type, **rope}
    else:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: default, {', '.join(ROPE_TYPES)})")

    n_heads = need("num_attention_heads")
    qkv_bias = {"qwen2": True, "qwen2_moe": hf.get("qkv_bias", True)}.get(model_type, hf.get("attention_bias", False))
    out_bias = model_type in ("llama", "mistral") and bool(hf.get("attention_bias", False))
    moe = {}
    if model_type == "mixtral":
        moe = dict(n_experts=need("num_local_experts"), n_experts_per_token=need("num_experts_per_tok"),
                   norm_topk_prob=True, hidden_dim=need("intermediate_size"))
    elif model_type == "qwen2_moe":
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise ValueError(f"{source}: decoder_sparse_step={hf.get('decoder_sparse_step')} / mlp_only_layers="
                             f"{hf.get('mlp_only_layers')}: dense layers between the sparse ones are not supported")
        moe = dict(n_experts=need("num_experts"), n_experts_per_token=need("num_experts_per_tok"),
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)), hidden_dim=need("moe_intermediate_size"),
                   shared_expert_dim=need("shared_expert_intermediate_size"))
    if moe and "router_aux_loss_coef" in hf:
        moe["router_aux_loss_coef"] = float(hf["router_aux_loss_coef"])
    return ModelConfig(**{
        "hidden_dim": need("intermediate_size") if not moe else None, **moe,
        "vocab_size": need("vocab_size"), "dim": need("hidden_size"), "n_layers": need("num_hidden_layers"),
        "n_heads": n_heads, "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "max_seq_len": need("max_position_embeddings"),
        "head_dim": hf.get("head_dim") or None, "rope_theta": float(rope_theta), "rope_scaling": rope_scaling,
        "norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": bool(qkv_bias), "attention_out_bias": out_bias,
        "dropout": float(hf.get("attention_dropout", 0.0) or 0.0),
    })


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict:
    """ModelConfig -> HF config dict: Qwen2 when only q/k/v have biases, Llama otherwise; with experts,
    Qwen2-MoE when there is a shared expert (or q/k/v biases, or weights not renormalised), Mixtral otherwise."""
    if config.attention_out_bias and not config.attention_bias:
        raise ValueError("an output-projection bias without q/k/v biases has no Hugging Face equivalent")
    if config.head_tokens:
        raise ValueError(f"an output layer over {config.head_tokens} tokens (head_tokens) has no Hugging Face "
                         f"equivalent: lm_head has a row per token")
    model_type = "qwen2" if config.attention_bias and not config.attention_out_bias else "llama"
    if config.n_experts:
        model_type = "mixtral"
        if config.shared_expert_dim or config.attention_bias or not config.norm_topk_prob:
            model_type = "qwen2_moe"
            if not config.shared_expert_dim or config.attention_out_bias:
                raise ValueError("an MoE model with q/k/v biases or norm_topk_prob=False is saved as Qwen2-MoE, which "
                                 "needs a shared expert (shared_expert_dim > 0) and no output-projection bias")
    hf = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": config.dropout,
        # the classic layout that published checkpoints use, and transformers 5's rope_parameters
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "rope_parameters": {"rope_theta": config.rope_theta, **(config.rope_scaling or {"rope_type": "default"})},
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "llama":
        hf.update(attention_bias=config.attention_bias, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    if config.n_experts:
        hf.update(num_experts_per_tok=config.n_experts_per_token, router_aux_loss_coef=config.router_aux_loss_coef)
    if model_type == "mixtral":
        hf.update(num_local_experts=config.n_experts, router_jitter_noise=0.0)
    elif model_type == "qwen2_moe":
        hf.update(num_experts=config.n_experts, moe_intermediate_size=config.hidden_dim, qkv_bias=config.attention_bias,
                  shared_expert_intermediate_size=config.shared_expert_dim, norm_topk_prob=config.norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=[])
    return hf


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    if index.exists():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        shard_names = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                f"(only safetensors checkpoints are read)")
    tensors = {}
    for name in shard_names:
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name}: shard listed in {index.name} is missing")
        tensors.update(load_file(path / name))
    return tensors


def load_hf(path, dtype: torch.dtype | None = None, device="cpu", attn_backend: str = "sdpa") -> Transformer:
    """Load a Llama-family Hugging Face checkpoint directory (config.json + safetensors, single or sharded).

    dtype None keeps the checkpoint's dtype. Missing or unexpected tensors raise, listing their names.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face checkpoint directory")
    hf_config = json.loads(config_file.read_text())
    config = config_from_hf(hf_config, str(config_file))
    config.attn_backend = attn_backend

    state = {}
    for key, tensor in _read_safetensors(path).items():
        if key.endswith("rotary_emb.inv_freq"):  # old checkpoints store the RoPE buffer; we recompute it
            continue
        if key == "lm_head.weight" and config.tie_embeddings:  # tied: the embedding is the head
            continue
        if hf_config["model_type"] == "mixtral":
            for theirs, ours in MIXTRAL_NAMES:
                key = key.replace(theirs, ours)
        state[key.removeprefix("model.")] = tensor
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = Transformer(config)
    shapes = {key: t.shape for key, t in model.state_dict().items()}
    expected = set(shapes)
    if config.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config. missing tensors: {missing or 'none'}; "
                         f"unexpected tensors: {unexpected or 'none'}")
    for key, tensor in state.items():
        if tensor.shape != shapes[key]:
            raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the config implies {tuple(shapes[key])}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype)


def save_hf(model: Transformer, path) -> None:
    """Write config.json + model.safetensors that transformers.AutoModelForCausalLM.from_pretrained loads.

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a
    half-written checkpoint behind.
    """
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = model.embed_tokens.weight.dtype
    hf_config = config_to_hf(model.config, dtype)
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue
        if hf_config["model_type"] == "mixtral":
            for theirs, ours in MIXTRAL_NAMES:
                key = key.replace(ours, theirs)
        state[key if key == "lm_head.weight" else "model." + key] = tensor.detach().contiguous().cpu()
    files = {"model.safetensors": lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
             "config.json": lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2))}
    for name, write in files.items():
        tmp = path / f".{name}.tmp"
        write(str(tmp))
        os.replace(tmp, path / name)
