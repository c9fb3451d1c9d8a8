"""merge.py: each method against hand-computed tensors, the invariants (endpoints, norms, weight 0,
identical models), LoRA adapters as task vectors, refusals, and one end-to-end CLI run on tiny checkpoints."""
import math
import shutil
import subprocess
import sys

import pytest
import torch

import merge
from bpe import Tokenizer
from common import load_model, save_checkpoint
from hf_io import save_hf
from lora import apply_lora, merged_state_dict, save_adapter
from model import ModelConfig, Transformer
from tests.conftest import REPO

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def T(*values):
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# The methods on hand-computed tensors

def test_linear_is_the_normalized_weighted_average():
    out = merge.merge_tensor("linear", None, [T(1, 2), T(3, 6)], [{"weight": 1}, {"weight": 3}], {})
    assert torch.allclose(out, T(2.5, 5.0))  # (1 + 9) / 4, (2 + 18) / 4
    out = merge.merge_tensor("linear", None, [T(1, 2), T(3, 6)], [{"weight": 1}, {"weight": 3}], {"normalize": False})
    assert torch.allclose(out, T(10, 20))


def test_task_arithmetic_adds_weighted_task_vectors():
    base, a, c = T(1, 1, 1), T(2, 0, 1), T(1, 3, 1)
    out = merge.merge_tensor("task_arithmetic", base, [a, c], [{"weight": 0.5}, {"weight": 1.0}], {})
    assert torch.allclose(out, T(1.5, 2.5, 1.0))  # 1 + 0.5 * (1, -1, 0) + (0, 2, 0)
    out = merge.merge_tensor("task_arithmetic", base, [a, c], [{"weight": 0.5}, {"weight": 1.0}], {"lambda": 2.0})
    assert torch.allclose(out, T(2.0, 4.0, 1.0))
    zero = merge.merge_tensor("task_arithmetic", base, [a, c], [{"weight": 0.0}, {"weight": 0.0}], {})
    assert torch.equal(zero, base)


def test_slerp_endpoints_midpoint_and_fallback():
    v0, v1 = T(1, 0), T(0, 2)
    assert torch.allclose(merge.slerp(0.0, v0, v1), v0, atol=1e-7)
    assert torch.allclose(merge.slerp(1.0, v0, v1), v1, atol=1e-7)
    # Omega = 90 degrees: both weights are sin(45 deg) / sin(90 deg)
    assert torch.allclose(merge.slerp(0.5, v0, v1), T(math.sqrt(0.5), 2 * math.sqrt(0.5)))
    # nearly parallel: linear interpolation (the spherical weights would divide by sin(Omega) ~ 0)
    a = T(1.0, 2.0, 3.0)
    assert torch.allclose(merge.slerp(0.25, a, 2 * a), 0.75 * a + 0.25 * 2 * a)
    assert torch.allclose(merge.slerp(0.5, a, -a), torch.zeros(3))  # anti-parallel: lerp too


def test_slerp_keeps_unit_vectors_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    u0, u1 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    u0, u1 = u0 / u0.norm(), u1 / u1.norm()
    for t in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        assert merge.slerp(t, u0, u1).norm().item() == pytest.approx(1.0, abs=1e-6)
    assert merge.lerp(0.5, u0, u1).norm().item() < 0.999  # the chord's midpoint is inside the sphere


