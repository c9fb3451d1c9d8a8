"""distill.py: each divergence on hand-made distributions, the T^2 scaling (Hinton's high-temperature
gradient), top-k + rest bucket equal to the full divergence at k = vocab, the sampled tail's unbiased
forward KL (value and gradient), the tokenizer check, the cache against the live teacher, a tiny KD run whose KD loss falls, chat data, and the black-box dataset."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bpe import Tokenizer
from chat import load_conversations
from common import read_checkpoint, save_checkpoint
from evaluate import TokenizerMismatch, check_same_tokenizer
from distill import (REST_LOGP, DistillConfig, DistillError, TopKCache, build_cache, distill,
                     divergence, kd_loss, main, teacher_targets)
from model import ModelConfig, Transformer
from common import UsageError
from tasks import arithmetic_problems, sft_conversations


def logp(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


# ----------------------------------------------------------------------------------------------------------
# The divergences on hand-made distributions

def test_divergences_of_identical_distributions_are_zero():
    p = logp(0.1, 0.2, 0.7)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(p, p, kind).item() == pytest.approx(0.0, abs=1e-12)


def test_divergences_by_hand():
    p, q = logp(0.5, 0.5), logp(0.25, 0.75)
    assert divergence(p, q, "forward_kl").item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert divergence(p, q, "reverse_kl").item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    # beta 0.5: the mixture is (0.375, 0.625)
    m = (0.375, 0.625)
    expected = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert divergence(p, q, "jsd", beta=0.5).item() == pytest.approx(expected)
    # beta 0.9: m = 0.9 p + 0.1 q
    m = (0.9 * 0.5 + 0.1 * 0.25, 0.9 * 0.5 + 0.1 * 0.75)
    expected = 0.9 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.1 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert divergence(p, q, "jsd", beta=0.9).item() == pytest.approx(expected)


def test_jsd_of_disjoint_distributions_is_ln2():
    p, q = torch.tensor([0.0, REST_LOGP], dtype=torch.float64), torch.tensor([REST_LOGP, 0.0], dtype=torch.float64)
    assert divergence(p, q, "jsd", beta=0.5).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="beta"):
        divergence(p, q, "jsd", beta=1.0)


def test_kd_loss_is_t_squared_times_kl_at_t():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    for T in (1.0, 2.0, 4.0):
        reference = F.kl_div(F.log_softmax(student / T, -1).flatten(0, 1), F.log_softmax(teacher / T, -1).flatten(0, 1),
                             log_target=True, reduction="batchmean")
        assert kd_loss(student, teacher, "forward_kl", T, 0.5).item() == pytest.approx(T * T * reference.item(), rel=1e-5)


def test_t_squared_keeps_the_gradient_scale_at_high_temperature():
    """Hinton et al. 2015, eq. 3 times T^2: with zero-mean logits and large T, d(T^2 KL)/dz_i -> (z_i - v_i) / N."""
    torch.manual_seed(0)
    N, T = 8, 100.0
    z, v = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    z, v = (z - z.mean()).requires_grad_(), v - v.mean()
    kd_loss(z[None, None], v[None, None], "forward_kl", T, 0.5).backward()
    assert torch.allclose(z.grad, (z - v).detach() / N, rtol=0.02, atol=1e-3)


def test_masked_positions_do_not_count():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert kd_loss(student, teacher, "reverse_kl", 2.0, 0.5, mask).item() == \
        pytest.approx(kd_loss(student[:, :2], teacher[:, :2], "reverse_kl", 2.0, 0.5).item(), rel=1e-6)


def test_topk_with_k_equal_vocab_is_the_full_divergence():
    torch.manual_seed(0)
    V = 13
    student, teacher = torch.randn(2, 5, V), 3 * torch.randn(2, 5, V)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        full = kd_loss(student, teacher, kind, 2.0, 0.3)
        cached = kd_loss(student, teacher_targets(teacher, V, 2.0), kind, 2.0, 0.3)
        assert cached.item() == pytest.approx(full.item(), rel=1e-5), kind


def test_topk_divergence_is_the_rest_bucket_divergence_by_hand():
    """k = 2 of 4 tokens: teacher (0.5, 0.3 | 0.1, 0.1), student (0.4, 0.2 | 0.3, 0.1) -> over
    (top1, top2, rest): KL((0.5, 0.3, 0.2) || (0.4, 0.2, 0.4)), below the full KL."""
    teacher, student = logp(0.5, 0.3, 0.1, 0.1)[None, None], logp(0.4, 0.2, 0.3, 0.1)[None, None]
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    cached = kd_loss(student, teacher_targets(teacher, 2, 1.0), "forward_kl", 1.0, 0.5)
    assert cached.item() == pytest.approx(expected, rel=1e-6)
    assert cached.item() < kd_loss(student, teacher, "forward_kl", 1.0, 0.5).item()


def test_sampled_tail_with_k_equal_vocab_is_the_full_kl():
    torch.manual_seed(0)
    V = 13
    student, teacher = torch.randn(2, 5, V), 3 * torch.randn(2, 5, V)
    cached = teacher_targets(teacher, V, 2.0, samples=4)  # the draws weigh the tail's mass: 0
    assert kd_loss(student, cached, "forward_kl", 2.0, 0.5).item() == \
        pytest.approx(kd_loss(student, teacher, "forward_kl", 2.0, 0.5).item(), rel=1e-5)


@pytest.mark.parametrize("k", [0, 2])
def test_sampled_tail_is_unbiased_where_the_rest_bucket_is_not(k):
    """Teacher (0.4, 0.2 | 0.15, 0.15, 0.1), student (0.3, 0.3 | 0.05, 0.1, 0.25): at k = 2 both rest buckets
    weigh 0.4, so the rest bucket's gradient on the tail logits is 0, where the full KL's is q - p = (-0.1,
    -0.05, 0.15). From 200,000 draws each estimated p_j has a standard error of at most 0.5 / sqrt(200,000) =
    0.0011, so the sampled gradient is within about 5 of them of the full one."""
    teacher, student = logp(0.4, 0.2, 0.15, 0.15, 0.1)[None, None], logp(0.3, 0.3, 0.05, 0.1, 0.25)[None, None]

    def loss_and_grad(target):
        z = student.clone().requires_grad_()
        loss = kd_loss(z, target, "forward_kl", 1.0, 0.5)
        loss.backward()
        return loss.item(), z.grad[0, 0]
    full_loss, full_grad = loss_and_grad(teacher)
    assert torch.allclose(full_grad, torch.tensor([-0.1, 0.1, -0.1, -0.05, 0.15], dtype=torch.float64))
    sampled = teacher_targets(teacher, k, 1.0, samples=200_000, generator=torch.Generator().manual_seed(0))
    assert not set(sampled.tail_ids.flatten().tolist()) & set(sampled.top_ids.flatten().tolist())
    sampled_loss, sampled_grad = loss_and_grad(sampled)
    assert sampled_loss == pytest.approx(full_loss, abs=0.01)
    assert torch.allclose(sampled_grad, full_grad, atol=0.006)
    if k:
        _, bucket_grad = loss_and_grad(teacher_targets(teacher, k, 1.0))
        assert torch.allclose(bucket_grad[k:], torch.zeros(5 - k, dtype=torch.float64), atol=1e-6)


def test_sampled_cache_is_forward_kl_only():
    teacher = torch.randn(1, 2, 6)
    with pytest.raises(ValueError, match="forward_kl only"):
        kd_loss(torch.randn(1, 2, 6), teacher_targets(teacher, 2, 1.0, samples=3), "jsd", 1.0, 0.5)


def test_kd_is_zero_when_the_student_is_the_teacher():
    logits = torch.randn(1, 3, 9)
    for teacher in (logits, teacher_targets(logits, 4, 2.0)):
        for kind in ("forward_kl", "reverse_kl", "jsd"):
            assert kd_loss(logits, teacher, kind, 2.0, 0.5).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers, data, models

@pytest.fixture(scope="module")
def shakespeare(data_dir):
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60000]


@pytest.fixture(scope="module")
def tokenizer(shakespeare):
    arithmetic = " ".join(m["content"] for c in sft_conversations(arithmetic_problems(200), reasoning=True) for m in c)
    return Tokenizer.train(shakespeare[:20000] + arithmetic + " user assistant", vocab_size=320)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer, shakespeare):
    """A data/prepare.py-style directory: train.bin, val.bin, meta.json, the tokenizer."""
    path = tmp_path_factory.mktemp("shards")
    tokens = np.array(tokenizer.encode_ordinary(shakespeare), dtype=np.uint16)
    cut = int(len(tokens) * 0.9)
    tokens[:cut].tofile(path / "train.bin")
    tokens[cut:].tofile(path / "val.bin")
    tokenizer.save(path / "tokenizer")
    (path / "meta.json").write_text(json.dumps({"vocab_size": tokenizer.vocab_size, "dtype": "uint16",
                                                "tokenizer": "tokenizer"}))
    return path


def save_model(path, tokenizer, n_layers=2, dim=32, seed=0, max_seq_len=64):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=dim, n_layers=n_layers, n_heads=4,
                                    n_kv_heads=4, hidden_dim=2 * dim, max_seq_len=max_seq_len))
    save_checkpoint(path, model, tokenizer="tokenizer")
    tokenizer.save(path / "tokenizer")
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer, shards):
    """A teacher that knows the data a little: 40 steps of train-by-KD-with-alpha-0 (= plain training)."""
    path = tmp_path_factory.mktemp("teacher")
    distill(DistillConfig(data=str(shards), out_dir=str(path), alpha=0.0, n_layers=2, dim=48, n_heads=4,
                          n_kv_heads=4, hidden_dim=96, seq_len=32, batch_size=8, max_steps=25, lr=3e-3,
                          warmup_steps=5, eval_interval=1000, log_interval=1000, eval_tokens=1024, device="cpu"))
    return path


def student_config(shards, out_dir, **overrides):
    settings = dict(data=str(shards), out_dir=str(out_dir), n_layers=1, dim=16, n_heads=2, n_kv_heads=2,
                    hidden_dim=32, seq_len=32, batch_size=4, max_steps=20, lr=3e-3, warmup_steps=2,
                    eval_interval=1000, log_interval=5, eval_tokens=1024, device="cpu", alpha=1.0, temperature=2.0)
    return DistillConfig(**{**settings, **overrides})


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, tokenizer, shards, shakespeare, refused):
    other = Tokenizer.train(shakespeare[20000:40000], vocab_size=tokenizer.vocab_size)
    with pytest.raises(TokenizerMismatch, match="tokenizers differ .*token"):
        check_same_tokenizer(tokenizer, other, "t", "s")
    smaller = Tokenizer.train(shakespeare[:20000], vocab_size=300)
    with pytest.raises(TokenizerMismatch, match="vocab size 320 vs 300"):
        check_same_tokenizer(tokenizer, smaller, "t", "s")
    foreign_teacher = save_model(tmp_path / "foreign", smaller)
    code, err = refused(main, "--data", shards, "--teacher", foreign_teacher, "--out-dir", tmp_path / "out",
                        "--device", "cpu")
    assert code != 0 and "error: teacher and student tokenizers differ" in err


def test_cache_matches_the_live_teacher(tmp_path, teacher_dir, shards, tokenizer):
    V = tokenizer.vocab_size
    meta = build_cache(str(teacher_dir), str(shards), str(tmp_path / "cache"), seq_len=32, k=V, temperature=2.0,
                       device="cpu")
    cache = TopKCache(tmp_path / "cache")
    assert meta["positions"] == cache.offsets[-1] == 32 * meta["sequences"]
    teacher = Transformer(ModelConfig(**read_checkpoint(teacher_dir)["model_config"]))
    teacher.load_state_dict(read_checkpoint(teacher_dir)["model"])
    train = np.fromfile(shards / "train.bin", dtype=np.uint16).astype(np.int64)
    rows = [0, 5]
    x = torch.from_numpy(np.stack([train[r * 32:r * 32 + 32] for r in rows]))
    with torch.no_grad():
        live_logits, _ = teacher.eval()(x)
    cached = cache.batch(rows, 32, "cpu")
    live_logp = F.log_softmax(live_logits / 2.0, -1).gather(-1, cached.top_ids)
    assert torch.allclose(cached.top_logp, live_logp, atol=2e-2)  # float16 storage
    student = torch.randn(2, 32, V)
    assert kd_loss(student, cache.batch(rows, 32, "cpu"), "forward_kl", 2.0, 0.5).item() == \
        pytest.approx(kd_loss(student, live_logits, "forward_kl", 2.0, 0.5).item(), rel=1e-3)
    with pytest.raises(UsageError, match="temperature 2.0"):
        distill(student_config(shards, tmp_path / "wrong-t", teacher_cache=str(tmp_path / "cache"), temperature=1.0))
    with pytest.raises(UsageError, match="windows of 32"):
        distill(student_config(shards, tmp_path / "wrong-len", teacher_cache=str(tmp_path / "cache"), seq_len=16))


def test_sampled_cache_matches_the_live_teacher(tmp_path, teacher_dir, shards):
    build_cache(str(teacher_dir), str(shards), str(tmp_path / "cache"), seq_len=32, k=4, temperature=2.0, device="cpu",
                samples=32)
    cache = TopKCache(tmp_path / "cache")
    teacher = Transformer(ModelConfig(**read_checkpoint(teacher_dir)["model_config"]))
    teacher.load_state_dict(read_checkpoint(teacher_dir)["model"])
    train = np.fromfile(shards / "train.bin", dtype=np.uint16).astype(np.int64)
    rows = [1, 7]
    with torch.no_grad():
        live_logits, _ = teacher.eval()(torch.from_numpy(np.stack([train[r * 32:r * 32 + 32] for r in rows])))
    cached, live = cache.batch(rows, 32, "cpu"), teacher_targets(live_logits, 4, 2.0, samples=1)
    assert torch.equal(cached.top_ids, live.top_ids)
    assert torch.allclose(cached.rest_logp, live.rest_logp, atol=1e-5)
    assert torch.allclose(cached.tail_plogp, live.tail_plogp, atol=1e-5)
    assert not (cached.tail_ids[..., :, None] == cached.top_ids[..., None, :]).any()  # draws come from the tail
    # the estimate of T^2 * mean KL is within 4 standard errors of the full one; each position's error is
    # P(tail) times the mean of its 32 draws of -log q, whose variance the draws themselves estimate
    student = torch.randn(2, 32, live_logits.size(-1), generator=torch.Generator().manual_seed(0))
    draws = F.log_softmax(student / 2.0, -1).gather(-1, cached.tail_ids)
    standard_error = 2.0 ** 2 * (cached.rest_logp.exp() ** 2 * draws.var(-1) / 32).sum().sqrt() / draws[..., 0].numel()
    full = kd_loss(student, live_logits, "forward_kl", 2.0, 0.5).item()
    error = abs(kd_loss(student, cached, "forward_kl", 2.0, 0.5).item() - full)
    assert error < 4 * standard_error.item()
    with pytest.raises(UsageError, match="forward_kl only"):
        distill(student_config(shards, tmp_path / "jsd", teacher_cache=str(tmp_path / "cache"), loss="jsd"))


def kd_curve(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["kd"] for r in rows if "kd" in r]


def test_kd_run_live_and_cached_lower_the_kd_loss(tmp_path, teacher_dir, shards):
    live = distill(student_config(shards, tmp_path / "live", teacher=str(teacher_dir)))
    curve = kd_curve(tmp_path / "live")
    assert curve[-1] < 0.8 * curve[0]
    assert live["step"] == 20 and math.isfinite(live["val_bpb"])
    assert (tmp_path / "live" / "loss.png").exists() and (tmp_path / "live" / "tokenizer.json").exists()
    build_cache(str(teacher_dir), str(shards), str(tmp_path / "cache"), seq_len=32, k=16, temperature=2.0, device="cpu")
    distill(student_config(shards, tmp_path / "cached", teacher_cache=str(tmp_path / "cache"), loss="jsd"))
    curve = kd_curve(tmp_path / "cached")
    assert curve[-1] < 0.8 * curve[0]
    build_cache(str(teacher_dir), str(shards), str(tmp_path / "sampled"), seq_len=32, k=4, temperature=2.0,
                device="cpu", samples=16)
    distill(student_config(shards, tmp_path / "sampled-run", teacher_cache=str(tmp_path / "sampled")))
    curve = kd_curve(tmp_path / "sampled-run")
    assert curve[-1] < 0.8 * curve[0]


def test_resume_is_exact(tmp_path, teacher_dir, shards, monkeypatch):
    import training  # where the run directory saves its checkpoint
    settings = dict(teacher=str(teacher_dir), alpha=0.5, max_steps=6, eval_interval=3, log_interval=1)
    distill(student_config(shards, tmp_path / "straight", **settings))

    def save_then_crash(*args, **kwargs):  # the run dies right after its step-3 checkpoint
        save_checkpoint(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        distill(student_config(shards, tmp_path / "resumed", **settings))
    monkeypatch.undo()
    distill(student_config(shards, tmp_path / "resumed", **settings, resume=True))
    a, b = read_checkpoint(tmp_path / "straight")["model"], read_checkpoint(tmp_path / "resumed")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_are_clear_errors(tmp_path, shards, teacher_dir):
    with pytest.raises(UsageError, match="needs a teacher"):
        distill(student_config(shards, tmp_path / "a", alpha=0.5))
    with pytest.raises(UsageError, match="--alpha 1.5"):
        distill(student_config(shards, tmp_path / "b", alpha=1.5, teacher=str(teacher_dir)))
    with pytest.raises(DistillError, match="not a finished cache"):
        distill(student_config(shards, tmp_path / "c", teacher_cache=str(tmp_path)))
    with pytest.raises(UsageError, match="missing.jsonl: neither a data/prepare.py directory nor a chat file"):
        distill(student_config(tmp_path / "missing.jsonl", tmp_path / "d", teacher=str(teacher_dir)))


# ----------------------------------------------------------------------------------------------------------
# Chat data and black-box generation

@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "arithmetic.jsonl"
    conversations = sft_conversations(arithmetic_problems(24, seed=1), reasoning=True)
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def test_chat_kd_trains_on_answer_tokens(tmp_path, tokenizer, chat_file):
    teacher = save_model(tmp_path / "teacher", tokenizer, n_layers=2, dim=32, seed=1)
    student = save_model(tmp_path / "student", tokenizer, n_layers=1, dim=32, seed=2)
    summary = distill(DistillConfig(data=str(chat_file), init=str(student), teacher=str(teacher), out_dir=str(tmp_path / "out"),
                                    seq_len=63, batch_size=4, max_steps=15, lr=3e-3, warmup_steps=1, alpha=1.0,
                                    eval_interval=1000, log_interval=5, device="cpu"))
    curve = kd_curve(tmp_path / "out")
    assert curve[-1] < 0.8 * curve[0] and math.isfinite(summary["val_loss"])


def test_chat_kd_from_a_cache_needs_no_student_checkpoint(tmp_path, tokenizer, chat_file):
    """A student built from the model flags on chat data: the tokenizer comes from the cache."""
    teacher = save_model(tmp_path / "teacher", tokenizer, n_layers=2, dim=32, seed=1)
    build_cache(str(teacher), str(chat_file), str(tmp_path / "cache"), seq_len=63, k=8, temperature=2.0, device="cpu")
    distill(student_config(chat_file, tmp_path / "out", teacher_cache=str(tmp_path / "cache"), seq_len=63,
                           max_steps=15, dim=32, hidden_dim=64))
    curve = kd_curve(tmp_path / "out")
    assert curve[-1] < 0.8 * curve[0]


def test_generate_writes_an_sft_dataset_and_resumes(tmp_path, tokenizer, capsys):
    teacher = save_model(tmp_path / "teacher", tokenizer, seed=3)
    problems = arithmetic_problems(5, seed=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in problems[:3]) + json.dumps("Say hi") + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "2 + 2?"},
                                                  {"role": "assistant", "content": "4"}]}) + "\n")
    out = tmp_path / "teacher.jsonl"
    args = ["generate", "--teacher", str(teacher), "--prompts", str(prompts), "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", "8", "--reasoning", "--keep-unfinished", "--device", "cpu"]
    main(args)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3, 4]  # (--keep-unfinished: a random teacher rarely stops)
    assert records[0]["messages"][0]["content"] == problems[0]["question"] and "correct" in records[0]
    assert records[4]["messages"][:1] == [{"role": "user", "content": "2 + 2?"}]  # the old answer is replaced
    conversations, skipped = load_conversations(out)  # the loader sft.py uses
    assert len(conversations) == 5 and skipped == 0
    assert [m["role"] for m in conversations[3]] == ["user", "assistant"]
    # resume: a torn last line is dropped and regenerated, finished prompts are skipped
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    capsys.readouterr()
    main(args)
    assert "4 already in" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records  # greedy: the same answers


def test_generate_without_reasoning_keeps_the_answer_only(tmp_path, tokenizer, monkeypatch):
    import distill as distill_module
    teacher = save_model(tmp_path / "teacher", tokenizer, seed=3)
    trace = tokenizer.encode_ordinary("<think>1 + 2 = 3.</think>The answer is 3.")
    monkeypatch.setattr(distill_module, "generate", lambda model, prompts, **kw: [torch.tensor(trace)] * len(prompts))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"question": "What is 1 + 2?", "answer": 3, "terms": [1, 2]},
                                   {"question": "What is 2 + 2?", "answer": 4, "terms": [2, 2]}]))
    for reasoning, expected in ((False, "The answer is 3."), (True, "<think>1 + 2 = 3.</think>The answer is 3.")):
        out = tmp_path / f"out-{reasoning}.jsonl"
        main(["generate", "--teacher", str(teacher), "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
              "--keep", "correct"] + (["--reasoning"] if reasoning else []))
        record, = [json.loads(line) for line in out.read_text().splitlines()]  # "3" is wrong for 2 + 2: left out
        assert record["messages"][-1]["content"] == expected and record["correct"] is True
        rejected, = [json.loads(line) for line in out.with_name(out.stem + ".rejected.jsonl").read_text().splitlines()]
        assert rejected["id"] == 1 and rejected["correct"] is False


# ----------------------------------------------------------------------------------------------------------
# A draft cut from the teacher: some of its blocks, an output layer over the most frequent tokens

def test_cut_student_keeps_the_chosen_blocks_and_the_most_frequent_tokens(tmp_path, tokenizer):
    from distill import cut_student, target_counts
    teacher = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=3, n_heads=4, n_kv_heads=4,
                                      hidden_dim=64, max_seq_len=64, tie_embeddings=True)).eval()
    whole = cut_student(teacher, [], 0, None).eval()  # nothing cut: the same model, the same outputs
    idx = torch.randint(0, tokenizer.vocab_size, (2, 9))
    torch.testing.assert_close(whole(idx)[0], teacher(idx)[0])
    examples = [([5, 9, 9, 7, 9], [0, 0, 1, 1, 1]), ([9, 7, 3, 3], [0, 1, 1, 0])]  # targets: 9, 7, 9 | 7, 3
    counts = target_counts(examples, tokenizer.vocab_size)
    assert (counts[9], counts[7], counts[3], counts[5], counts.sum()) == (2, 2, 1, 0, 5)
    draft = cut_student(teacher, [0, 2], 2, counts)
    assert draft.config.n_layers == 2 and not draft.config.tie_embeddings and draft.head_ids.tolist() == [7, 9]
    torch.testing.assert_close(draft.layers[1].state_dict(), teacher.layers[2].state_dict())
    torch.testing.assert_close(draft.lm_head.weight[:2], teacher.embed_tokens.weight[[7, 9]])
    assert draft.lm_head.weight[2].abs().sum() == 0
    with pytest.raises(UsageError, match="--keep-layers 3"):
        cut_student(teacher, [0, 3], 0, counts)
    with pytest.raises(UsageError, match="--head-tokens 4: the data has only 3 distinct target tokens"):
        cut_student(teacher, [0], 4, counts)  # a fourth row would be an arbitrary token never seen


def test_a_draft_cut_from_the_teacher_learns_and_drafts_for_it(tmp_path, tokenizer, chat_file):
    """distill.py --init TEACHER --keep-layers 0 --head-tokens N: trains on chat data from the teacher's
    cache, and as speculative_generate's draft gives the teacher's own greedy output."""
    from common import load_model
    from decoding import speculative_generate
    from sample import generate
    teacher = save_model(tmp_path / "teacher", tokenizer, n_layers=2, dim=32, seed=1)
    build_cache(str(teacher), str(chat_file), str(tmp_path / "cache"), seq_len=63, k=8, temperature=2.0, device="cpu")
    distill(DistillConfig(data=str(chat_file), init=str(teacher), keep_layers="0", head_tokens=20,
                          teacher_cache=str(tmp_path / "cache"), out_dir=str(tmp_path / "out"), seq_len=63,
                          batch_size=4, max_steps=15, lr=3e-3, warmup_steps=1, alpha=1.0, eval_interval=1000,
                          log_interval=5, device="cpu"))
    curve = kd_curve(tmp_path / "out")
    assert curve[-1] < 0.8 * curve[0]
    draft, target = load_model(tmp_path / "out"), load_model(teacher)
    assert draft.config.n_layers == 1 and draft.config.head_tokens == 20 and draft.lm_head.weight.shape[0] == 21
    prompt = torch.tensor(tokenizer.encode_ordinary("user: what is 2 + 3?"))
    with torch.no_grad():
        plain = generate(target, [prompt], 12, temperature=0.0)[0].tolist()
        new, stats = speculative_generate(target, draft, prompt, 12, 2, temperature=0.0)
    assert new.tolist() == plain and stats["drafted"] > 0


def test_cutting_needs_an_init_and_works_on_shards(tmp_path, shards, teacher_dir):
    from common import load_model
    summary = distill(student_config(shards, tmp_path / "cut", init=str(teacher_dir), keep_layers="1", head_tokens=16,
                                     alpha=0.0, max_steps=2))
    cut = load_model(tmp_path / "cut")
    assert (cut.config.n_layers, cut.config.head_tokens) == (1, 16) and math.isfinite(summary["val_bpb"])
    with pytest.raises(UsageError, match="--init"):
        distill(student_config(shards, tmp_path / "out", head_tokens=8, alpha=0.0))
    with pytest.raises(UsageError, match="--keep-layers"):
        distill(student_config(shards, tmp_path / "out", init=str(tmp_path), keep_layers="0,a", alpha=0.0))
