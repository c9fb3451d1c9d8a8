"""dpo.py: each loss against hand-computed values, the answer-only log-probs, the three kinds of
reference, the ln 2 warning, clear data errors, --resume, and a tiny run that learns its pairs."""
import json
import math

import pytest
import torch

from bpe import Tokenizer
from chat import PAD, answer_ids, chat_token_ids, prompt_ids
from common import load_model, save_checkpoint
from dpo import (LN2, DPOConfig, Reference, batch_loss, evaluate_pairs, fit, hinge_loss, ipo_loss, kto_loss, load_items, main,
                 make_batch, orpo_loss, precompute_reference, sequence_logps, sigmoid_loss, simpo_loss, tokenize_items, train)
from lora import apply_lora
from model import ModelConfig, Transformer
from tasks import arithmetic_problems, preference_pairs, sft_conversations


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def softplus(x):  # -log sigmoid(-x), by hand
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------------------------
# The losses on hand-computed log-probs: chosen -3 (ref -4), rejected -5 (ref -4.5), so h = 1 - (-0.5) = 1.5

PC, PR, RC, RR = t(-3.0), t(-5.0), t(-4.0), t(-4.5)


def test_sigmoid_loss_and_rewards():
    losses, chosen, rejected = sigmoid_loss(PC, PR, RC, RR, beta=0.5)
    assert losses.item() == pytest.approx(softplus(-0.75))          # -log sigmoid(0.5 * 1.5)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.25)


def test_label_smoothed_cdpo_loss():
    losses, _, _ = sigmoid_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * softplus(-0.75) + 0.1 * softplus(0.75))


def test_ipo_and_hinge_losses():
    assert ipo_loss(PC, PR, RC, RR, beta=0.5)[0].item() == pytest.approx((1.5 - 1.0) ** 2)   # target 1 / (2 beta) = 1
    assert ipo_loss(PC, PR, RC, RR, beta=0.25)[0].item() == pytest.approx((1.5 - 2.0) ** 2)
    assert hinge_loss(PC, PR, RC, RR, beta=0.5)[0].item() == pytest.approx(1 - 0.75)
    assert hinge_loss(PC, PR, RC, RR, beta=1.0)[0].item() == 0.0                            # beta h = 1.5 >= 1


def test_simpo_loss_is_reference_free_and_length_normalised():
    losses, chosen, rejected = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-(2.0 * 0.5 - 0.5)))
    assert chosen.item() == pytest.approx(-1.0) and rejected.item() == pytest.approx(-2.0)


def test_orpo_loss():
    # P(chosen) = 0.5: odds 1, log odds 0; P(rejected) = 0.25: odds 1/3. NLL = log 2; odds-ratio term
    # -log sigmoid(0 - log(1/3)) = log(1 + 1/3)
    losses, chosen, _ = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), lam=0.2)
    assert losses.item() == pytest.approx(math.log(2) + 0.2 * math.log(4 / 3))
    assert chosen.item() == pytest.approx(0.2 * math.log(0.5))


def test_kto_loss():
    # r = [0.5, -1]; mismatched log-ratios 0.2, 0.4 -> z0 = 0.3
    losses, rewards, z0 = kto_loss(t(-2.0, -3.0), t(-2.5, -2.0), t(-4.0, -4.0), t(-4.2, -4.4),
                                   torch.tensor([True, False]), beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    assert z0.item() == pytest.approx(0.3)
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.5 - 0.3), 2.0 * (1 - sigmoid(0.3 + 1.0))])
    assert rewards.tolist() == pytest.approx([0.5, -1.0])
    _, _, z0 = kto_loss(t(-2.0), t(-2.5), t(-4.0), t(-3.0), torch.tensor([True]), beta=1.0)
    assert z0.item() == 0.0                                          # a negative KL estimate is clamped to 0


# ----------------------------------------------------------------------------------------------------------
# A tiny model with a trained tokenizer

@pytest.fixture(scope="module")
def tokenizer():
    problems = arithmetic_problems(200, "train")
    text = " ".join(m["content"] for c in sft_conversations(problems) for m in c) + " user assistant The wrong answer"
    return Tokenizer.train(text, vocab_size=300)


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         hidden_dim=64, max_seq_len=64)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("init")
    save_checkpoint(path, tiny_model(tokenizer), tokenizer="tokenizer")
    tokenizer.save(path / "tokenizer")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    pairs = preference_pairs(arithmetic_problems(16, "train", seed=3))
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def run(init_dir, pairs_file, out_dir, **overrides):
    settings = dict(batch_size=4, max_steps=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_interval=100, log_interval=1,
                    device="cpu", max_len=64)
    config = DPOConfig(init=str(init_dir), data=str(pairs_file), val_data=str(pairs_file), out_dir=str(out_dir),
                       **{**settings, **overrides})
    lines = []
    summary = train(config, log=lines.append)
    return summary, lines