def test_ties_worked_example():
    base = torch.zeros(5)
    tau1, tau2 = T(3, -1, 0.5, -2, 2.5), T(2.2, -0.1, 0.2, 4, -3)
    # trim to int(0.6 * 5) = 3 entries: tau1 -> (3, 0, 0, -2, 2.5), tau2 -> (2.2, 0, 0, 4, -3)
    # equal weights: summed mass (5.2, 0, 0, 2, -0.5) elects (+, +, +, +, -); entry 0: both agree -> mean 2.6
    out = merge.merge_tensor("ties", base, [tau1, tau2], [{"density": 0.6}, {"density": 0.6}], {})
    assert torch.allclose(out, T(2.6, 0, 0, 4, -3))
    # weights (1, 0.5): weighted (3,0,0,-2,2.5) and (1.1,0,0,2,-1.5) sum to (4.1,0,0,0,1): elected (+,+,+,+,+);
    # agreeing entries: 0 both (4.1 / 1.5), 3 tau2 (2 / 0.5), 4 tau1 (2.5 / 1)
    out = merge.merge_tensor("ties", base, [tau1, tau2], [{"weight": 1, "density": 0.6}, {"weight": 0.5, "density": 0.6}], {})
    assert torch.allclose(out, T(4.1 / 1.5, 0, 0, 4, 2.5))
    # normalize off: the agreeing weighted sum
    out = merge.merge_tensor("ties", base + 1, [tau1 + 1, tau2 + 1], [{"density": 0.6}, {"density": 0.6}], {"normalize": False})
    assert torch.allclose(out, 1 + T(5.2, 0, 0, 4, -3))


def test_magnitude_trim_keeps_the_largest():
    assert torch.equal(merge.magnitude_trim(T(0.1, -5, 2, -0.3), 0.5), T(0, -5, 2, 0))
    assert torch.equal(merge.magnitude_trim(T(0.1, -5, 2, -0.3), 1.0), T(0.1, -5, 2, -0.3))


def test_dare_drops_and_rescales_with_a_fixed_seed():
    delta = torch.linspace(1, 2, 10000)
    kept = merge.random_drop(delta, 0.3, torch.Generator().manual_seed(7))
    again = merge.random_drop(delta, 0.3, torch.Generator().manual_seed(7))
    other = merge.random_drop(delta, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(kept, again) and not torch.equal(kept, other)
    survivors = kept != 0
    assert torch.allclose(kept[survivors], delta[survivors] / 0.3)  # every survivor is delta / (1 - p)
    assert 0.28 < survivors.float().mean().item() < 0.32             # p = 0.7 of the entries dropped
    assert kept.mean().item() == pytest.approx(delta.mean().item(), rel=0.05)  # the expectation is kept


def test_dare_worked_example_and_density_one():
    base, tau = T(1, 1, 1, 1, 1, 1, 1, 1), T(1, -2, 3, -4, 5, -6, 7, -8)
    out = merge.merge_tensor("dare_linear", base, [base + tau], [{"density": 0.5}], {},
                             [merge.dare_generator(3, 0, "w")])
    dropped = (out - base) == 0
    assert 0 < dropped.sum() < 8
    assert torch.allclose((out - base)[~dropped], 2 * tau[~dropped])  # kept entries doubled (1 / 0.5)
    # density 1: DARE keeps everything, dare_linear is task arithmetic and dare_ties is TIES without a trim
    a, c = base + tau, base - tau.flip(0)
    params = [{"weight": 0.7}, {"weight": 0.4}]
    gens = [torch.Generator().manual_seed(0)] * 2
    assert torch.allclose(merge.merge_tensor("dare_linear", base, [a, c], params, {}, gens),
                          merge.merge_tensor("task_arithmetic", base, [a, c], params, {}))
    assert torch.allclose(merge.merge_tensor("dare_ties", base, [a, c], params, {"normalize": True}, gens),
                          merge.merge_tensor("ties", base, [a, c], params, {}))


def test_parameter_gradients_and_filters():
    assert merge.evaluate_setting(0.3, "norm.weight", 1.0, "t") == 0.3
    assert merge.evaluate_setting([0, 1], "layers.1.mlp.up_proj.weight", 0.5, "t") == pytest.approx(0.5)
    assert merge.evaluate_setting([0, 0.5, 1, 0], "x", 0.5, "t") == pytest.approx(0.75)  # between 0.5 and 1
    rules = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert merge.evaluate_setting(rules, "layers.2.self_attn.q_proj.weight", 1.0, "t") == 1.0
    assert merge.evaluate_setting(rules, "layers.0.mlp.down_proj.weight", 0.0, "t") == 0.9
    assert merge.evaluate_setting(rules, "embed_tokens.weight", 0.0, "t") == 0.5
    assert [merge.tensor_position(n, 3) for n in ("embed_tokens.weight", "layers.0.x", "layers.1.x", "layers.2.x",
                                                  "norm.weight")] == [0.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(merge.MergeError, match="expected a number"):
        merge.evaluate_setting("high", "x", 0.0, "t")


# ----------------------------------------------------------------------------------------------------------
# Whole models

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXT, vocab_size=300)


def make_ckpt(out, tokenizer, seed, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides))
    tokenizer.save(out / "tokenizer")
    save_checkpoint(out, model, tokenizer="tokenizer")
    return model


