"""The mixture-of-experts feed-forward (model.py): dispatch paths, routing, the training losses, and the
model around it (KV cache, sampling, checkpoints, LoRA, GPTQ). Hugging Face parity is in test_model.py."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import quant
from common import load_model, save_checkpoint
from lora import apply_lora, merge_and_unload
from model import MLP, ModelConfig, Transformer
from moe import MoE, load_balancing_loss, moe_stats, plot_expert_shares, router_z_loss
from quant_linear import QuantLinear
from sample import generate


def moe_config(**overrides):
    return ModelConfig.from_preset("tiny", **{"n_experts": 4, "n_experts_per_token": 2, **overrides})


def moe_block(seed=0, **overrides) -> MoE:
    torch.manual_seed(seed)
    block = MoE(moe_config(**overrides), MLP)
    with torch.no_grad():  # a router with real preferences (the default init routes almost uniformly)
        block.gate.weight.normal_(0, 0.5)
    return block


def tiny_moe(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(moe_config(**overrides)).eval()


@pytest.mark.parametrize("n_experts,k,norm,shared", [(4, 1, True, 0), (5, 2, True, 0), (8, 3, False, 32)])
def test_sorted_dispatch_equals_the_loop_forward_and_backward(n_experts, k, norm, shared):
    block = moe_block(n_experts=n_experts, n_experts_per_token=k, norm_topk_prob=norm, shared_expert_dim=shared)
    x = torch.randn(37, 64, requires_grad=True)
    _, _, weights, experts = block.route(x)
    assert len(experts.unique()) > 1  # tokens really go to different experts
    outputs, grads = [], []
    for dispatch in (block.dispatch_loop, block.dispatch_sorted):
        x.grad = None
        block.zero_grad()
        y = dispatch(x, weights, experts)
        y.pow(2).sum().backward(retain_graph=True)
        outputs.append(y)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.experts.parameters()])
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-6
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("norm", [True, False])
def test_top_k_of_all_experts_is_the_dense_weighted_mixture(norm):
    """k = n_experts: every token goes to every expert; both paths equal sum_e softmax(W_g x)_e expert_e(x)
    computed densely (the k weights are the whole softmax, which already sums to 1)."""
    block = moe_block(n_experts=4, n_experts_per_token=4, norm_topk_prob=norm)
    x = torch.randn(23, 64)
    probs = F.softmax(x @ block.gate.weight.T, dim=-1)                       # (N, E)
    dense = sum(probs[:, e:e + 1] * expert(x) for e, expert in enumerate(block.experts))
    _, _, weights, experts = block.route(x)
    with torch.no_grad():
        for dispatch in (block.dispatch_loop, block.dispatch_sorted):
            assert (dispatch(x, weights, experts) - dense).abs().max().item() <= 1e-6
        assert (block(x[None])[0] - dense).abs().max().item() <= 1e-6


def test_top1_routing_picks_the_argmax_expert_with_weight_one():
    block = moe_block(n_experts=4, n_experts_per_token=1)
    x = torch.randn(10, 64)
    with torch.no_grad():
        out = block(x)
        best = (x @ block.gate.weight.T).argmax(-1)
        expected = torch.stack([block.experts[int(e)](x[i]) for i, e in enumerate(best)])
    assert (out - expected).abs().max().item() <= 1e-6


def test_load_balancing_loss_by_hand():
    """4 tokens, 2 experts, top-1: f = (3/4, 1/4), P = mean probs = (0.65, 0.35); aux = 2 (3/4 0.65 + 1/4 0.35) = 1.15."""
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    experts = torch.tensor([[0], [0], [0], [1]])
    assert math.isclose(load_balancing_loss(probs, experts, 2).item(), 1.15, rel_tol=1e-6)
    # top-2 of 3: every token counts for two experts, so f sums to 2
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    experts3 = torch.tensor([[0, 1], [1, 2]])                    # f = (1/2, 1, 1/2), P = (0.3, 0.45, 0.25)
    assert math.isclose(load_balancing_loss(probs3, experts3, 3).item(), 3 * (0.15 + 0.45 + 0.125), rel_tol=1e-6)
    # a uniform router over perfectly balanced routing gives k
    uniform = torch.full((4, 4), 0.25)
    assert math.isclose(load_balancing_loss(uniform, torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]]), 4).item(), 2.0)


def test_load_balancing_loss_matches_transformers_for_one_layer():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    logits = torch.randn(50, 6) * 2
    probs = logits.softmax(-1)
    experts = probs.topk(2, dim=-1).indices
    ours = load_balancing_loss(probs, experts, 6)
    assert math.isclose(ours.item(), load_balancing_loss_func((logits,), 6, 2).item(), rel_tol=1e-6)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])   # logsumexp = ln 2, ln 4
    assert math.isclose(router_z_loss(logits).item(), (math.log(2) ** 2 + math.log(4) ** 2) / 2, rel_tol=1e-6)


def test_training_loss_adds_the_router_losses_and_eval_does_not():
    model = tiny_moe(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    idx, targets = torch.randint(0, 512, (2, 24)), torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        logits, eval_loss = model(idx, targets)
        model.train()
        _, train_loss = model(idx, targets)
    ce = F.cross_entropy(logits.view(-1, 512), targets.view(-1))
    layers = [layer.mlp for layer in model.layers]
    aux = sum(m.aux_loss for m in layers) / 2
    z = sum(m.z_loss for m in layers) / 2
    assert math.isclose(eval_loss.item(), ce.item(), rel_tol=1e-6)
    assert math.isclose(train_loss.item(), (ce + 0.1 * aux + 0.01 * z).item(), rel_tol=1e-6)


def test_aux_loss_gradient_moves_tokens_off_the_busy_expert():
    """Tokens sharing a direction u that the router favours for expert 0: gradient steps on the aux loss
    alone (through P_i; f is piecewise constant) spread them over the experts."""
    block = moe_block(n_experts=4, n_experts_per_token=1)
    u = F.normalize(torch.randn(64), dim=0)
    x = torch.randn(256, 64) + 3 * u
    with torch.no_grad():
        block.gate.weight[0] += 2 * u
    optimizer = torch.optim.SGD(block.gate.parameters(), lr=1.0)
    busiest = []
    for _ in range(30):
        block(x)
        busiest.append(torch.bincount(block.route(x)[3].flatten(), minlength=4).max().item() / 256)
        optimizer.zero_grad()
        block.aux_loss.backward()
        optimizer.step()
    assert busiest[0] > 0.6 and busiest[-1] < 0.3, busiest


def top1_gate_grad(model, loss) -> float:
    """Gradient norm on the routers. With top-1 and Mixtral's renormalisation every routing weight is
    p / p = 1, so the language-model loss gives the router no gradient: only the router losses do."""
    model.zero_grad()
    loss.backward()
    return sum(layer.mlp.gate.weight.grad.norm().item() for layer in model.layers)


@pytest.mark.parametrize("coef", [0.0, 0.1])
def test_fine_tuning_losses_add_the_router_loss(coef):
    """sft.py and dpo.py take their losses from the logits, so they add the router losses themselves (dpo
    before the LoRA reference's forward re-routes the batch); rlhf.py and distill.py do as sft.py."""
    import dpo
    import sft
    model = tiny_moe(n_experts_per_token=1, router_aux_loss_coef=coef, router_z_loss_coef=coef).train()
    inputs, targets = torch.randint(0, 512, (4, 16)), torch.randint(0, 512, (4, 16))
    mask = torch.ones(4, 16)
    loss, _ = sft.masked_loss(model, inputs, targets, mask)
    ce = F.cross_entropy(model(inputs)[0].flatten(0, 1), targets.flatten())
    assert loss.item() == pytest.approx(ce.item() + model.router_loss().item(), rel=1e-6)
    assert (top1_gate_grad(model, loss) > 1e-3) == (coef > 0)

    apply_lora(model, r=2)
    for layer in model.layers:  # LoRA freezes the routers; a trainable one shows what reaches it
        layer.mlp.gate.weight.requires_grad_(True)
    batch = {"inputs": inputs, "targets": targets, "loss_mask": mask, "index": torch.arange(2)}
    loss, stats = dpo.batch_loss(model, batch, dpo.Reference("lora", model), "train", dpo.DPOConfig(loss="sigmoid"))
    assert (top1_gate_grad(model, loss) > 1e-3) == (coef > 0)
    dense = Transformer(ModelConfig.from_preset("tiny")).train()
    assert dense.router_loss() == 0.0


def test_moe_stats_shares_and_plot(tmp_path):
    model = tiny_moe()
    assert moe_stats(Transformer(ModelConfig.from_preset("tiny"))) == {}
    idx = torch.randint(0, 512, (3, 20))
    with torch.no_grad():
        model(idx)
        model(idx[:1])
    routed = [torch.zeros(4) for _ in model.layers]
    for layer_idx, layer in enumerate(model.layers):
        routed[layer_idx] = layer.mlp.routed.clone()
    stats = moe_stats(model)
    assert len(stats["moe_expert_share"]) == 2
    for layer_shares, counts in zip(stats["moe_expert_share"], routed):
        assert counts.sum().item() == 80 * 2                       # 4 rows x 20 tokens, 2 experts each
        assert layer_shares == pytest.approx((counts / 160).tolist(), abs=1e-4)
    shares = torch.tensor(stats["moe_expert_share"])
    cv = (shares.std(-1, unbiased=False) / shares.mean(-1)).mean().item()
    assert stats["moe_share_cv"] == pytest.approx(cv, abs=1e-3)
    assert moe_stats(model) == {}                                   # read once, then reset
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, **stats}) for s in (100, 200)) + "\n")
    plot_expert_shares(metrics, tmp_path / "experts.png")
    assert (tmp_path / "experts.png").stat().st_size > 1000


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_experts=0), "n_experts must be at least 1"),
    (dict(n_experts=-2), "n_experts must be at least 1"),
    (dict(n_experts=4, n_experts_per_token=5), r"n_experts_per_token .*n_experts \(4\).*got 5"),
    (dict(n_experts=4, n_experts_per_token=0), "n_experts_per_token"),
    (dict(n_experts=4, router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
])
def test_bad_moe_config_is_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("tiny", **kwargs)