@pytest.mark.parametrize("max_prompt_len, kept_prompt", [(0, [6, 7, 8, 9]), (2, [8, 9]), (3, [7, 8, 9])])
def test_a_too_long_pair_keeps_the_prompts_end_then_cuts_the_answer(max_prompt_len, kept_prompt):
    prompt, answer = list(range(10)), [100, 101, 102, 103, 104, 105]
    ids, mask, truncated = fit(prompt, answer, 8, max_prompt_len)  # 16 tokens into 8
    assert truncated and ids == kept_prompt + answer[:8 - len(kept_prompt)]
    assert mask == [0] * len(kept_prompt) + [1] * (8 - len(kept_prompt))
    assert fit(prompt[:2], answer, 8, max_prompt_len) == (prompt[:2] + answer, [0, 0] + [1] * 6, False)
    # a --max-prompt-len above a context-capped max_len still leaves the answer its first token
    assert fit(prompt, answer, 8, 12) == (prompt[-7:] + answer[:1], [0] * 7 + [1], True)


def test_logps_sum_the_answer_tokens_only(tokenizer):
    model = tiny_model(tokenizer)
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "What is 1 + 2 + 3?"}])
    chosen, rejected = answer_ids(tokenizer, "The answer is 6."), answer_ids(tokenizer, "The answer is 7.")
    config = DPOConfig(loss="sigmoid")
    sequences, _ = tokenize_items(tokenizer, [{"prompt": [{"role": "user", "content": "What is 1 + 2 + 3?"}],
                                               "chosen": "The answer is 6.", "rejected": "The answer is 7."}], config, 64)
    batch = make_batch(sequences, [0], chat_token_ids(tokenizer)["<|pad|>"], "cpu")
    logps, n_tokens = sequence_logps(model, batch["inputs"], batch["targets"], batch["loss_mask"])
    assert n_tokens.tolist() == [len(chosen), len(rejected)]
    for row, answer in enumerate((chosen, rejected)):  # by hand: one full sequence, the answer's positions
        ids = torch.tensor([prompt + answer])
        token_logps = model(ids)[0][0].float().log_softmax(-1)
        expected = sum(token_logps[k - 1, ids[0, k]].item() for k in range(len(prompt), len(prompt) + len(answer)))
        assert logps[row].item() == pytest.approx(expected, abs=1e-4)


def test_identical_policy_and_reference_give_ln2_and_zero_rewards(tokenizer, pairs_file):
    config = DPOConfig(loss="sigmoid", beta=0.1)
    items, _ = load_items(str(pairs_file), config)
    sequences, _ = tokenize_items(tokenizer, items, config, 64)
    batch = make_batch(sequences, list(range(6)), chat_token_ids(tokenizer)["<|pad|>"], "cpu")
    policy = tiny_model(tokenizer)
    for reference in (Reference("copy", policy), Reference("cache", policy, {"train": precompute_reference(
            policy, sequences, chat_token_ids(tokenizer)["<|pad|>"], 6, "cpu")})):
        loss, stats = batch_loss(policy, batch, reference, "train", config)
        assert loss.item() == pytest.approx(LN2, abs=1e-6)
        assert stats["rewards/chosen"][0] == pytest.approx(0, abs=1e-5)
        assert stats["rewards/accuracy"][0] == 0  # no pair is preferred yet
    rpo, _ = batch_loss(policy, batch, Reference("copy", policy), "train", DPOConfig(loss="sigmoid", rpo_alpha=0.5))
    logps, n_tokens = sequence_logps(policy, batch["inputs"], batch["targets"], batch["loss_mask"])
    assert rpo.item() == pytest.approx(LN2 + 0.5 * (-logps[:6] / n_tokens[:6]).mean().item(), abs=1e-5)
    apply_lora(policy, r=4)  # adapters start at zero: the base is the reference
    loss, stats = batch_loss(policy, batch, Reference("lora", policy), "train", config)
    assert loss.item() == LN2 or loss.item() == pytest.approx(LN2, abs=1e-6)
    assert stats["max_abs_logratio"][0] == 0.0


def test_lora_reference_is_the_base_model(tokenizer, pairs_file):
    config = DPOConfig(loss="sigmoid")
    items, _ = load_items(str(pairs_file), config)
    sequences, _ = tokenize_items(tokenizer, items, config, 64)
    batch = make_batch(sequences, [0, 1, 2], chat_token_ids(tokenizer)["<|pad|>"], "cpu")
    base = tiny_model(tokenizer)
    expected = sequence_logps(base, batch["inputs"], batch["targets"], batch["loss_mask"])[0]
    policy = tiny_model(tokenizer)
    apply_lora(policy, r=4)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # adapters that change the policy
    policy_logps = sequence_logps(policy, batch["inputs"], batch["targets"], batch["loss_mask"])[0]
    assert not torch.allclose(policy_logps, expected)
    torch.testing.assert_close(Reference("lora", policy).logps(batch, "train"), expected)