def states(path):
    return load_model(path).state_dict()


@pytest.fixture(scope="module")
def trio(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("trio")
    for name, seed in (("base", 0), ("a", 1), ("c", 2)):
        make_ckpt(root / name, tokenizer, seed)
    return root


def test_merging_identical_models_returns_that_model(trio, tmp_path):
    b, b2 = str(trio / "base"), str(tmp_path / "copy")  # a model listed as base_model is not also merged into itself
    shutil.copytree(b, b2)
    expected = states(b)
    configs = {"linear": {"models": [b, b2, b]}, "slerp": {"base_model": b, "models": [b2], "parameters": {"t": 0.4}},
               "task_arithmetic": {"base_model": b, "models": [b2, b2]},
               "ties": {"base_model": b, "models": [{"model": b2, "parameters": {"density": 0.5}}] * 2},
               "dare_ties": {"base_model": b, "models": [{"model": b2, "parameters": {"density": 0.3}}] * 2}}
    for method, config in configs.items():
        out = merge.run({"merge_method": method, **config}, tmp_path / method, progress=False)
        got = states(out)
        for name, tensor in expected.items():
            assert torch.allclose(got[name], tensor, atol=1e-6), (method, name)


def test_whole_model_merges_match_the_tensor_math(trio, tmp_path):
    base, a, c = (states(trio / n) for n in ("base", "a", "c"))
    out = merge.run({"merge_method": "task_arithmetic", "base_model": str(trio / "base"),
                     "models": [{"model": str(trio / "a"), "parameters": {"weight": 0.3}},
                                {"model": str(trio / "c"), "parameters": {"weight": 0.0}}]}, tmp_path / "ta", progress=False)
    got = states(out)
    for name in base:
        assert torch.allclose(got[name], base[name] + 0.3 * (a[name] - base[name]), atol=1e-6)
    assert got["lm_head.weight"].data_ptr() == got["embed_tokens.weight"].data_ptr()  # the tie survives
    for t, end in ((0.0, base), (1.0, a)):
        got = states(merge.run({"merge_method": "slerp", "base_model": str(trio / "base"), "models": [str(trio / "a")],
                                "parameters": {"t": t}}, tmp_path / f"slerp{t}", progress=False))
        assert all(torch.allclose(got[n], end[n], atol=1e-6) for n in end)


def test_mixture_of_experts_merges_expert_by_expert(tmp_path, trio, tokenizer):
    """Experts and routers are tensors like any other: task arithmetic of two mixtures is the tensor math on
    each expert and each router, the result is a mixture, and a dense model beside a mixture is refused."""
    moe = {"n_experts": 4, "n_experts_per_token": 2}
    for name, seed in (("base", 0), ("a", 1), ("c", 2)):
        make_ckpt(tmp_path / name, tokenizer, seed, **moe)
    base, a, c = (states(tmp_path / n) for n in ("base", "a", "c"))
    assert any(".experts." in n for n in base) and any(".gate." in n for n in base)
    out = merge.run({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
                     "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 0.3}},
                                {"model": str(tmp_path / "c"), "parameters": {"weight": 0.5}}]}, tmp_path / "ta",
                    progress=False)
    merged = load_model(out)
    assert (merged.config.n_experts, merged.config.n_experts_per_token) == (4, 2)
    got = merged.state_dict()
    for name in base:
        expected = base[name] + 0.3 * (a[name] - base[name]) + 0.5 * (c[name] - base[name])
        assert torch.allclose(got[name], expected, atol=1e-6), name
    with pytest.raises(merge.MergeError, match=r"a: has no tensor layers\.0\.mlp\.gate\.weight"):
        merge.run({"merge_method": "linear", "models": [str(tmp_path / "a"), str(trio / "a")]}, tmp_path / "mixed")