@pytest.mark.parametrize("flags,message", [
    (["--n-experts-per-token", "2"], "the model is dense; give --n-experts"),
    (["--router-aux-loss-coef", "0.1"], r"--router-aux-loss-coef 0.1: the model is dense \(no router\)"),
    (["--n-experts", "4", "--n-experts-per-token", "5"], r"n_experts_per_token .*got 5"),
    (["--n-experts", "-1"], "n_experts must be at least 1"),
])
def test_train_flags_of_a_bad_mixture_are_refused(flags, message):
    """Refused as usage errors: exit_on_error prints the one line and exits 2, as argparse does."""
    from common import UsageError
    from training import TRAIN_PRESETS, TrainConfig, new_model, parse_config
    config = parse_config(TrainConfig, TRAIN_PRESETS, "", ["--preset", "cpu-shakespeare", *flags])
    with pytest.raises(UsageError, match=message):
        new_model(config, 512)


@pytest.mark.parametrize("method", ["awq", "awq-gptq", "smoothquant"])
def test_scale_folding_quantizers_and_gguf_export_refuse_experts(method):
    """AWQ and SmoothQuant fold scales into a dense MLP's projections, GGUF export writes dense models:
    each refuses a mixture of experts in one line (GPTQ, RTN, NF4 and W8A8 quantize every expert)."""
    from activation_quant import activation_quantize
    from gguf_io import GGUFError, model_metadata
    from quant_linear import QuantError
    spec = quant.QuantSpec(method=method, bits=8 if method == "smoothquant" else 4)
    with pytest.raises(QuantError, match=f"--method {method}: mixture-of-experts models are not supported"):
        activation_quantize(tiny_moe(), spec, torch.randint(0, 512, (2, 16)))
    with pytest.raises(GGUFError, match="mixture-of-experts model .4 experts. cannot be exported"):
        model_metadata(moe_config(), "m", "f32")


