"""quant.py: packing, RTN's error bound, GPTQ against RTN, act-order's column order, the quantized checkpoint,
the Triton int4 kernel (under TRITON_INTERPRET=1 without a GPU) and QLoRA.

    python -m pytest -q tests/test_quant.py
"""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernel

import quant  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from quant import (GPTQ, QuantError, QuantLinear, QuantSpec, load_quantized, pack, quantize_model,  # noqa: E402
                   rtn_quantize, save_quantized, unpack)


def tiny_model(seed=0, vocab_size=97):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                         max_seq_len=32, tie_embeddings=True)
    return Transformer(config).eval()


def correlated_inputs(n_tokens, dim, seed=0):
    """(n_tokens, dim) inputs with strongly correlated features, as a transformer's hidden states have:
    a few shared latent directions plus a little independent noise."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_tokens, 8, generator=g)
    mixing = torch.randn(8, dim, generator=g)
    return latent @ mixing + 0.1 * torch.randn(n_tokens, dim, generator=g)


def output_error(W, W_hat, X):
    return ((X @ (W - W_hat).T) ** 2).sum().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (5, 48), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_int4_layout_two_per_byte_even_column_low():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]
    # 3 bits: 8 codes in one 24-bit little-endian word: code i at bits 3i..3i+2
    codes3 = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.uint8)
    assert pack(codes3, 3).tolist() == [[0x07, 0x00, 0x20]]  # 1 << 21 = bit 5 of the third byte


@pytest.mark.parametrize("bits,group_size,sym", [(8, 0, False), (4, 0, False), (4, 16, False), (4, 16, True),
                                                 (3, 32, False), (2, 16, True)])
def test_rtn_within_half_a_step(bits, group_size, sym):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g)
    q = rtn_quantize(w, QuantSpec("rtn", bits, group_size, sym))
    step = q.scales[:, q.g_idx]                                   # (24, 64) the grid step of each weight
    assert (q.codes >= 0).all() and (q.codes <= 2 ** bits - 1).all()
    err = (w - q.dequantize()).abs()
    assert (err <= 0.5 * step * 1.01 + 1e-7).all()                # fp16 rounding of the scale: 1% slack
    assert torch.equal(q.scales, q.scales.half().float())         # stored exactly in fp16
    # nearest: moving any code by one step, staying on the grid, never lands closer
    for delta in (-1, 1):
        moved = q.scales[:, q.g_idx] * (q.codes + delta - q.zeros[:, q.g_idx])
        on_grid = (q.codes + delta >= 0) & (q.codes + delta <= 2 ** bits - 1)
        assert ((w - moved).abs() >= err - 1e-6)[on_grid].all()


def test_gptq_equals_rtn_when_hessian_is_identity():
    """H = I: no correlation between inputs to exploit, U^-1 is diagonal and no error is propagated."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for spec in (QuantSpec("gptq", 4, 0), QuantSpec("gptq", 3, 16), QuantSpec("gptq", 4, 32, sym=True)):
        gptq = GPTQ(64)
        gptq.H = torch.eye(64)
        q, _ = gptq.quantize(w, spec)
        r = rtn_quantize(w, spec)
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)