def test_precomputed_reference_gives_the_live_losses(init_dir, pairs_file, tmp_path):
    live, _ = run(init_dir, pairs_file, tmp_path / "live")
    cached, lines = run(init_dir, pairs_file, tmp_path / "cached", precompute_ref=True)
    assert any("precomputed" in line for line in lines)
    rows = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    live_losses = [r["loss"] for r in rows("live") if "val_loss" not in r]
    cached_losses = [r["loss"] for r in rows("cached") if "val_loss" not in r]
    assert len(live_losses) == 4 and live_losses[0] == pytest.approx(LN2, abs=1e-6)
    assert cached_losses == pytest.approx(live_losses, abs=1e-5)
    assert cached["val/rewards/accuracy"] == pytest.approx(live["val/rewards/accuracy"])


def test_held_out_reference_is_computed_once_and_matches_a_live_one(init_dir, pairs_file, tmp_path, tokenizer):
    """The held-out pairs' reference log-probs come from one pass before training (step 0's evaluation needs no
    other: the policy is the reference); the final evaluation against them equals one against a live reference."""
    summary, lines = run(init_dir, pairs_file, tmp_path / "out", lora_rank=4, max_steps=6, lr=3e-3)
    assert sum("held-out items" in line for line in lines) == 1
    config = DPOConfig(batch_size=4)
    seqs, _ = tokenize_items(tokenizer, load_items(str(pairs_file), config)[0], config, 64)
    live = evaluate_pairs(load_model(tmp_path / "out"), seqs, Reference("copy", load_model(init_dir)), None,
                          chat_token_ids(tokenizer)[PAD], config, "cpu")
    assert summary["val/rewards/margin"] != 0
    assert summary["val/rewards/margin"] == pytest.approx(live["rewards/margin"], rel=1e-3)
    assert summary["val/rewards/accuracy"] == live["rewards/accuracy"]


def test_training_raises_reward_accuracy_on_its_pairs(init_dir, pairs_file, tmp_path):
    summary, lines = run(init_dir, pairs_file, tmp_path / "out", max_steps=20, lr=5e-3, beta=0.5,
                         eval_interval=10)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[0]["val/rewards/accuracy"] == 0 and evals[0]["val_loss"] == pytest.approx(LN2, abs=1e-6)
    assert evals[-1]["val/rewards/accuracy"] >= 0.75 and evals[-1]["val/rewards/margin"] > 0
    assert evals[-1]["val_loss"] < LN2 - 0.1
    assert summary["val/rewards/accuracy"] == evals[-1]["val/rewards/accuracy"]
    for name in ("ckpt.pt", "summary.json", "loss.png", "rewards.png", "tokenizer.json"):
        assert (tmp_path / "out" / name).exists()
    assert load_model(tmp_path / "out").config.vocab_size == load_model(init_dir).config.vocab_size


SLOW = pytest.mark.slow  # hinge and cDPO share DPO's code path; precompute is tested above


@pytest.mark.parametrize("overrides", [dict(loss="ipo"), pytest.param(dict(loss="hinge"), marks=SLOW), dict(loss="simpo"),
                                       dict(loss="orpo"), pytest.param(dict(loss="sigmoid", label_smoothing=0.1), marks=SLOW),
                                       dict(loss="kto"), dict(loss="sigmoid", lora_rank=4),
                                       dict(loss="sigmoid", lora_rank=4, lora_embedding_rank=1),
                                       pytest.param(dict(loss="kto", precompute_ref=True), marks=SLOW)])
def test_every_loss_and_reference_trains(init_dir, pairs_file, tmp_path, overrides):
    summary, lines = run(init_dir, pairs_file, tmp_path / "out", max_steps=8, lr=3e-3, **overrides)
    assert math.isfinite(summary["loss"])
    assert summary["val/rewards/margin"] > 0  # the chosen (or desirable) answers gained on the others
    if overrides.get("lora_rank"):
        assert "switched off" in lines[0] and (tmp_path / "out" / "adapter.pt").exists()
        assert set(load_model(tmp_path / "out").state_dict()) == set(load_model(init_dir).state_dict())


def test_loss_stuck_at_ln2_warns(init_dir, pairs_file, tmp_path):
    summary, lines = run(init_dir, pairs_file, tmp_path / "out", max_steps=6, lr=0.0, min_lr=0.0, stuck_steps=5)
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1 and "ln 2" in warnings[0] and "lr now 0.00e+00" in warnings[0]
    assert summary["stuck_at_ln2_warning"] is True
    summary, lines = run(init_dir, pairs_file, tmp_path / "moving", max_steps=6, stuck_steps=5)
    assert summary["stuck_at_ln2_warning"] is False


