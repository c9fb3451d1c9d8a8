"""lora.py: LoRA starts at the base model, merges exactly, saves only the adapters, and trains."""
import copy

import pytest
import torch

from lora import (LoRALinear, TiedLMHead, apply_lora, disable_adapters, load_adapter, merge_and_unload,
                  merge_lora, save_adapter, unmerge_lora)
from model import ModelConfig, Transformer


def tiny_model(seed=0, tie_embeddings=False):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32,
                         tie_embeddings=tie_embeddings)
    return Transformer(config).eval()


def randomize_adapters(model, seed=1):
    """Give the factor that starts at zero random values (B of a linear, A of an embedding)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name and "embed" not in name or "lora_A" in name and "embed" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


IDX = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))


def test_zero_init_equals_base_and_counts():
    model = tiny_model()
    expected = model(IDX)[0]
    counts = apply_lora(model, targets=["q_proj", "v_proj"], r=4, alpha=8)
    assert torch.equal(model(IDX)[0], expected)  # B = 0: exactly the base model
    # per layer: q (32 -> 32) and v (32 -> 16 for 2 kv heads of 8): A is (r, in), B is (out, r)
    assert counts["trainable"] == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert counts["layers"] == 4
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_forward_is_w_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=6)
    layer.lora_B.data = torch.randn(5, 2)
    x = torch.randn(3, 6)
    expected = x @ base.weight.T + base.bias + (6 / 2) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    assert LoRALinear(base, r=4, alpha=8, rslora=True).scaling == 8 / 2  # alpha / sqrt(r)


def test_merge_unmerge_and_disable():
    model = tiny_model()
    base_logits = model(IDX)[0]
    apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    adapted = model(IDX)[0]
    assert (adapted - base_logits).abs().max() > 1e-3
    merge_lora(model)
    torch.testing.assert_close(model(IDX)[0], adapted, atol=1e-5, rtol=0)
    with disable_adapters(model):  # also takes merged adapters out
        torch.testing.assert_close(model(IDX)[0], base_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(IDX)[0], adapted, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(model(IDX)[0], adapted, atol=1e-5, rtol=0)
    plain = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(plain(IDX)[0], adapted, atol=1e-5, rtol=0)


def test_adapter_round_trip(tmp_path):
    model = tiny_model()
    apply_lora(model, targets=["wq", "wo", "w1", "w2", "w3"], r=2, alpha=4)  # Meta's Llama names
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter.pt")
    restored = load_adapter(tiny_model(), tmp_path / "adapter.pt")
    torch.testing.assert_close(restored(IDX)[0], model(IDX)[0], atol=0, rtol=0)
    size = (tmp_path / "adapter.pt").stat().st_size
    assert size < 0.5 * sum(p.numel() * 4 for p in tiny_model().parameters())
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        load_adapter(tiny_model(), tmp_path / "junk.pt")


def test_an_adapter_refuses_another_base_of_the_same_shapes(tmp_path):
    model = tiny_model()
    apply_lora(model, r=2, alpha=4, embedding_rank=2)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter.pt")
    other = tiny_model()
    with torch.no_grad():
        other.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one weight of one adapted layer
    with pytest.raises(ValueError, match="adapter.pt: trained on another base model"):
        load_adapter(other, tmp_path / "adapter.pt")
    other = tiny_model()
    with torch.no_grad():
        other.embed_tokens.weight[3, 1] += 1e-3  # the adapted embedding counts too
    with pytest.raises(ValueError, match="trained on another base model"):
        load_adapter(other, tmp_path / "adapter.pt")
    # an adapter saved before the fingerprint was recorded still loads
    payload = torch.load(tmp_path / "adapter.pt", weights_only=False)
    del payload["base_fingerprint"]
    torch.save(payload, tmp_path / "old.pt")
    load_adapter(tiny_model(), tmp_path / "old.pt")


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(tiny_model(), targets=["q_projj"])
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        apply_lora(tiny_model(), targets=["q_proj", "nope"])


def test_only_adapters_change_when_training():
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(IDX[:, :-1], IDX[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, frozen[key.replace(".base.", ".")]), key


def test_merged_state_dict_equals_merge_and_unload():
    model = tiny_model()
    apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    merged = merge_and_unload(copy.deepcopy(model)).state_dict()
    from lora import merged_state_dict
    computed = merged_state_dict(model)
    assert set(computed) == set(merged)
    for key in merged:
        torch.testing.assert_close(computed[key], merged[key], atol=1e-6, rtol=0)


def with_embedding(model, embedding):
    """A plain copy of `model` whose token embedding (and the head tied to it) is `embedding`."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain.embed_tokens.weight.copy_(embedding)
    return plain


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_adapter_is_e_plus_scaled_a_b(tied):
    base = tiny_model(tie_embeddings=tied)
    model = copy.deepcopy(base)
    counts = apply_lora(model, targets=["q_proj"], r=2, alpha=8, embedding_rank=3)
    assert torch.equal(model(IDX)[0], base(IDX)[0])  # A = 0: exactly the base model
    assert counts["trainable"] == 2 * (2 * 32 + 32 * 2) + 3 * (97 + 32)  # q adapters + A (97, 3) and B (3, 32)
    randomize_adapters(model)
    embed = model.embed_tokens
    adapted_e = base.embed_tokens.weight + (8 / 3) * embed.lora_A @ embed.lora_B
    # an independent expectation: the plain model with E + (alpha/r) A B as its embedding; a tied head
    # reads it too, an untied one keeps its own weight
    expected = with_embedding(base, adapted_e)
    for layer in model.layers:  # compare the embedding adapter alone
        layer.self_attn.q_proj.enabled = False
    torch.testing.assert_close(model(IDX)[0], expected(IDX)[0], atol=1e-5, rtol=0)
    if tied:
        assert isinstance(model.lm_head, TiedLMHead) and "lm_head.weight" not in model.state_dict()
    else:
        assert isinstance(model.lm_head, torch.nn.Linear)


def test_embedding_adapter_merges_saves_and_stays_tied(tmp_path):
    from lora import merged_state_dict
    base = tiny_model(tie_embeddings=True)
    base_logits = base(IDX)[0]
    model = copy.deepcopy(base)
    apply_lora(model, r=4, alpha=8, embedding_rank=1)
    randomize_adapters(model)
    adapted = model(IDX)[0]
    assert (adapted - base_logits).abs().max() > 1e-3
    merge_lora(model)
    torch.testing.assert_close(model(IDX)[0], adapted, atol=1e-5, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(model(IDX)[0], base_logits, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(model(IDX)[0], adapted, atol=1e-5, rtol=0)

    plain = merge_and_unload(copy.deepcopy(model))
    assert plain.lm_head.weight is plain.embed_tokens.weight  # still one matrix
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(plain(IDX)[0], adapted, atol=1e-5, rtol=0)
    computed = merged_state_dict(model)
    assert set(computed) == set(base.state_dict())
    fresh = tiny_model(tie_embeddings=True)
    fresh.load_state_dict(computed)
    torch.testing.assert_close(fresh(IDX)[0], adapted, atol=1e-5, rtol=0)

    save_adapter(model, tmp_path / "adapter.pt")
    restored = load_adapter(tiny_model(tie_embeddings=True), tmp_path / "adapter.pt")
    torch.testing.assert_close(restored(IDX)[0], adapted, atol=0, rtol=0)
