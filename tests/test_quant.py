"""quant.py and quant_linear.py: packing, RTN's error bound, GPTQ against RTN, act-order's column order, the
sequential pass's Hessians, the quantized checkpoint (read by common.load_model, so sample.py and sft.py take
it), the CLI's summary.json, the Triton int4 kernel (under TRITON_INTERPRET=1 without a GPU) and QLoRA.

    python -m pytest -q tests/test_quant.py
"""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernel

import quant  # noqa: E402
from common import load_model, save_checkpoint  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from quant import GPTQ, QuantSpec, quantize_model, rtn_quantize, save_quantized  # noqa: E402
from quant_linear import QuantError, QuantLinear, pack, unpack  # noqa: E402


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


def reference_gptq(W, H, bits, group_size, act_order=False, static_groups=False, blocksize=128, percdamp=0.01):
    """The column loop of the GPTQ paper's reference code (IST-DASLab/gptq, gptq.py, fasterquant), restated
    as the oracle: dequantized weights (out, in). Its Quantizer is quant.grid_params (the same min/max grid,
    with nanollm's scale stored in fp16); everything else follows the reference line for line, notably
    that a group's grid comes from W (earlier blocks' updates only), not from the block copy W1."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]

    def find_params(x):
        return quant.grid_params(x, bits, False)

    def fake_quantize(x, scale, zero):
        return scale * (torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1) - zero)

    scale, zero = find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [find_params(W[:, i:i + group_size]) for i in range(0, columns, group_size)]
    perm = torch.arange(columns)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if group_size:
                if not static_groups:
                    if (i1 + i) % group_size == 0:
                        scale, zero = find_params(W[:, i1 + i:i1 + i + group_size])
                else:
                    scale, zero = groups[perm[i1 + i] // group_size]
            q = fake_quantize(w.unsqueeze(1), scale, zero).flatten()
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("bits,group_size,act_order,static_groups",
                         [(4, 64, False, False), (4, 64, True, False), (3, 32, False, False), (4, 96, False, False),
                          (4, 192, True, False), (4, 0, False, False), (4, 0, True, False), (4, 64, True, True)])
def test_gptq_is_bit_identical_to_the_reference_algorithm(bits, group_size, act_order, static_groups):
    g = torch.Generator().manual_seed(bits + group_size)
    W = torch.randn(48, 384, generator=g) * torch.rand(48, 1, generator=g)
    X = correlated_inputs(1024, 384, seed=group_size) * torch.linspace(0.5, 3.0, 384)
    X[:, 7] = 0                                                    # a dead input column
    gptq = GPTQ(384)
    gptq.add_batch(X)
    q, _ = gptq.quantize(W, QuantSpec("gptq", bits, group_size, act_order=act_order, static_groups=static_groups))
    expected = reference_gptq(W, gptq.H, bits, group_size, act_order, static_groups)
    assert torch.equal(q.dequantize(), expected)


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
    with pytest.raises(QuantError, match=r"--group-size 48 does not divide the 64 input columns of "
                                         r"layers\.0\.self_attn\.q_proj: give a divisor \(the largest up to 48 is 32\)"):
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


def test_each_layer_is_calibrated_on_its_inputs_in_the_quantized_model(monkeypatch):
    """Sequential GPTQ quantizes in forward order, so a layer's calibration inputs are the ones it sees in the
    finished quantized model: each Hessian must be 2/n X^T X of those (the calibration forward may stop early
    once a group's layers have their inputs, never before)."""
    model = tiny_model()
    calib = torch.randint(0, 97, (6, 32), generator=torch.Generator().manual_seed(3))
    hessians, quantize = {}, GPTQ.quantize
    monkeypatch.setattr(GPTQ, "quantize", lambda self, w, spec: (hessians.setdefault(self.name, self.H.clone()),
                                                                  quantize(self, w, spec))[1])
    quantize_model(model, QuantSpec("gptq", 4, 32), calib, quantize_head=True, batch_size=4, log=None)
    names = quant.target_names(model, quantize_head=True)
    assert sorted(hessians) == sorted(names)
    inputs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, inp, n=n: inputs[n].append(inp[0]))
             for n in names]
    with torch.no_grad():
        model(calib)
    for hook in hooks:
        hook.remove()
    for n in names:
        x = torch.cat(inputs[n]).reshape(-1, hessians[n].shape[0]).double()
        torch.testing.assert_close(hessians[n].double(), 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-6, msg=n)


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
    loaded = load_model(tmp_path / "q")                           # the loader every script uses
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 15
    assert torch.equal(loaded(idx)[0], expected)
    # the linear layers of the blocks: 4 bits + fp16 scale and zero per 32 weights + the group index
    stored, fp16 = quant.linear_bytes(loaded, quant.target_names(loaded, quantize_head=False))
    n_weights = fp16 // 2
    g_idx_bytes = 4 * sum(loaded.get_submodule(n).in_features for n in quant.target_names(loaded, False))
    assert stored == n_weights // 2 + n_weights // 32 * 4 + g_idx_bytes
    assert path.stat().st_size < sum(p.numel() * 4 for p in tiny_model().parameters())
    # a dtype cast (sample.py's bf16 on CUDA) moves the float weights but keeps the stored grid exactly
    half = load_model(tmp_path / "q", dtype=torch.bfloat16)
    assert half.embed_tokens.weight.dtype == torch.bfloat16
    for name in ("layers.0.self_attn.q_proj", "lm_head"):
        a, b = half.get_submodule(name), loaded.get_submodule(name)
        assert a.scales.dtype == torch.float16 and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.g_idx, b.g_idx)


