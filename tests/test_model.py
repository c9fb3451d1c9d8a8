"""model.py against the Hugging Face implementation (transformers as the oracle, random weights, no download)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hf_io import load_hf, save_hf
import model as model_module
from model import KVCache, Linear, ModelConfig, Transformer, attention_mask

transformers = pytest.importorskip("transformers")

BACKENDS = ["naive", "sdpa", "triton"]

# (name, HF config class, HF config kwargs): MHA/GQA/MQA, tied/untied, theta 1e4/5e5, q/k/v bias, RoPE scaling
HF_SHAPES = [
    ("mha-untied-1e4", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    ("gqa-tied-5e5", "LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                                         rope_theta=500000.0)),
    ("mqa-untied", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)),
    ("qwen2-bias-gqa", "Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    ("llama-attention-bias", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True)),
    ("head-dim-explicit", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    ("rope-linear", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    ("rope-yarn", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    ("rope-llama3", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # mixtures of experts: Mixtral (top-2 of 4, renormalised), Qwen2-MoE (top-2 of 4 unnormalised, a gated
    # shared expert, q/k/v biases) and Qwen2-MoE with norm_topk_prob
    ("mixtral-top2", "MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, tie_word_embeddings=False)),
    ("qwen2-moe-shared", "Qwen2MoeConfig", dict(num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                                num_experts_per_tok=2, moe_intermediate_size=48,
                                                shared_expert_intermediate_size=80, norm_topk_prob=False)),
    ("qwen2-moe-normtopk", "Qwen2MoeConfig", dict(num_attention_heads=4, num_key_value_heads=4, num_experts=6,
                                                  num_experts_per_tok=3, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=64, norm_topk_prob=True)),
]


def make_hf_model(config_class: str, **kwargs):
    """A random-initialised HF causal LM; rope_theta/rope_scaling given the classic way (HF standardises them)."""
    torch.manual_seed(0)
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                max_position_embeddings=128, rms_norm_eps=1e-6, attn_implementation="eager")
    rope_theta = kwargs.pop("rope_theta", 10000.0)
    rope = dict(kwargs.pop("rope_scaling", None) or {"rope_type": "default"})
    base.update(kwargs, rope_parameters={"rope_theta": rope_theta, **rope})
    config = getattr(transformers, config_class)(**base)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF zero-initialises biases and norms: make them random so they are really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("name,config_class,kwargs", HF_SHAPES, ids=[s[0] for s in HF_SHAPES])
def test_logits_match_hf(tmp_path, name, config_class, kwargs, backend):
    hf_model = make_hf_model(config_class, **dict(kwargs))
    hf_model.save_pretrained(tmp_path)
    model = load_hf(tmp_path, attn_backend=backend).eval()
    idx = torch.randint(0, 211, (2, 100))  # 100 > original_max_position_embeddings: the scaled part is used
    with torch.no_grad():
        logits, _ = model(idx)
    assert (logits - hf_logits(hf_model, idx)).abs().max().item() <= 1e-4


def test_classic_config_layout_and_sharded_weights(tmp_path):
    """Published checkpoints: top-level rope_theta / rope_scaling (no rope_parameters), sharded safetensors."""
    hf_model = make_hf_model("LlamaConfig", num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                             rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf_model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_hf(tmp_path).eval()
    assert model.config.rope_theta == 500000.0 and model.config.rope_scaling["factor"] == 2.0
    idx = torch.randint(0, 211, (1, 90))
    with torch.no_grad():
        assert (model(idx)[0] - hf_logits(hf_model, idx)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,config_class,kwargs", [HF_SHAPES[1], HF_SHAPES[3], HF_SHAPES[5], HF_SHAPES[7],
                                                      HF_SHAPES[9], HF_SHAPES[10]],
                         ids=["gqa-tied", "qwen2", "head-dim", "yarn", "mixtral", "qwen2-moe"])
def test_save_hf_loads_in_transformers(tmp_path, name, config_class, kwargs):
    hf_model = make_hf_model(config_class, **dict(kwargs))
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf").eval()
    save_hf(model, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(hf_model).__name__
    idx = torch.randint(0, 211, (2, 70))
    with torch.no_grad():
        ours = model(idx)[0]
    assert (hf_logits(reloaded, idx) - ours).abs().max().item() <= 1e-4
    assert not list(tmp_path.joinpath("ours").glob("*.tmp"))


def test_load_hf_reports_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf_model("LlamaConfig", num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight|layers.1.mlp.up_proj.weight") as err:
        load_hf(tmp_path)
    assert "layers.0.extra.weight" in str(err.value)


@pytest.mark.parametrize("change,message", [
    (dict(sliding_window=16, model_type="mistral"), "sliding_window"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "longrope"),
])
def test_load_hf_refuses_what_it_cannot_represent(tmp_path, change, message):
    make_hf_model("LlamaConfig", num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path)


# ---------------------------------------------------------------------------------------------------------

def tiny(**overrides):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()


def backend_available(backend):
    if backend == "triton":
        pytest.importorskip("kernels.flash_attention", reason="kernels/flash_attention.py not built yet")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_decode_equals_full_forward(backend):
    """Prefill 24 tokens, then decode 48 one at a time: the same logits as one forward over all 72. The
    decode steps see 25 to 72 keys: one, two and three of the interpreted kernel's 32-key tiles and splits."""
    backend_available(backend)
    # the cache's bookkeeping per layer is the same for every backend (two layers on naive and sdpa); the
    # Triton kernels, each step ~0.2 s in the interpreter, run on one layer
    model = tiny(attn_backend=backend, n_layers=1 if backend == "triton" else 2)
    idx = torch.randint(0, 512, (2, 72))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(batch_size=2, max_seq_len=72)
        steps = [model(idx[:, :24], start_pos=0, kv_cache=cache)[0]]
        for t in range(24, 72):
            steps.append(model(idx[:, t:t + 1], start_pos=t, kv_cache=cache)[0])
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_matches_each_prompt_alone(backend):
    """Prompts of lengths 5, 11 and 8 left-padded into one batch: every real position's logits, during
    prefill and 6 decode steps, equal those of the prompt run by itself."""
    backend_available(backend)
    model = tiny(attn_backend=backend)
    lengths, pad_id, n_new = [5, 11, 8], 0, 6
    prompts = [torch.randint(1, 512, (n,)) for n in lengths]
    continuation = torch.randint(1, 512, (3, n_new))
    T = max(lengths)
    batch = torch.stack([F.pad(p, (T - len(p), 0), value=pad_id) for p in prompts])
    with torch.no_grad():
        cache = model.new_kv_cache(3, max_seq_len=T + n_new, pad_lens=[T - n for n in lengths])
        prefill = model(batch, kv_cache=cache)[0]
        decoded = [model(continuation[:, i:i + 1], start_pos=T + i, kv_cache=cache)[0] for i in range(n_new)]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[row]])[None])[0][0]
            n = len(prompt)
            assert (prefill[row, T - n:] - alone[:n]).abs().max().item() <= 1e-5
            assert (torch.cat(decoded, dim=1)[row] - alone[n:]).abs().max().item() <= 1e-5


