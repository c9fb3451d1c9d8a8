"""quant_linear.Int4CPULinear and int4_decode_layers (sample.py --weights int4): torch's CPU int4 kernel
against the same 4-bit weights in fp32, on single layers and a small random model."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gguf_io
import sample
from model import ModelConfig, Transformer
from quant_linear import Int4CPULinear, QuantLinear, int4_decode_layers, int4_minmax, pack

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no CPU int4 kernel")


def minmax_weight(codes, scale, low):
    """d q + m, fp64 (out, in)."""
    rows, cols = codes.shape
    grouped = codes.double().view(rows, scale.shape[1], -1)
    return (grouped * scale.double()[..., None] + low.double()[..., None]).view(rows, cols)


def kernel_weight(codes, scale, low):
    """The weight the kernel multiplies by: (q - 8) d + zero with d and zero = m + 8 d rounded to bf16."""
    d = scale.bfloat16().double()
    zero = (low.float() + 8 * scale.float()).bfloat16().double()
    rows, cols = codes.shape
    grouped = codes.double().view(rows, scale.shape[1], -1)
    return ((grouped - 8) * d[..., None] + zero[..., None]).view(rows, cols)


def assert_bf16_close(y, reference, x, weight):
    """Within bf16 rounding of the input and output: |y - ref| <= 2^-7 (|x| |w|^T) + 2^-8 |ref|."""
    bound = 2 ** -7 * (x.abs().double() @ weight.abs().double().t()) + 2 ** -8 * reference.abs().double()
    assert ((y.double() - reference.double()).abs() <= bound + 1e-6).all()


def test_int4_minmax_gives_back_a_q4_1_files_codes():
    """Weights dequantized from gguf_io's Q4_1 (llama.cpp's formula) round back to the file's own codes."""
    w = torch.randn(32, 128) * 0.05
    blocks = gguf_io.quantize(w.numpy(), "Q4_1").reshape(-1, 20)
    file_weight = torch.from_numpy(gguf_io.dequantize(blocks.ravel(), "Q4_1", (32, 128)).reshape(32, 128))
    codes, scale, low = int4_minmax(file_weight, 32)
    file_codes = np.concatenate((blocks[:, 4:] & 0xF, blocks[:, 4:] >> 4), axis=1).reshape(32, 128)  # ggml: low nibbles first
    assert np.array_equal(codes.numpy(), file_codes)
    assert torch.allclose(minmax_weight(codes, scale, low).float(), file_weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64])
def test_from_linear_matches_its_weight_in_fp32(group_size):
    torch.manual_seed(0)
    layer = nn.Linear(128, 48, bias=True)
    codes, scale, low = int4_minmax(layer.weight, group_size)
    w = minmax_weight(codes, scale, low)
    assert (w - layer.weight.double()).abs().max() <= scale.max() / 2 + 1e-6       # round to nearest on the grid
    q = Int4CPULinear.from_linear(layer, group_size)
    x = torch.randn(3, 5, 128)
    reference = F.linear(x.double(), kernel_weight(codes, scale, low), layer.bias.double())
    assert q(x).shape == (3, 5, 48) and q(x).dtype == torch.float32
    assert_bf16_close(q(x).view(-1, 48), reference.view(-1, 48), x.view(-1, 128), w)
    # and not by chance: the kernel's zero is m + 8 d, so a layer built with m alone misses by 8 d per weight
    wrong = Int4CPULinear(codes, scale, low - 8 * scale, layer.bias)
    assert (wrong(x).double() - reference).abs().max() > 10 * (q(x).double() - reference).abs().max()


@pytest.mark.parametrize("group_size, in_features", [(128, 256), (96, 192)])  # 96: split into 3 groups of 32
def test_from_quant_linear_keeps_its_codes(group_size, in_features):
    torch.manual_seed(1)
    out_features = 32
    n_groups = in_features // group_size
    layer = QuantLinear(in_features, out_features, 4, group_size)
    codes = torch.randint(0, 16, (out_features, in_features))
    layer.qweight.copy_(pack(codes, 4))
    layer.scales.copy_(torch.rand(out_features, n_groups) * 0.02 + 0.001)
    layer.zeros.copy_(torch.randint(0, 16, (out_features, n_groups)).float())
    q = Int4CPULinear.from_quant_linear(layer)
    assert q.group_size == (group_size if group_size == 128 else 32)
    x = torch.randn(4, in_features)
    assert_bf16_close(q(x), layer(x), x, layer.dequantize())


def small_model(vocab_size=256):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab_size, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)  # logits spread ~0.8: few near-ties in the argmax
    return model.eval()


def test_int4_decode_layers_on_a_small_model_matches_the_same_weights_in_fp32():
    model = small_model()
    fast = copy.deepcopy(model)
    assert int4_decode_layers(fast) == (2 * 7, 0)                       # every block linear, head untouched
    assert isinstance(fast.lm_head, nn.Linear) and fast.lm_head.weight is fast.embed_tokens.weight
    reference = copy.deepcopy(model)                                     # the same 4-bit weights, fp32 matmuls
    for name, layer in list(reference.named_modules()):
        if isinstance(layer, nn.Linear) and not name.endswith("lm_head"):
            layer.weight.data = minmax_weight(*int4_minmax(layer.weight, 32)).float()
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        ours, theirs, full = fast(ids)[0], reference(ids)[0], model(ids)[0]
    # bf16 activations inside every linear layer: a small fraction of the logits' spread (measured: mean
    # 0.8%, max 5%), and far less than the 4-bit rounding itself moved them (mean 0.17 against 0.0066)
    assert (ours - theirs).abs().mean() < 0.02 * theirs.std()
    assert (ours - theirs).abs().max() < 0.15 * theirs.std()
    assert (ours - theirs).abs().mean() < (theirs - full).abs().mean() / 10
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95
    prompt = ids[0, :8]
    same = (sample.generate(fast, prompt, 16, temperature=0)[0] == sample.generate(reference, prompt, 16, temperature=0)[0])
    assert same.float().mean() >= 0.75


def test_int4_decode_layers_leaves_what_the_kernel_cannot_take():
    model = small_model()
    act_order = QuantLinear(64, 192, 4, 32, has_g_idx=True)
    nf4 = QuantLinear(64, 192, 4, 32, nf4=True)
    model.layers[0].mlp.gate_proj, model.layers[1].mlp.gate_proj = act_order, nf4
    model.layers[0].self_attn.k_proj = nn.Linear(64, 24, bias=False)        # 24 outputs: not a multiple of 16
    assert int4_decode_layers(model) == (2 * 7 - 3, 3)
    assert model.layers[0].mlp.gate_proj is act_order and model.layers[1].mlp.gate_proj is nf4


def test_sample_cli_weights_int4(tmp_path, capsys):
    from common import save_checkpoint
    bpe = pytest.importorskip("bpe")
    tokenizer = bpe.Tokenizer.train("To be, or not to be: that is the question. " * 20, 300)
    tokenizer.save(tmp_path / "tokenizer")
    model = small_model(320)
    save_checkpoint(tmp_path, model, tokenizer="tokenizer")
    sample.main(["--ckpt", str(tmp_path), "--prompt", "To be", "--strategy", "greedy", "--max-new-tokens", "8",
                 "--weights", "int4", "--device", "cpu"])
    out, err = capsys.readouterr()
    int4_decode_layers(model)
    expected = sample.generate(model, tokenizer.encode("To be"), 8, temperature=0,
                               stop_tokens=[tokenizer.special_tokens["<|endoftext|>"]])[0]
    assert out == "To be" + tokenizer.decode(expected.tolist()) + "\n" and "tokens/s" in err