def test_flops_count_active_experts_only():
    """E experts top-k cost a dense model with k times the width's expert FLOPs plus the router."""
    dense = Transformer(ModelConfig.from_preset("tiny", hidden_dim=192))
    moe = Transformer(moe_config(n_experts=8, n_experts_per_token=1, hidden_dim=192))
    c = moe.config
    assert moe.flops_per_token(64) - dense.flops_per_token(64) == 6 * c.n_layers * c.n_experts * c.dim
    assert moe.num_params() - dense.num_params() == c.n_layers * (7 * 3 * c.dim * 192 + 8 * c.dim)
    assert moe.num_params(active=True) - dense.num_params() == c.n_layers * 8 * c.dim


def test_kv_cache_decode_and_sampling():
    model = tiny_moe(shared_expert_dim=32)
    idx = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2, max_seq_len=30)
        steps = [model(idx[:, :6], kv_cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], start_pos=t, kv_cache=cache)[0] for t in range(6, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    prompts = [idx[0, :5], idx[1, :9]]
    cached = generate(model, prompts, 12, temperature=0.0)
    uncached = generate(model, prompts, 12, temperature=0.0, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached)) and len(cached[0]) == 12


def test_checkpoint_round_trip(tmp_path):
    model = tiny_moe(n_experts=3, n_experts_per_token=1, norm_topk_prob=False, shared_expert_dim=16)
    save_checkpoint(tmp_path, model)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_lora_wraps_every_expert_and_merges_back():
    model = tiny_moe(shared_expert_dim=32)
    idx = torch.randint(0, 512, (2, 16))
    counts = apply_lora(model, targets=["gate_proj", "up_proj", "down_proj"], r=4, alpha=8)
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
    assert len(wrapped) == 2 * (4 + 1) * 3                            # 2 layers x (4 experts + shared) x 3
    assert all(type(layer.mlp.gate).__name__ == "Linear" for layer in model.layers)   # routers stay as they are
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        adapted = model(idx)[0]
        assert (merge_and_unload(model)(idx)[0] - adapted).abs().max().item() <= 1e-5
    assert counts


