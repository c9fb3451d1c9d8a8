"""activation_quant.py: AWQ and SmoothQuant. Folding keeps the float model's function; AWQ's search on a layer
with planted outlier channels; SmoothQuant's per-channel ratio; the W8A8 matmul against its float reference;
the CLI (checkpoints every script loads, bad flags named).

    python -m pytest -q tests/test_activation_quant.py
"""
import copy
import json

import numpy as np
import pytest
import torch

import activation_quant as aq
import quant
from common import load_model, save_checkpoint
from model import ModelConfig, Transformer
from quant import QuantSpec, quantize_model, rtn_quantize
from quant_linear import QuantError, QuantLinear, W8A8Linear, int8_matmul, quantize_per_row_int8

OUTLIERS = [3, 17, 40]


def tiny_model(n_kv_heads=4, seed=0, outliers=True):
    """A random tiny model; with `outliers`, channels 3, 17 and 40 of every norm's output are 20x the others,
    the pattern real LLMs' activations have (and where activation-aware methods matter)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, hidden_dim=128,
                         max_seq_len=32, tie_embeddings=True)
    model = Transformer(config).eval()
    if outliers:
        with torch.no_grad():
            for block in model.layers:
                for norm in (block.input_layernorm, block.post_attention_layernorm):
                    norm.weight[OUTLIERS] = 20.0
    return model


def tokens(n, seed):
    return torch.randint(0, 97, (n, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_kv_heads", [4, 2])                     # multi-head (v -> o folded too) and GQA
def test_folding_scales_leaves_the_float_model_unchanged(n_kv_heads):
    model = tiny_model(n_kv_heads)
    idx = tokens(4, 1)
    expected = model(idx)[0]
    g = torch.Generator().manual_seed(2)
    folded = 0
    for block in model.layers:
        for prev, readers in aq.scaling_pairs(block):
            width = block.get_submodule(readers[0]).in_features
            aq.fold_scales(block, prev, readers, torch.exp(torch.randn(width, generator=g)))  # s in ~[0.05, 20]
            folded += 1
    assert folded == 2 * (4 if n_kv_heads == 4 else 3)
    torch.testing.assert_close(model(idx)[0], expected, atol=1e-5, rtol=1e-5)
    # the scales the methods find are folded the same way: AWQ without clipping, SmoothQuant
    for transform in (lambda m: aq.awq_apply(m, QuantSpec("awq", 4, 32), tokens(4, 3), clip=False, log=None),
                      lambda m: aq.smooth(m, tokens(4, 3), 0.5, log=None)):
        fresh = tiny_model(n_kv_heads)
        transform(fresh)
        assert not torch.equal(fresh.layers[0].input_layernorm.weight, tiny_model(n_kv_heads).layers[0].input_layernorm.weight)
        torch.testing.assert_close(fresh(idx)[0], expected, atol=1e-5, rtol=1e-5)


def test_fake_quant_is_rtn():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    for spec in (QuantSpec("rtn", 4, 0), QuantSpec("rtn", 4, 16), QuantSpec("rtn", 3, 32, sym=True)):
        assert torch.equal(aq.fake_quant(w, spec), rtn_quantize(w, spec).dequantize())


def test_awq_search_on_planted_outlier_channels():
    """Inputs whose channels 3, 17, 40 are 30x the others: the search moves off alpha = 0 (plain RTN), and the
    layer stored with AWQ's scales has a lower output error than RTN, on tokens the search did not see."""
    g = torch.Generator().manual_seed(5)
    channel_size = torch.ones(128)
    channel_size[OUTLIERS] = 30.0
    x, x_test = (torch.randn(n, 128, generator=g) * channel_size for n in (2048, 1024))
    w = torch.randn(96, 128, generator=g)
    spec = QuantSpec("awq", 4, 32)
    s, alpha, losses = aq.awq_search_scale(x, [w[:48], w[48:]], spec)  # two readers of the same input
    assert len(losses) == aq.ALPHA_GRID + 1 and alpha > 0
    rtn = rtn_quantize(w, spec).dequantize()
    assert losses[0] == pytest.approx(((x @ (rtn - w).T) ** 2).mean().item(), rel=1e-4)  # alpha 0 is RTN
    assert min(losses) < 0.7 * losses[0]
    stored = QuantLinear.from_quantized(rtn_quantize(w * s, spec))     # what AWQ stores: Q(W diag(s))
    awq_err = ((stored(x_test / s) - x_test @ w.T) ** 2).mean()
    rtn_err = ((x_test @ (rtn - w).T) ** 2).mean()
    assert awq_err < 0.7 * rtn_err
    _, fixed, only = aq.awq_search_scale(x, [w], spec, alpha=0.5)      # --alpha: no search
    assert fixed == 0.5 and len(only) == 1


