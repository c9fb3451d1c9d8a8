"""lora.py: LoRA starts at the base model, merges exactly, saves only the adapters, and trains."""
import copy

import pytest
import torch

from lora import (LoRALinear, apply_lora, disable_adapters, load_adapter, merge_and_unload, merge_lora,
                  save_adapter, unmerge_lora)
from model import ModelConfig, Transformer


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    return Transformer(config).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
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