@pytest.mark.parametrize("bits,group_size", [(4, 0), (4, 32), (3, 32)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 128, generator=g)
    X = correlated_inputs(2048, 128)
    gptq = GPTQ(128)
    gptq.add_batch(X[:1000])
    gptq.add_batch(X[1000:])                                      # the running mean of two batches
    torch.testing.assert_close(gptq.H, 2 * X.T @ X / len(X), rtol=1e-4, atol=1e-3)
    spec = QuantSpec("gptq", bits, group_size)
    q, _ = gptq.quantize(W, spec)
    r = rtn_quantize(W, spec)
    assert output_error(W, q.dequantize(), X) < 0.5 * output_error(W, r.dequantize(), X)
    q_act, _ = gptq.quantize(W, QuantSpec("gptq", bits, group_size, act_order=True, static_groups=True))
    assert output_error(W, q_act.dequantize(), X) < 0.5 * output_error(W, r.dequantize(), X)


def test_act_order_undoes_the_permutation():
    """Quantize (W, H) and the same layer with its input columns permuted by p: act-order visits the
    columns in the same order both times, so the stored codes (original column order) are permutations
    of each other by exactly p, and each one sits on its own layer's columns."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 64, generator=g)
    X = correlated_inputs(1024, 64, seed=3) * torch.linspace(0.5, 3.0, 64)  # distinct Hessian diagonal
    p = torch.randperm(64, generator=g)
    a, b = GPTQ(64), GPTQ(64)
    a.add_batch(X)
    b.H = a.H[p][:, p].clone()
    spec = QuantSpec("gptq", 4, 16, act_order=True)
    qa, _ = a.quantize(W, spec)
    qb, _ = b.quantize(W[:, p], spec)
    assert not qa.ordered_groups                                  # groups follow the visiting order
    assert torch.equal(qb.codes, qa.codes[:, p])
    assert torch.equal(qb.g_idx, qa.g_idx[p])
    assert torch.equal(qb.dequantize(), qa.dequantize()[:, p])
    assert sorted(torch.bincount(qa.g_idx).tolist()) == [16] * 4  # 4 groups of 16 columns
    assert (qa.dequantize() - W).abs().mean() < 0.5 * (qa.dequantize()[:, p] - W).abs().mean()
    # through QuantLinear: packed storage with g_idx gives back the same weight
    layer = QuantLinear.from_quantized(qa)
    assert layer.g_idx is not None
    assert torch.equal(layer.dequantize(), qa.dequantize())


def test_static_groups_store_no_group_index():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    gptq = GPTQ(64)
    gptq.add_batch(correlated_inputs(512, 64) * torch.linspace(0.5, 3.0, 64))
    q, _ = gptq.quantize(W, QuantSpec("gptq", 4, 16, act_order=True, static_groups=True))
    assert torch.equal(q.g_idx, torch.arange(64) // 16)
    layer = QuantLinear.from_quantized(q)
    assert layer.g_idx is None and torch.equal(layer.dequantize(), q.dequantize())


def test_dead_inputs_and_bad_hessians():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    X = correlated_inputs(256, 32)
    X[:, 3] = 0                                                   # an input that is always zero
    gptq = GPTQ(32, "layers.0.mlp.up_proj")
    gptq.add_batch(X)
    q, _ = gptq.quantize(W, QuantSpec("gptq", 4, 0))
    assert (q.dequantize()[:, 3] == 0).all()                      # its weights do not matter: set to 0
    bad = GPTQ(32, "layers.0.mlp.up_proj")
    bad.H = -torch.eye(32)
    with pytest.raises(QuantError, match="layers.0.mlp.up_proj.*not positive definite"):
        bad.quantize(W, QuantSpec("gptq", 4, 0))


def test_bad_specs_are_named():
    with pytest.raises(QuantError, match="bits must be one of"):
        QuantSpec("rtn", 5)
    model = tiny_model()
    with pytest.raises(QuantError, match=r"layers\.0\.self_attn\.q_proj: group size 48 does not divide in_features 64"):
        quantize_model(model, QuantSpec("rtn", 4, 48), log=None)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # checked before any layer changed


def test_quant_linear_forward_and_nf4():
    g = torch.Generator().manual_seed(6)
    w, bias, x = torch.randn(24, 64, generator=g), torch.randn(24, generator=g), torch.randn(3, 5, 64, generator=g)
    for spec in (QuantSpec("rtn", 4, 16), QuantSpec("rtn", 3, 32), QuantSpec("nf4", 4, 32)):
        q = rtn_quantize(w, spec)
        layer = QuantLinear.from_quantized(q, bias)
        torch.testing.assert_close(layer(x), x @ q.dequantize().T + bias)
    # NF4: every weight maps to the nearest of the 16 values times the group's absmax
    q = rtn_quantize(w, QuantSpec("nf4", 4, 32))
    values = torch.tensor(quant.NF4_VALUES)
    normalized = w / q.scales[:, q.g_idx]
    nearest = values[(normalized[..., None] - values).abs().argmin(-1)]
    torch.testing.assert_close(q.dequantize(), nearest * q.scales[:, q.g_idx])


def test_quantized_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    calib = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(7))
    spec = QuantSpec("gptq", 4, 32, act_order=True)               # g_idx stored
    report = quantize_model(model, spec, calib, quantize_head=True, log=None)
    assert len(report) == 2 * 7 + 1 and all(r["output_rel_err"] < 0.1 for r in report)
    assert isinstance(model.lm_head, QuantLinear) and not isinstance(model.embed_tokens, QuantLinear)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(8))
    expected = model(idx)[0]
    path = save_quantized(model, tmp_path / "q", spec)
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(loaded(idx)[0], expected)
    # the linear layers of the blocks: 4 bits + fp16 scale and zero per 32 weights + the group index
    stored, fp16 = quant.linear_bytes(loaded, quant.target_names(loaded, quantize_head=False))
    n_weights = fp16 // 2
    g_idx_bytes = 4 * sum(loaded.get_submodule(n).in_features for n in quant.target_names(loaded, False))
    assert stored == n_weights // 2 + n_weights // 32 * 4 + g_idx_bytes
    assert path.stat().st_size < sum(p.numel() * 4 for p in tiny_model().parameters())


def test_int4_g128_size_is_about_027x_fp16():
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(256, 512), QuantSpec("rtn", 4, 128)))
    ratio = layer.storage_bytes() / (256 * 512 * 2)
    assert ratio == pytest.approx(0.25 + 4 / 256)                 # 4 bits of 16, plus 2 fp16 per 128 weights


def test_cli_bad_bits_is_one_line(tmp_path):
    model = tiny_model()
    from common import save_checkpoint
    save_checkpoint(tmp_path, model)
    with pytest.raises(SystemExit, match="error: bits must be one of"):
        quant.main(["--ckpt", str(tmp_path), "--data", str(tmp_path), "--bits", "5", "--method", "rtn"])


@pytest.mark.parametrize("rows", [1, 3, 37])                      # GEMV (decode) and GEMM (prefill) paths
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_int4_matches_dequantize_then_matmul(rows, act_order):
    from kernels import quant_matmul
    if not quant_matmul.INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1 set before triton is imported")
    device = "cuda" if torch.cuda.is_available() and not quant_matmul.INTERPRET else "cpu"
    g = torch.Generator().manual_seed(rows)
    K, N = 96, 40                                                  # not multiples of the tiles
    W = torch.randn(N, K, generator=g)
    gptq = GPTQ(K)
    gptq.add_batch(correlated_inputs(256, K) * torch.linspace(0.5, 3.0, K))
    q, _ = gptq.quantize(W, QuantSpec("gptq", 4, 32, act_order=act_order))
    layer = QuantLinear.from_quantized(q, torch.randn(N, generator=g)).to(device)
    x = torch.randn(rows, K, generator=g).to(device)
    y = quant_matmul.int4_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.group_index(), layer.bias)
    expected = x.double() @ layer.dequantize().double().T + layer.bias.double()
    assert (y.double() - expected).abs().max() / expected.abs().max() < 1e-5
    x16 = x.half()
    y16 = quant_matmul.int4_matmul(x16, layer.qweight, layer.scales, layer.zeros, layer.group_index())
    expected16 = x16.double() @ layer.dequantize().double().T
    assert y16.dtype == torch.float16
    assert (y16.double() - expected16).abs().max() / expected16.abs().max() < 1e-2


def shakespeare_bytes(data_dir, n=200_000):
    text = (data_dir / "tinyshakespeare" / "input.txt").read_bytes()[:n]
    return np.frombuffer(text, dtype=np.uint8).astype(np.uint16)


def test_qlora_trains_adapters_on_a_frozen_quantized_base(data_dir):
    from lora import apply_lora, lora_layers
    data = shakespeare_bytes(data_dir)
    model = tiny_model(vocab_size=256)
    quantize_model(model, QuantSpec("nf4", 4, 64), log=None)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    counts = apply_lora(model, r=8, alpha=16)
    assert counts["layers"] == 14 and all(isinstance(m.base, QuantLinear) for m in lora_layers(model))
    losses = quant.train_qlora(model, data, steps=20, lr=2e-2, batch_size=8, seq_len=32, log=None)
    assert np.mean(losses[-5:]) < losses[0] - 0.15
    after = model.state_dict()
    assert all(torch.equal(after[k.replace("proj.", "proj.base.")] if k.replace("proj.", "proj.base.") in after
                           else after[k], v) for k, v in frozen.items())  # the base did not move
    # merged: a plain full-precision model computing the same function, which can be quantized again
    idx = torch.from_numpy(data[:64].astype(np.int64)).view(2, 32)
    merged = quant.merge_qlora(model)
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    torch.testing.assert_close(merged(idx)[0], model(idx)[0], atol=1e-4, rtol=1e-4)
    quantize_model(merged, QuantSpec("gptq", 4, 64), calib=idx, log=None)
    assert all(isinstance(merged.get_submodule(n), QuantLinear) for n in quant.target_names(merged, False))