def test_gptq_quantizes_each_expert_with_its_routed_tokens():
    """Every expert linear becomes a QuantLinear and the routers stay in full precision; an expert's GPTQ
    Hessian is 2/n X_e X_e^T of exactly the tokens routed to it; an expert that no calibration token reaches
    is rounded to nearest (GPTQ would zero all its dead columns)."""
    model = tiny_moe(n_experts=4, n_experts_per_token=1)
    with torch.no_grad():  # layer 0: expert 3's logit is 0 and max(w0 x, -w0 x) > 0, so it is never chosen
        gate = model.layers[0].mlp.gate.weight
        gate[1], gate[3] = -gate[0], 0.0
    calib = torch.randint(0, 512, (4, 32))
    spec = quant.QuantSpec(method="gptq", bits=4, group_size=32)
    seen = {}
    original = quant.GPTQ.quantize

    def spy(self, weight, spec):
        seen[self.name] = (self.n_samples, self.H.clone())
        return original(self, weight, spec)

    quant.GPTQ.quantize = spy
    try:
        expert3 = model.layers[0].mlp.experts[3].down_proj.weight.clone()
        report = quant.quantize_model(model, spec, calib, log=None)
    finally:
        quant.GPTQ.quantize = original
    names = quant.target_names(model, False)
    assert len(names) == 2 * (4 + 4 * 3) and [r["layer"] for r in report] == names
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert all(isinstance(layer.mlp.gate, torch.nn.Linear) for layer in model.layers)
    assert "layers.0.mlp.experts.3.gate_proj" not in seen and "layers.1.mlp.experts.3.gate_proj" in seen
    # layer 0's MLP input, through the attention as quantized before the experts were
    block = model.layers[0]
    h = model.embed_tokens(calib)
    cos, sin = model.rope(torch.arange(32), h.dtype, 32)
    with torch.no_grad():
        x = block.post_attention_layernorm(h + block.self_attn(block.input_layernorm(h), cos, sin)).reshape(-1, 64)
        chosen = block.mlp.route(x)[3][:, 0]
    for e in range(3):
        X = x[chosen == e]
        n, H = seen[f"layers.0.mlp.experts.{e}.gate_proj"]
        assert n == len(X) > 0 and (H - 2 * X.T @ X / n).abs().max().item() <= 1e-4 * H.abs().max().item()
    w_hat = model.layers[0].mlp.experts[3].down_proj.dequantize()
    assert (w_hat - expert3).norm() < 0.2 * expert3.norm()         # rounded, not zeroed