def test_task_vector_stats(trio, tmp_path, capsys, refused):
    base, a, c = (states(trio / n) for n in ("base", "a", "c"))
    names = [n for n in base if n != "lm_head.weight"]  # tied to the embedding: counted once
    ta, tc = (torch.cat([(m[n] - base[n]).flatten() for n in names]) for m in (a, c))
    stats = merge.task_vector_stats({"merge_method": "task_arithmetic", "base_model": str(trio / "base"),
                                     "models": [str(trio / "a"), str(trio / "c")]})
    base_norm = torch.cat([base[n].flatten() for n in names]).norm()
    assert stats["relative_norm"] == pytest.approx([(ta.norm() / base_norm).item(), (tc.norm() / base_norm).item()], rel=1e-5)
    assert stats["pairs"]["0,1"]["cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(ta, tc, dim=0).item(), abs=1e-5)
    both = (ta != 0) & (tc != 0)
    assert stats["pairs"]["0,1"]["sign_conflict"] == pytest.approx(((ta.sign() != tc.sign()) & both).sum().item() / both.sum().item())
    assert merge.main(["--method", "task_arithmetic", "--base", str(trio / "base"), "--models", f"{trio / 'a'},{trio / 'a'}",
                       "--stats"]) == 0
    assert "tau_0, tau_1: cosine +1.0000, opposite signs on 0.0%" in capsys.readouterr().out
    code, err = refused(merge.main, "--method", "ties", "--base", trio / "base", "--models", trio / "a")
    assert code == 2 and "--out-dir: required" in err


def test_lora_adapter_merges_as_its_task_vector(tmp_path, tokenizer):
    base_model = make_ckpt(tmp_path / "base", tokenizer, 0)
    apply_lora(base_model, r=4, alpha=8, embedding_rank=2)
    g = torch.Generator().manual_seed(5)
    for name, p in base_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    save_adapter(base_model, tmp_path / "adapter.pt")
    expected = merged_state_dict(base_model)  # lora.py's own fold of B A (and the embedding's A B) into W
    out = merge.run({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
                     "models": [str(tmp_path / "adapter.pt")]}, tmp_path / "merged", progress=False)
    got = states(out)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name
    assert not torch.allclose(got["layers.0.self_attn.q_proj.weight"], states(tmp_path / "base")["layers.0.self_attn.q_proj.weight"])
    # linear averages the adapted models; the base only carries the adapters: (theta + tau + theta) / 2
    out = merge.run({"merge_method": "linear", "base_model": str(tmp_path / "base"),
                     "models": [str(tmp_path / "adapter.pt"), str(tmp_path / "base" / "ckpt.pt")]},
                    tmp_path / "halfway", progress=False)
    base_state = states(tmp_path / "base")
    for name, tensor in states(out).items():
        assert torch.allclose(tensor, (expected[name] + base_state[name]) / 2, atol=1e-6), name
    with pytest.raises(merge.MergeError, match="linear takes a base only for LoRA adapter inputs"):
        merge.run({"merge_method": "linear", "base_model": str(tmp_path / "base" / "ckpt.pt"),
                   "models": [str(tmp_path / "base"), str(tmp_path / "base")]}, tmp_path / "refused", progress=False)
    make_ckpt(tmp_path / "other", tokenizer, 1)  # the same shapes, other weights: not the adapter's base
    with pytest.raises(merge.MergeError, match="adapter.pt: trained on another base model than"):
        merge.run({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "other"),
                   "models": [str(tmp_path / "adapter.pt")]}, tmp_path / "wrong-base", progress=False)


def test_hugging_face_input_and_output(trio, tmp_path, tokenizer):
    hf = tmp_path / "hf"
    save_hf(load_model(trio / "a"), hf)
    tokenizer.save(hf / "tokenizer")  # tokenizer.json: what load_tokenizer reads in a Hugging Face directory
    out = merge.run({"merge_method": "linear", "models": [str(hf), str(trio / "a")]}, tmp_path / "out",
                    out_format="hf", progress=False)
    assert (out / "model.safetensors").exists()
    got, a = states(out), states(trio / "a")
    assert all(torch.allclose(got[n], a[n], atol=1e-6) for n in a)