def test_resume_is_bit_exact(init_dir, pairs_file, tmp_path):
    run(init_dir, pairs_file, tmp_path / "whole", max_steps=4, eval_interval=2)

    def crash_at_step_3(line):
        if line.startswith("step 3/"):
            raise KeyboardInterrupt
    config = DPOConfig(init=str(init_dir), data=str(pairs_file), val_data=str(pairs_file),
                       out_dir=str(tmp_path / "resumed"), batch_size=4, max_steps=4, lr=1e-3, min_lr=1e-4,
                       warmup_steps=1, eval_interval=2, log_interval=1, device="cpu", max_len=64)
    with pytest.raises(KeyboardInterrupt):
        train(config, log=crash_at_step_3)
    train(DPOConfig(**{**config.__dict__, "resume": True}), log=lambda line: None)
    whole, resumed = load_model(tmp_path / "whole").state_dict(), load_model(tmp_path / "resumed").state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2, 3, 4, 4]  # train and eval rows, none repeated


# ----------------------------------------------------------------------------------------------------------
# Data

def test_a_bad_flag_is_a_one_line_usage_error(init_dir, pairs_file, tmp_path, refused):
    code, err = refused(main, "--init", init_dir, "--data", pairs_file, "--max-len", 64, "--max-prompt-len", 64,
                        "--out-dir", tmp_path / "out")
    assert code == 2 and err == "error: --max-prompt-len must be in [0, --max-len 64), got 64\n"
    assert not (tmp_path / "out").exists()


def test_bad_record_is_a_one_line_error(init_dir, tmp_path, refused):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n" +
                   json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    code, err = refused(main, "--init", init_dir, "--data", bad, "--out-dir", tmp_path / "out")
    assert code == 1 and err == f"error: {bad}: record 1: missing field 'rejected'\n"
    items, skipped = load_items(str(bad), DPOConfig(skip_bad_records=True))
    assert len(items) == 1 and skipped == 1


def test_demo_data_sets_load(data_dir):
    en, _ = load_items(str(data_dir / "preference" / "dpo_en_demo.json"), DPOConfig())
    zh, _ = load_items(str(data_dir / "preference" / "dpo_zh_demo.json"), DPOConfig())
    assert len(en) == len(zh) == 300
    assert en[0]["prompt"][-1]["role"] == "user" and en[0]["chosen"] != en[0]["rejected"]
    kto, _ = load_items(str(data_dir / "preference" / "kto_en_demo.json"), DPOConfig(loss="kto"))
    assert len(kto) == 300 and {item["label"] for item in kto} == {True, False}
    unpaired = load_items(str(data_dir / "preference" / "dpo_en_demo.json"), DPOConfig(loss="kto"))[0]
    assert len(unpaired) == 600 and sum(item["label"] for item in unpaired) == 300
    with pytest.raises(ValueError, match="needs chosen/rejected pairs"):
        load_items(str(data_dir / "preference" / "kto_en_demo.json"), DPOConfig(loss="sigmoid"))


def test_seeded_generators_and_resume_restore_the_uninterrupted_runs_rng_state(init_dir, pairs_file, tmp_path):
    """Every generator seeded (Python, numpy, torch: not only torch), so what came before in the process does
    not matter; on resume the RNG state is restored after the models are built (building the reference
    draws from torch's generator), so the saved state equals an uninterrupted run's."""
    import random
    import numpy as np
    states = []
    for noise in (1, 2):
        random.seed(noise)
        np.random.seed(noise)
        torch.manual_seed(noise)
        run(init_dir, pairs_file, tmp_path / f"seeded{noise}", max_steps=2, lora_rank=4)
        states.append(torch.load(tmp_path / f"seeded{noise}" / "ckpt.pt", weights_only=False))
    assert states[0]["rng"]["python"] == states[1]["rng"]["python"]
    assert all(np.array_equal(a, b) for a, b in zip(states[0]["rng"]["numpy"][1:2], states[1]["rng"]["numpy"][1:2]))
    assert all(torch.equal(states[0]["lora"][k], states[1]["lora"][k]) for k in states[0]["lora"])  # adapters' init

    run(init_dir, pairs_file, tmp_path / "whole", max_steps=4, eval_interval=2)
    run(init_dir, pairs_file, tmp_path / "resumed", max_steps=2, eval_interval=2)
    run(init_dir, pairs_file, tmp_path / "resumed", max_steps=4, eval_interval=2, resume=True)
    whole, resumed = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["rng"] for d in ("whole", "resumed"))
    assert torch.equal(whole["torch"], resumed["torch"]) and whole["python"] == resumed["python"]