def test_awq_search_measures_the_attention_output_with_the_readers_weights_replaced():
    """For q/k/v the error is measured at the attention's output (as the reference's module2inspect): at
    alpha = 0 it equals an attention whose q/k/v weights were rounded by RTN, computed here directly; the
    search never does worse than that, and the attention's weights are restored afterwards."""
    model = tiny_model()
    block = model.layers[0]
    attn, spec = block.self_attn, QuantSpec("awq", 4, 32)
    cos, sin = model.rope(torch.arange(32), torch.float32, 32)
    x = block.input_layernorm(model.embed_tokens(tokens(4, 1))).detach()           # (4, 32, 64)
    readers = [attn.q_proj, attn.k_proj, attn.v_proj]
    before = [r.weight.detach().clone() for r in readers]
    run = lambda m, h: m(h, cos, sin)                                              # noqa: E731
    with torch.no_grad():
        reference = attn(x, cos, sin)
        rtn_attn = copy.deepcopy(attn)
        for name in ("q_proj", "k_proj", "v_proj"):
            layer = getattr(rtn_attn, name)
            layer.weight.copy_(rtn_quantize(layer.weight, spec).dequantize())
        rtn_err = ((rtn_attn(x, cos, sin) - reference) ** 2).mean().item()
    output = aq.block_output(attn, readers, x, run)
    s, alpha, losses = aq.awq_search_scale(x.flatten(0, 1), [r.weight for r in readers], spec, output=output)
    assert losses[0] == pytest.approx(rtn_err, rel=1e-4)
    assert min(losses) <= losses[0] and alpha > 0                                  # the planted outliers matter
    assert all(torch.equal(r.weight, w) for r, w in zip(readers, before))


def test_awq_clip_search_never_increases_a_groups_error():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(256, 64, generator=g), torch.randn(16, 64, generator=g)
    spec = QuantSpec("awq", 4, 16)
    bound = aq.awq_search_clip(x, w, spec)
    assert bound.shape == (16, 4, 1)
    assert (bound < w.view(16, 4, 16).abs().amax(-1, keepdim=True)).float().mean() > 0.2  # Gaussian tails: often clipped
    clipped = torch.maximum(torch.minimum(w.view(16, 4, 16), bound), -bound).view(16, 64)

    def group_err(v):
        d = (aq.fake_quant(v, spec) - w).view(16, 4, 16)
        return ((torch.einsum("ngk,ogk->ogn", x.view(-1, 4, 16), d)) ** 2).mean(-1)
    assert (group_err(clipped) <= group_err(w) + 1e-7).all()