def test_attention_mask_rules():
    """Hand-written: 3 queries at the end of 5 keys; row 1 has 2 padding keys."""
    mask = attention_mask(3, 5, torch.tensor([0, 2]), "cpu")
    expected_row0 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected_row1 = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected_row0) and torch.equal(mask[1, 0], expected_row1)
    padded_query = attention_mask(3, 3, torch.tensor([2]), "cpu")[0, 0]
    assert padded_query[0].tolist() == [True, False, False]  # a padding query sees only itself


def test_backends_agree_and_gradients_flow_to_every_parameter():
    idx, targets = torch.randint(0, 512, (2, 40)), torch.randint(0, 512, (2, 40))
    results = {}
    for backend in ["naive", "sdpa"]:
        model = tiny(attn_backend=backend).train()
        _, loss = model(idx, targets)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
            [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
        results[backend] = (loss.item(), grads)
    assert math.isclose(results["naive"][0], results["sdpa"][0], rel_tol=1e-5)
    for name, g in results["naive"][1].items():
        assert torch.allclose(g, results["sdpa"][1][name], atol=1e-5), name


def test_loss_mask_and_ignore_index():
    model = tiny()
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    loss_mask = torch.zeros(2, 16, dtype=torch.long)
    loss_mask[0, 3:9] = 1
    loss_mask[1, 10:] = 1
    targets[1, 12] = -100
    with torch.no_grad():
        logits, loss = model(idx, targets, loss_mask=loss_mask)
    keep = (loss_mask == 1) & (targets != -100)
    log_probs = logits.log_softmax(-1)
    expected = -log_probs[keep].gather(-1, targets[keep][:, None]).mean()
    assert keep.sum() == 11
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 512 * 64


@pytest.mark.parametrize("bias", [True, False])
def test_linear_few_rows_equal_f_linear(bias):
    """Linear's few-row path (W x^T) against F.linear: outputs and gradients, for 1 to FEW_ROWS + 2 rows
    (the last two past the threshold), 2-d and 3-d inputs, and a weight stored transposed in memory."""
    layer = Linear(24, 40, bias=bias)
    for rows in range(1, model_module.FEW_ROWS + 3):
        for shape in ((rows, 24), (1, rows, 24)):
            x = torch.randn(shape, requires_grad=True)
            y = layer(x)
            ref = F.linear(x, layer.weight, layer.bias)
            assert y.shape == ref.shape and (y - ref).abs().max().item() <= 1e-5
            assert y.is_contiguous()  # a transposed view would make the next layer's input column-major (slow)
            grads = torch.autograd.grad(y.square().sum(), (x, layer.weight))
            ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.weight))
            assert all((g - r).abs().max().item() <= 1e-4 for g, r in zip(grads, ref_grads))
    layer.weight.data = layer.weight.data.t().contiguous().t()
    x = torch.randn(1, 24)
    assert (layer(x) - F.linear(x, layer.weight, layer.bias)).abs().max().item() <= 1e-5