def test_int4_g128_size_is_about_027x_fp16():
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(256, 512), QuantSpec("rtn", 4, 128)))
    ratio = layer.storage_bytes() / (256 * 512 * 2)
    assert ratio == pytest.approx(0.25 + 4 / 256)                 # 4 bits of 16, plus 2 fp16 per 128 weights


def test_cli_bad_bits_is_one_line(tmp_path, refused):
    model = tiny_model()
    save_checkpoint(tmp_path, model)
    code, err = refused(quant.main, "--ckpt", tmp_path, "--data", tmp_path, "--bits", "5", "--method", "rtn")
    assert code == 2  # a usage error
    assert err.strip().startswith("error: bits must be one of")


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
    losses = quant.train_qlora(model, data, steps=10, lr=2e-2, batch_size=8, seq_len=32, log=None)
    assert np.mean(losses[-3:]) < losses[0] - 0.15                # about 5.57 -> 5.30 (seeds 0 and 1)
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


# ----------------------------------------------------------------------------------------------------------
# The CLI's output directory: summary.json, and the checkpoint every script loads

@pytest.fixture(scope="module")
def quantized(data_dir, tmp_path_factory):
    """A tiny random model over a 300-token BPE of Tiny Shakespeare, its data prepared as data/prepare.py
    writes it, and `quant.py --out` (GPTQ int4 g32, evaluated) run on it -> (source, quantized, data) dirs."""
    from bpe import Tokenizer
    root = tmp_path_factory.mktemp("quantized")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20_000]
    tokenizer = Tokenizer.train(text, 300)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    data = root / "data"
    data.mkdir()
    ids[:len(ids) * 9 // 10].tofile(data / "train.bin")
    ids[len(ids) * 9 // 10:].tofile(data / "val.bin")
    tokenizer.save(data / "tokenizer")
    (data / "meta.json").write_text('{"vocab_size": 300, "dtype": "uint16", "tokenizer": "tokenizer.json"}')
    source = root / "fp32"
    tokenizer.save(source / "tokenizer")
    save_checkpoint(source, tiny_model(vocab_size=300), tokenizer="tokenizer", train_config={"data": str(data)})
    quant.main(["--ckpt", str(source), "--out", str(root / "q"), "--method", "gptq", "--bits", "4", "--group-size",
                "32", "--calib-samples", "4", "--calib-seq-len", "32", "--eval-tokens", "512"])
    return source, root / "q", data


def test_cli_writes_summary_json(quantized):
    import json
    from evaluate import evaluate, token_byte_lengths
    from training import load_split, read_meta
    from bpe import Tokenizer
    source, out, data = quantized
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["bits"], summary["group_size"], summary["label"]) == ("gptq", 4, 32, "GPTQ int4 g32")
    assert summary["ckpt_mb"] == (out / "ckpt.pt").stat().st_size / 2**20
    n_params = sum(p.numel() for p in tiny_model(vocab_size=300).parameters())  # tied embedding counted once
    assert summary["model_fp16_mb"] == 2 * n_params / 2**20
    assert summary["ckpt_vs_fp16"] == pytest.approx(summary["ckpt_mb"] / summary["model_fp16_mb"])
    assert summary["linear_vs_fp16"] == pytest.approx(4 / 16 + 2 * 2 / (32 * 2))  # codes + fp16 scale, zero per 32
    assert summary["source_ckpt_mb"] == (source / "ckpt.pt").stat().st_size / 2**20
    layers = summary["layers"]
    assert [r["layer"] for r in layers] == quant.target_names(tiny_model(), False)
    assert summary["output_rel_err_max"] == max(r["output_rel_err"] for r in layers) > 0
    assert summary["worst_layer"] == max(layers, key=lambda r: r["output_rel_err"])["layer"]
    # the perplexities are those of the source and of the saved checkpoint, on the first 512 val tokens
    meta = read_meta(data)
    val, token_bytes = load_split(data, "val", meta), token_byte_lengths(Tokenizer.load(data / "tokenizer.json"), 300)
    for key, ckpt in (("fp_val_ppl", source), ("val_ppl", out)):
        expected = evaluate(load_model(ckpt), val, 32, 32, "cpu", torch.no_grad(), token_bytes, 512)["val_ppl"]
        assert summary[key] == pytest.approx(expected, rel=1e-6)
    assert summary["val_ppl"] != summary["fp_val_ppl"]


def test_sample_cli_generates_from_a_quantized_checkpoint(quantized, capsys):
    """sample.py takes the quant.py output directory as it is; greedy decoding equals that of a plain
    model holding the dequantized weights."""
    import sample
    from common import load_tokenizer
    _, out, _ = quantized
    sample.main(["--ckpt", str(out), "--prompt", "To be", "--strategy", "greedy", "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    tokenizer = load_tokenizer(out)
    plain = quant.merge_qlora(load_model(out))                    # no adapters: just the dequantized weights
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    expected = sample.generate(plain, tokenizer.encode("To be"), 8, temperature=0,
                               stop_tokens=[tokenizer.special_tokens["<|endoftext|>"]])[0]
    assert printed == "To be" + tokenizer.decode(expected.tolist()) + "\n"


def test_sft_qlora_from_a_quantized_checkpoint(quantized, data_dir, tmp_path):
    """sft.py --init QUANT_DIR --lora-rank R: adapters on the frozen QuantLinear layers; ckpt.pt is the
    merged model in full precision, computing what the quantized base plus the adapters computes."""
    import sft
    from lora import load_adapter
    _, out, _ = quantized
    args = ["--init", str(out), "--data", str(data_dir / "sft" / "identity.json"), "--set", "name=nanollm",
            "--set", "author=Ada", "--max-len", "64", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-2",
            "--eval-fraction", "0", "--eval-prompts", "0", "--warmup-steps", "1"]
    with pytest.raises(SystemExit, match="is quantized.*--lora-rank"):
        sft.main(args + ["--out-dir", str(tmp_path / "full")])
    sft.main(args + ["--out-dir", str(tmp_path / "qlora"), "--lora-rank", "4"])
    merged = load_model(tmp_path / "qlora")
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    adapted = load_adapter(load_model(out), tmp_path / "qlora" / "adapter.pt").eval()
    assert all(isinstance(m.base, QuantLinear) for m in adapted.modules() if hasattr(m, "lora_A"))
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(merged(idx)[0], adapted(idx)[0], atol=1e-4, rtol=0)
    assert not torch.allclose(merged(idx)[0], load_model(out)(idx)[0], atol=1e-3)  # the adapters did train


def test_full_training_of_a_quantized_checkpoint_is_refused(quantized, tmp_path):
    """Packed layers have no gradients: distill.py (no LoRA) and dpo.py without --lora-rank refuse a quantized
    --init, naming it, instead of training the embeddings and norms alone; with LoRA (QLoRA) it is accepted."""
    import distill
    import dpo
    from common import check_trainable
    source, out, data = quantized
    with pytest.raises(SystemExit, match="is quantized.*full-precision"):
        distill.main(["--init", str(out), "--data", str(data), "--alpha", "0", "--max-steps", "1",
                      "--out-dir", str(tmp_path / "kd")])
    with pytest.raises(ValueError, match="is quantized.*--lora-rank"):
        dpo.build_policy(dpo.DPOConfig(init=str(out)), "cpu")
    model, lora_counts = dpo.build_policy(dpo.DPOConfig(init=str(out), lora_rank=4), "cpu")
    assert lora_counts["layers"] > 0
    check_trainable(load_model(source), source, lora_rank=0)  # full precision: nothing to refuse