def test_awq_model_beats_rtn_and_loads_as_an_ordinary_checkpoint(tmp_path):
    base = tiny_model()
    idx = tokens(8, 7)                                               # held out: not the calibration tokens
    expected = base(idx)[0]
    errors = {}
    for method in ("rtn", "awq", "awq-gptq"):
        model = copy.deepcopy(base)
        spec = QuantSpec(method, 4, 32)
        if method == "rtn":
            quantize_model(model, spec, log=None)
        else:
            report = aq.awq_quantize(model, spec, tokens(16, 8), gptq=method == "awq-gptq", log=None)
            assert len(report) == 14 and all("awq_alpha" in r for r in report)
            assert max(r["awq_alpha"] for r in report) > 0
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        errors[method] = ((model(idx)[0] - expected) ** 2).mean().item()
    assert errors["awq"] < 0.7 * errors["rtn"] and errors["awq-gptq"] < 0.7 * errors["rtn"]
    quant.save_quantized(model, tmp_path / "q", QuantSpec("awq-gptq", 4, 32))
    torch.testing.assert_close(load_model(tmp_path / "q")(idx)[0], model(idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothquant_ratio_after_smoothing_is_the_formula(alpha):
    """Measured by running the models: after smoothing, channel j's activation maximum over its weight
    column maximum is (max|X_j| max|W_j|)^(1 - 2 alpha). Checked on the inputs whose readers no later
    fold touches (GQA: q k v after input_layernorm; down_proj)."""
    base = tiny_model(n_kv_heads=2)
    calib = tokens(8, 9)
    names = [f"layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")]
    readers = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "mlp.down_proj": ("mlp.down_proj",)}

    def weight_absmax(model, name):
        i, short = name.split(".", 2)[1], name.split(".", 2)[2]
        return torch.cat([model.get_submodule(f"layers.{i}.{n}").weight for n in readers[short]]).abs().amax(0)
    x_before = aq.input_absmax(base, calib, names)
    smoothed = copy.deepcopy(base)
    aq.smooth(smoothed, calib, alpha, log=None)
    x_after = aq.input_absmax(smoothed, calib, names)
    for name in names:
        ratio_after = x_after[name] / weight_absmax(smoothed, name)
        expected = (x_before[name] * weight_absmax(base, name)) ** (1 - 2 * alpha)
        torch.testing.assert_close(ratio_after, expected, rtol=1e-4, atol=0)
    # the outlier channels are the ones that shrink most (alpha 0.5: activation max -> sqrt(max|X| max|W|))
    q_in = "layers.0.self_attn.q_proj"
    assert x_before[q_in][OUTLIERS].min() > 10 * x_before[q_in].median()
    assert x_after[q_in].max() / x_after[q_in].median() < 0.5 * x_before[q_in].max() / x_before[q_in].median()


def test_w8a8_matmul_within_int8_rounding_bounds():
    g = torch.Generator().manual_seed(10)
    layer = torch.nn.Linear(96, 40)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 96, generator=g))
        layer.bias.copy_(torch.randn(40, generator=g))
    x = torch.randn(3, 7, 96, generator=g)
    x[..., 5] *= 50                                                  # an outlier channel: a coarse step for every token
    q = W8A8Linear.from_linear(layer)
    y = q(x)
    reference = x @ layer.weight.T + layer.bias
    # |w - w_q d_w| <= d_w / 2 per weight, |x - x_q d_x| <= d_x / 2 per token: the error of each output is
    # at most sum_j |x_j| dw/2 + dx/2 |w_ij| + dx/2 dw/2
    d_w = layer.weight.abs().amax(1) / 127 * (1 + 2 ** -10)          # (40,) fp16 rounding of the stored scale
    d_x = x.abs().amax(-1, keepdim=True) / 127                       # (3, 7, 1)
    bound = (x.abs().sum(-1, keepdim=True) * d_w / 2 + d_x / 2 * layer.weight.abs().sum(1)
             + 96 * d_x / 2 * d_w / 2)
    err = (y - reference).abs()
    assert (err <= bound * 1.001 + 1e-5).all()
    assert err.max() > 0.01 * bound.max()                            # int8 really rounded something
    # the int8 product: torch._int_mm's int32 equals the same integers multiplied in float
    x_q, _ = quantize_per_row_int8(x.reshape(-1, 96))
    acc = int8_matmul(x_q, q.qweight)
    assert torch.equal(acc.double(), x_q.double() @ q.qweight.double().T)