def test_flops_per_token_hand_count():
    c = ModelConfig.from_preset("small")
    model = Transformer(c)
    per_layer = 2 * c.dim * c.n_heads * c.head_dim + 2 * c.dim * c.n_kv_heads * c.head_dim + 3 * c.dim * c.hidden_dim
    matmul_params = c.n_layers * (per_layer + 2 * c.dim) + c.dim + c.vocab_size * c.dim  # + norms, + LM head
    assert model.flops_per_token(256) == 6 * matmul_params + 12 * c.n_layers * c.n_heads * c.head_dim * 256


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=100, n_heads=3), r"dim \(100\).*n_heads \(3\)"),
    (dict(n_heads=4, n_kv_heads=3), r"n_heads \(4\).*n_kv_heads \(3\)"),
    (dict(attn_backend="flash"), "attn_backend"),
    (dict(rope_scaling={"rope_type": "ntk", "factor": 2}), "rope_type"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("tiny", **kwargs)


def test_forward_validation():
    model = tiny()
    with pytest.raises(ValueError, match=r"257.*max_seq_len 256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 512 .*\[0, 512\)"):
        model(torch.tensor([[1, 2, 512]]))
    cache = model.new_kv_cache(1, max_seq_len=10)
    with pytest.raises(ValueError, match="KV cache length 10"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=8, kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        KVCache(model.config, 1, max_seq_len=1000)


# ----------------------------------------------------------------------------------------------------------
# A reduced output layer (head_tokens): n tokens and an "other" class spread over the rest of the vocabulary

def test_reduced_output_layer_is_the_small_softmax_with_other_spread_evenly():
    torch.manual_seed(0)
    V, n = 40, 6
    model = Transformer(ModelConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32,
                                    max_seq_len=16, head_tokens=n)).eval()
    model.head_ids.copy_(torch.tensor([3, 7, 8, 20, 31, 39]))
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)  # logits far from uniform
    idx = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        logits, _ = model(idx)                                                        # (2, 5, V)
    assert logits.shape == (2, 5, V)
    # the independent expectation: rerun the blocks by hand and take the small softmax
    with torch.no_grad():
        x = model.embed_tokens(idx)
        cos, sin = model.rope(torch.arange(5), x.dtype, 5)
        for layer in model.layers:
            x = layer(x, cos, sin)
        p_small = torch.softmax(model.lm_head(model.norm(x)), dim=-1)                 # (2, 5, n + 1)
    p = torch.softmax(logits, dim=-1)
    rest = torch.ones(V, dtype=torch.bool)
    rest[model.head_ids] = False
    torch.testing.assert_close(p[..., model.head_ids], p_small[..., :n])
    torch.testing.assert_close(p[..., rest], p_small[..., n:].expand(2, 5, V - n) / (V - n))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 5))


def test_reduced_output_layer_trains_and_round_trips_a_checkpoint(tmp_path):
    from common import load_model, save_checkpoint
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32, max_seq_len=16,
                         head_tokens=4)
    model = Transformer(config)
    model.head_ids.copy_(torch.tensor([1, 2, 5, 9]))
    idx = torch.randint(0, 30, (2, 6))
    _, loss = model(idx, targets=idx)  # targets outside head_ids have a finite loss: "other"'s share
    loss.backward()
    assert math.isfinite(loss.item()) and model.lm_head.weight.grad.abs().sum() > 0
    save_checkpoint(tmp_path, model)
    loaded = load_model(tmp_path)
    assert loaded.config.head_tokens == 4 and loaded.head_ids.tolist() == [1, 2, 5, 9]
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0])
    with pytest.raises(ValueError, match="untied"):
        ModelConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32, head_tokens=4,
                    tie_embeddings=True)
    with pytest.raises(ValueError, match="head_tokens"):
        ModelConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32, head_tokens=30)