def test_gguf_input_and_output(trio, tmp_path, tokenizer):
    from gguf_io import save_gguf
    a = load_model(trio / "a")
    save_gguf(a, tokenizer, tmp_path / "a.gguf", qtype="f32", log=lambda *_: None)
    out = merge.run({"merge_method": "slerp", "base_model": str(tmp_path / "a.gguf"), "models": [str(trio / "base")],
                     "parameters": {"t": 0.0}}, tmp_path / "out", out_format="gguf", progress=False)
    got, expected = states(out / "model.gguf"), a.state_dict()  # read back through gguf_io (Q/K rows permuted twice)
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected)


def test_mismatches_are_refused_by_name(trio, tmp_path, tokenizer):
    make_ckpt(tmp_path / "wide", tokenizer, 3, hidden_dim=128)
    with pytest.raises(merge.MergeError, match=r"wide: tensor layers\.0\.mlp\.gate_proj\.weight has shape \(128, 64\)"):
        merge.run({"merge_method": "linear", "models": [str(trio / "a"), str(tmp_path / "wide")]}, tmp_path / "o1")
    make_ckpt(tmp_path / "theta", tokenizer, 3, rope_theta=500000.0)
    with pytest.raises(merge.MergeError, match="theta: config rope_theta=500000.0"):
        merge.run({"merge_method": "linear", "models": [str(trio / "a"), str(tmp_path / "theta")]}, tmp_path / "o2")
    make_ckpt(tmp_path / "othertok", Tokenizer.train(TEXT.upper(), vocab_size=300), 3)
    with pytest.raises(merge.MergeError, match="othertok: its tokenizer differs"):
        merge.run({"merge_method": "ties", "base_model": str(trio / "base"),
                   "models": [str(trio / "a"), str(tmp_path / "othertok")]}, tmp_path / "o3")
    with pytest.raises(merge.MergeError, match="give base_model"):
        merge.run({"merge_method": "ties", "models": [str(trio / "a")]}, tmp_path / "o4")
    with pytest.raises(merge.MergeError, match="unsupported key 'tokenizer_source'"):
        merge.run({"merge_method": "linear", "models": [str(trio / "a")], "tokenizer_source": "union"}, tmp_path / "o5")


# ----------------------------------------------------------------------------------------------------------
# The command line: flags and a mergekit-shaped YAML give the same model; bad input is one line, exit 2

def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "merge.py"), *map(str, args)], capture_output=True, text=True)


def test_cli_flags_and_yaml_config_agree(trio, tmp_path, refused):
    b, a, c = (trio / n for n in ("base", "a", "c"))
    flags = cli("--method", "dare_ties", "--base", b, "--models", f"{a},{c}", "--weights", "0.6,0.4",
                "--density", "0.5", "--seed", "3", "--out-dir", tmp_path / "flags")
    assert flags.returncode == 0, flags.stderr
    assert "merged 20/20 tensors" in flags.stdout  # the tied head is the embedding: one tensor
    (tmp_path / "merge.yml").write_text(
        f"merge_method: dare_ties\nbase_model: {b}\nmodels:\n"
        f"  - model: {a}\n    parameters:\n      weight: 0.6\n      density: 0.5\n"
        f"  - model: {c}\n    parameters: {{weight: 0.4, density: 0.5}}\ndtype: float32\n")
    assert merge.main(["--config", str(tmp_path / "merge.yml"), "--seed", "3", "--out-dir", str(tmp_path / "yaml")]) == 0
    x, y, base = states(tmp_path / "flags"), states(tmp_path / "yaml"), states(b)
    assert all(torch.equal(x[n], y[n]) for n in x)
    assert not torch.equal(x["layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"])
    assert (tmp_path / "flags" / "tokenizer.json").exists() and (tmp_path / "flags" / "merge_config.json").exists()

    code, err = refused(merge.main, "--method", "linear", "--models", f"{a},{c}", "--out-dir", tmp_path / "flags")
    assert code == 2 and "already holds ckpt.pt" in err
    code, err = refused(merge.main, "--method", "ties", "--base", b, "--models", f"{a},{c}", "--weights", "1,2,3",
                           "--out-dir", tmp_path / "x")
    assert code == 2 and "--weights '1,2,3': one value, or one per model (2)" in err
    code, err = refused(merge.main, "--method", "linear", "--models", f"{a},{tmp_path / 'nope'}", "--out-dir", tmp_path / "x")
    assert code == 2 and "nope: no such file or directory" in err
    (tmp_path / "bad.yml").write_text("merge_method: ties\nmodels: [unclosed\n")
    code, err = refused(merge.main, "--config", tmp_path / "bad.yml", "--out-dir", tmp_path / "x")
    assert code == 2 and "bad.yml: not valid YAML" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# mergekit (PyPI) as an oracle for the per-tensor math, when installed (`pip install --no-deps mergekit`:
# its tensor functions need only torch and pydantic; it is not in requirements-dev.txt, whose install would
# pull its heavy dependencies: peft, datasets, transformers)

def mergekit_method(name: str):
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    return registry.get(name)


def mergekit_group(base, tensors):
    """The duck-typed TensorGroup that mergekit's GeneralizedTaskArithmeticMerge.merge_group reads."""
    from types import SimpleNamespace
    return SimpleNamespace(base=SimpleNamespace(tensor=base),
                           non_base=[SimpleNamespace(id=i, tensor=t) for i, t in enumerate(tensors)])


def test_slerp_matches_mergekit():
    mk_slerp = pytest.importorskip("mergekit.merge_methods.slerp").slerp
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    near = v0 * 2 + 1e-4 * torch.randn(6, 9, generator=g)  # |cos| > 0.9995: both fall back to lerp
    for other in (v1, near, -v0, 0.3 * v0 + v1):
        for t in (0.0, 0.2, 0.5, 0.9, 1.0):
            # mergekit 0.1.5 interpolates each output row on its own sphere; merge.py (as mergekit before it)
            # the whole tensor: the same thing for a tensor seen as one row
            expected = mk_slerp(torch.tensor([t]), v0.reshape(1, -1), other.reshape(1, -1)).reshape(v0.shape)
            assert torch.allclose(merge.slerp(t, v0, other), expected, atol=1e-5)


def test_magnitude_trim_matches_mergekit():
    sparsify = pytest.importorskip("mergekit.sparsify")
    delta = torch.randn(13, 17, generator=torch.Generator().manual_seed(1))
    for density in (0.001, 0.1, 0.37, 0.5, 0.9, 1.0):  # 0.001: k = max(1, int(0.22)) keeps one entry
        assert torch.equal(merge.magnitude_trim(delta, density), sparsify.magnitude(delta, density))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_task_vector_methods_match_mergekit(method):
    oracle = mergekit_method(method)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 12, generator=g)
    tensors = [base + torch.randn(8, 12, generator=g) * s for s in (1.0, 0.5, 2.0)]
    # DARE's drops are random in both (different generators): compared at density 1, where only the sign
    # election, the weights and the normalization act; TIES' magnitude trim is deterministic
    densities = [1.0, 1.0, 1.0] if method.startswith("dare") else [0.3, 0.6, 1.0]
    for weights in ([1.0, 1.0, 1.0], [0.7, -0.4, 1.3]):
        for normalize in (True, False):
            for scale in (1.0, 0.6):
                params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
                ours = merge.merge_tensor(method, base, tensors, params, {"normalize": normalize, "lambda": scale},
                                          [merge.dare_generator(0, i, "w") for i in range(3)])
                theirs = oracle.merge_group(mergekit_group(base, tensors), weight=dict(enumerate(weights)),
                                            density=dict(enumerate(densities)), normalize=normalize, rescale=False,
                                            int8_mask=False, **{"lambda": scale})
                assert torch.allclose(ours, theirs, atol=1e-5), (method, weights, normalize, scale)