def test_bad_alpha_and_missing_calibration_are_named():
    with pytest.raises(QuantError, match=r"--alpha must be in \[0, 1\], got 1.5"):
        QuantSpec("smoothquant", 8, alpha=1.5)
    with pytest.raises(QuantError, match="--alpha must be in"):
        aq.smooth(tiny_model(), tokens(2, 0), alpha=-0.1, log=None)
    with pytest.raises(QuantError, match="--method awq needs calibration data"):
        aq.awq_quantize(tiny_model(), QuantSpec("awq", 4, 32), None, log=None)
    with pytest.raises(QuantError, match="smoothquant is W8A8: bits must be 8"):
        QuantSpec("smoothquant", 4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny model (with outlier channels) saved as a checkpoint, and a prepared data directory of random
    token ids (what quant.py's CLI needs)."""
    root = tmp_path_factory.mktemp("activation_quant")
    ids = np.random.default_rng(0).integers(0, 97, 4000).astype(np.uint16)
    data = root / "data"
    data.mkdir()
    ids[:3000].tofile(data / "train.bin")
    ids[3000:].tofile(data / "val.bin")
    (data / "meta.json").write_text('{"vocab_size": 97, "dtype": "uint16", "tokenizer": "unused.json"}')
    save_checkpoint(root / "fp32", tiny_model())
    return root / "fp32", data


def test_cli_bad_flags_are_one_line(prepared, refused):
    ckpt, data = prepared
    common = ["--ckpt", str(ckpt), "--no-eval"]
    for flags, message in [(["--data", str(data), "--method", "smoothquant", "--alpha", "2"],
                            r"error: --alpha must be in [0, 1], got 2.0"),
                           (["--data", str(data), "--method", "awq", "--calib-samples", "0"],
                            "error: --method awq needs calibration data: --calib-samples"),
                           (["--method", "awq"], "does not name its training data; give --data"),  # no calibration data
                           (["--method", "smoothquant", "--calib-data", str(data / "absent")],
                            f"error: --calib-data {data / 'absent'}: not a directory written by data/prepare.py")]:
        code, err = refused(quant.main, *common, *flags)
        assert code == 2  # a usage error, as argparse's own
        assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method,layer_type", [("awq", QuantLinear), ("smoothquant", W8A8Linear)])
def test_cli_writes_a_checkpoint_every_script_loads(prepared, tmp_path, method, layer_type):
    ckpt, data = prepared
    out = tmp_path / method
    quant.main(["--ckpt", str(ckpt), "--data", str(data), "--method", method, "--group-size", "32",
                "--calib-samples", "8", "--calib-seq-len", "32", "--no-eval", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["bits"] == (4 if method == "awq" else 8)
    loaded = load_model(out)
    assert sum(isinstance(m, layer_type) for m in loaded.modules()) == 14
    idx = tokens(2, 11)
    fp = load_model(ckpt)(idx)[0]
    err = ((loaded(idx)[0] - fp) ** 2).mean() / (fp ** 2).mean()
    assert 0 < err < (0.05 if method == "awq" else 1e-3)


def test_bench_measures_fp32_even_when_not_a_row(prepared, tmp_path, capsys, refused):
    """bench.awq's "vs fp32" column compares with the float model's perplexity on the same tokens, measured
    whether or not fp32 is one of --methods (never nan); a bad --alpha is one line naming the flag."""
    from bench import awq as bench_awq
    from train import load_split, read_meta
    ckpt, data = prepared
    bench_awq.main(["--model", str(ckpt), "--data", str(data), "--methods", "rtn,w8a8", "--group-size", "32",
                    "--calib-samples", "4", "--calib-seq-len", "32", "--eval-tokens", "256", "--eval-seq-len", "32",
                    "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "nan" not in out
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["W8A8 (not smoothed)", "RTN int4 pc", "RTN int4 g32"]
    held_out = load_split(data, "val", read_meta(data)).astype(np.int64)
    fp = bench_awq.perplexity(load_model(ckpt), held_out, 32, 256)
    for r in rows:
        assert f"| {r['method']} | {r['ppl']:.3f} | {(r['ppl'] / fp - 1) * 100:+.2f}% |" in out
    code, err = refused(bench_awq.main, "--model", ckpt, "--data", data, "--alpha", "1.5")
    assert code == 2 and "--alpha must be in [0, 1], got 1.5" in err
