"""rlhf.py: the losses against hand-computed values, the KL estimator against the exact KL, rollouts'
masks, the reward model's head, and short end-to-end runs (GRPO raises the reward of its prompts; the
CLI writes its outputs and resumes exactly)."""
import json
import math

import pytest
import torch

import bpe
from chat import IM_END, PAD, chat_token_ids, pad_batch, tokenize_conversations
from common import load_model, save_checkpoint
from lora import apply_lora
from model import ModelConfig, Transformer
from rlhf import (AdaptiveKLController, GRPOConfig, bradley_terry_loss, clipped_policy_loss, clipped_value_loss,
                  encode_pair, gae, group_advantages, grpo_step, kl_k3, load_reward_model, main, make_reward_model,
                  masked_mean, masked_whiten, pack_rollouts, policy_terms, question_prompt, reference_of,
                  rewards_at_end)
from tasks import arithmetic_problems, preference_pairs, sft_conversations


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(f"What is {a} + {b} + {c}? The answer is {a + b + c}." for a, b, c in
                    [(1, 2, 3), (4, 5, 6), (7, 8, 9), (0, 9, 2)]) * 3 + " user assistant\n"
    return bpe.Tokenizer.train(text, 320)


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                         max_seq_len=64)
    return Transformer(config).eval()


@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    """A tiny random "SFT" checkpoint directory with its tokenizer, as sft.py writes one."""
    path = tmp_path / "sft"
    save_checkpoint(path, tiny_model(tokenizer.vocab_size), tokenizer="tokenizer")
    tokenizer.save(path / "tokenizer")
    return path


TASK = ["--n-terms", "2", "--max-operand", "4", "--n-train", "20", "--n-eval", "2"]  # 25 questions


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, tokenizer):
    """The tiny model taught "The answer is N." on TASK's 20 training questions for 60 steps: it always
    stops and is right about a quarter of the time, so sampled answers get mixed rewards."""
    model = tiny_model(tokenizer.vocab_size)
    examples, _ = tokenize_conversations(tokenizer, sft_conversations(arithmetic_problems(20, "train", n_terms=2,
                                                                                          max_operand=4)), 64)
    inputs, targets, loss_mask = pad_batch(examples, chat_token_ids(tokenizer)[PAD])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(inputs, targets, loss_mask)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("sft")
    save_checkpoint(path, model, tokenizer="tokenizer")
    tokenizer.save(path / "tokenizer")
    return path


# ----------------------------------------------------------------------------------------------------------
# Losses on hand-computed values

def test_bradley_terry_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928, -log sigmoid(-1) = log(1 + e) = 1.313262
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((0.126928 + 1.313262) / 2, abs=1e-6)
    # margin 1: -log sigmoid(1) = 0.313262, -log sigmoid(-2) = 2.126928
    assert bradley_terry_loss(chosen, rejected, margin=1.0).item() == pytest.approx((0.313262 + 2.126928) / 2, abs=1e-6)
    # centering adds c * mean((r_w + r_l)^2) = 0.1 * (4 + 1) / 2
    assert bradley_terry_loss(chosen, rejected, center=0.1).item() == pytest.approx(0.720095 + 0.25, abs=1e-6)
    # the loss sees differences only: shifting both rewards changes nothing (without centering)
    assert bradley_terry_loss(chosen + 5, rejected + 5).item() == pytest.approx(0.720095, abs=1e-6)


def test_gae_hand_computed():
    # row 0: answer at positions 1..3; row 1: answer at 0..1, then padding whose rewards/values must not leak
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0], [0.0, 2.0, 5.0, 5.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3], [1.0, 1.0, 7.0, 7.0]])
    mask = torch.tensor([[0.0, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, gamma lambda = 0.72:
    #   t=3: delta = 1.0 - 0.3 = 0.7                      A = 0.7
    #   t=2: delta = -0.2 + 0.9 * 0.3 - 0.4 = -0.33        A = -0.33 + 0.72 * 0.7 = 0.174
    #   t=1: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04         A = -0.04 + 0.72 * 0.174 = 0.08528
    # row 1: t=1: delta = 2 - 1 = 1, A = 1; t=0: delta = 0 + 0.9 * 1 - 1 = -0.1, A = -0.1 + 0.72 = 0.62
    expected = torch.tensor([[0.0, 0.08528, 0.174, 0.7], [0.62, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, (expected + values) * mask, atol=1e-6, rtol=0)


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.ones(3, 6)
    advantages, returns = gae(rewards, values, mask, gamma=0.7, lam=1.0)
    discounted = torch.stack([sum(0.7 ** (k - t) * rewards[:, k] for k in range(t, 6)) for t in range(6)], 1)
    torch.testing.assert_close(returns, discounted)
    torch.testing.assert_close(advantages, discounted - values)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, std (Bessel) sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal -> 0
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), torch.cat([expected, torch.zeros(4)]))
    a = group_advantages(torch.randn(6 * 5), 5).view(6, 5)
    torch.testing.assert_close(a.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.std(1), torch.ones(6), atol=1e-3, rtol=0)


def test_clipped_objective_equals_unclipped_inside_the_clip_range():
    torch.manual_seed(0)
    old_logp = torch.randn(4, 7)
    logp = (old_logp + torch.empty(4, 7).uniform_(-0.15, 0.15)).requires_grad_()  # ratio in [0.86, 1.16]
    advantages = torch.randn(4, 7)
    loss, clipped = clipped_policy_loss(logp, old_logp, advantages, clip=0.2)
    torch.testing.assert_close(loss, -advantages * torch.exp(logp - old_logp))
    assert clipped.sum() == 0
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -advantages * torch.exp(logp.detach() - old_logp))


def test_clipped_objective_outside_the_range_is_pessimistic_and_stops_the_gradient():
    old_logp = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_policy_loss(logp, old_logp, advantages, clip=0.2)
    # A > 0, ratio 1.5: capped at 1.2; A < 0, ratio 1.5: the unclipped (worse) 1.5 stays;
    # A > 0, ratio 0.5: the unclipped 0.5 stays; A < 0, ratio 0.5: floored at 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    torch.testing.assert_close(clipped, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.5, -0.5, 0.0]))


def test_clipped_value_loss_hand_computed():
    values, old_values, returns = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5]), torch.tensor([0.0, 2.0])
    # row 0: V = 1.0, V_clip = 0.7: max(1.0, 0.49) / 2 = 0.5; row 1: V = 0.5 = V_clip: (1.5)^2 / 2 = 1.125
    torch.testing.assert_close(clipped_value_loss(values, old_values, returns, clip=0.2), torch.tensor([0.5, 1.125]))


def test_k3_is_zero_at_the_reference_nonnegative_and_unbiased():
    logp = torch.randn(100)
    assert kl_k3(logp, logp).abs().max() == 0
    assert (kl_k3(logp, torch.randn(100)) >= 0).all()
    # E_{x ~ p}[k3(x)] = KL(p || q): Monte Carlo over many samples against the exact sum
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(10, generator=g), 0)
    log_q = torch.log_softmax(torch.randn(10, generator=g), 0)
    samples = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=g)
    exact = (log_p.exp() * (log_p - log_q)).sum()
    assert kl_k3(log_p[samples], log_q[samples]).mean().item() == pytest.approx(exact.item(), rel=0.02)


def test_masked_whiten_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, -7.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3 + 5 - 7) / 5)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, -1.0]))
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(w ** 2, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert w[0, 3] == 0 and w[1, 2:].abs().sum() == 0


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(kl=12.0, n=10)  # error clipped to +0.2: beta * (1 + 0.2 * 10 / 100)
    assert ctl.beta == pytest.approx(0.1 * 1.02)
    ctl.update(kl=6.0 * 0.9, n=10)  # error -0.1
    assert ctl.beta == pytest.approx(0.1 * 1.02 * 0.99)
    fixed = AdaptiveKLController(0.1, target=0.0, horizon=100)
    fixed.update(kl=50.0, n=10)
    assert fixed.beta == 0.1


# ----------------------------------------------------------------------------------------------------------
# Rollouts, reference and reward model

def test_pack_rollouts_masks_exactly_the_answer_and_its_end(tokenizer):
    end, pad = chat_token_ids(tokenizer)[IM_END], chat_token_ids(tokenizer)[PAD]
    prompts, answers, stopped = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], [True, False]
    batch = pack_rollouts(prompts, answers, stopped, end, pad, "cpu")
    assert batch.tokens.tolist() == [[5, 6, 7, 10, 11, end], [8, 9, 12, 13, 14, pad]]
    assert batch.lengths.tolist() == [6, 5]
    targets = batch.tokens[:, 1:]
    assert targets[0][batch.mask[0].bool()].tolist() == [10, 11, end]
    assert targets[1][batch.mask[1].bool()].tolist() == [12, 13, 14]  # cut off: no <|im_end|> to learn


def test_kl_penalty_is_zero_when_the_policy_is_the_reference(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    apply_lora(model, r=4, alpha=8)  # B = 0: the policy starts exactly at the reference
    end, pad = chat_token_ids(tokenizer)[IM_END], chat_token_ids(tokenizer)[PAD]
    batch = pack_rollouts([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], [True, False], end, pad, "cpu")
    logp = policy_terms(model, batch, 1.0)[0]
    with reference_of(model, None) as ref:
        ref_logp = policy_terms(ref, batch, 1.0)[0]
    assert masked_mean(kl_k3(logp, ref_logp), batch.mask).item() == 0
    with torch.no_grad():  # once the adapters move, the reference (adapters off) differs and the KL is > 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    logp = policy_terms(model, batch, 1.0)[0]
    with reference_of(model, None) as ref:
        assert torch.equal(policy_terms(ref, batch, 1.0)[0], ref_logp)
    assert masked_mean(kl_k3(logp, ref_logp), batch.mask).item() > 1e-3


def test_reward_is_read_at_the_last_token_whatever_the_padding(tokenizer):
    model = make_reward_model(tiny_model(tokenizer.vocab_size), seed=0)
    row = torch.tensor([[3, 4, 5, 6, 7]])
    alone = rewards_at_end(model, row, torch.tensor([5]))
    padded = torch.cat([row, torch.full((1, 4), 1)], 1)
    batch = torch.cat([padded, torch.tensor([[3, 4, 5, 9, 9, 9, 9, 9, 9]])])
    both = rewards_at_end(model, batch, torch.tensor([5, 9]))
    torch.testing.assert_close(both[0], alone[0])
    assert model(row)[0].shape == (1, 5, 1)


def test_encode_pair_keeps_the_answer_end(tokenizer):
    pair = {"prompt": [{"role": "user", "content": "What is 1 + 2 + 3? " * 10}], "chosen": "The answer is 6.",
            "rejected": "The answer is 7."}
    chosen, rejected, truncated = encode_pair(tokenizer, pair, max_len=24)
    end = chat_token_ids(tokenizer)[IM_END]
    assert truncated and len(chosen) == len(rejected) == 24
    assert chosen[-1] == rejected[-1] == end
    assert tokenizer.decode(chosen[:-1]).endswith("assistant\nThe answer is 6.")


# ----------------------------------------------------------------------------------------------------------
# End to end

def test_grpo_raises_the_reward_of_its_prompts(tokenizer):
    """A toy verifiable reward: 1 when the answer's first token is in the lower half of the vocabulary.
    The policy's exact probability of that event on the training prompts must rise, the KL stay small."""
    model = tiny_model(tokenizer.vocab_size, seed=1)
    with torch.no_grad():  # a peaked output distribution, as a trained model's (at init all are near-uniform)
        model.lm_head.weight.normal_(0, 0.3)
    apply_lora(model, r=8, alpha=16)
    end, pad = chat_token_ids(tokenizer)[IM_END], chat_token_ids(tokenizer)[PAD]
    problems = arithmetic_problems(4, "train")
    prompts = [question_prompt(tokenizer, p) for p in problems]
    half = tokenizer.vocab_size // 2

    def reward(i, answer):
        return float(len(answer) > 0 and answer[0] < half)

    @torch.no_grad()
    def expected_reward():  # P(first answer token < half), averaged over the prompts
        probs = torch.stack([model(torch.tensor([p]))[0][0, -1].softmax(-1) for p in prompts])
        return probs[:, :half].sum(1).mean().item()

    config = GRPOConfig(samples_per_prompt=8, max_new_tokens=3, lr=1e-2, beta=0.01, ppo_epochs=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    before = expected_reward()
    stats = [grpo_step(model, None, optimizer, prompts, reward, config, seed, end, pad) for seed in range(15)]
    after = expected_reward()
    assert 0.2 < before < 0.8
    assert after > before + 0.2 and after > 0.85
    assert 0 < stats[-1]["kl"] < 5.0


def test_reward_cli_learns_toy_preferences_and_round_trips(tmp_path, checkpoint):
    pairs = [{"prompt": f"Say something about {w}.", "chosen": f"yes {w} yes", "rejected": f"no {w} no"}
             for w in ["cats", "dogs", "tea", "rain", "sun", "snow", "maps", "ink", "bread", "salt", "wind", "moss"]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "rm"
    main(["reward", "--init", str(checkpoint), "--data", str(data), "--eval-data", str(data), "--out-dir", str(out),
          "--max-steps", "30", "--batch-size", "6", "--lr", "3e-3", "--warmup-steps", "2", "--eval-interval", "100",
          "--log-interval", "10"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == 1.0 and summary["eval_pairs"] == 12
    assert summary["bt_loss"] < summary["initial_bt_loss"]
    assert (out / "curves.png").exists() and (out / "metrics.jsonl").exists()
    reward_model = load_reward_model(out)
    batch = torch.tensor([[4, 5, 6]])
    assert rewards_at_end(reward_model, batch, torch.tensor([3])).shape == (1,)
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(checkpoint)


def test_grpo_cli_resumes_exactly(tmp_path, sft_checkpoint):
    common = ["--init", str(sft_checkpoint), "--prompts-per-step", "4", "--samples-per-prompt", "4",
              "--max-new-tokens", "8", *TASK, "--eval-interval", "2", "--lr", "1e-2", "--ppo-epochs", "2",
              "--lora-embedding-rank", "1"]  # the embedding adapter is saved and restored with the others
    main(["grpo", *common, "--out-dir", str(tmp_path / "straight"), "--max-steps", "4"])
    main(["grpo", *common, "--out-dir", str(tmp_path / "resumed"), "--max-steps", "2"])
    main(["grpo", *common, "--out-dir", str(tmp_path / "resumed"), "--max-steps", "4", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any(0 < r.get("reward", 0) < 1 for r in rows)  # mixed rewards: the policy did get updates
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["step"] == 4 and summary["eval_problems"] == 2 and summary["answers_sampled"] == 4 * 16
    merged = load_model(tmp_path / "straight")  # the output is an ordinary checkpoint every stage loads
    assert not torch.equal(merged.layers[0].self_attn.q_proj.weight,
                           load_model(sft_checkpoint).layers[0].self_attn.q_proj.weight)


def test_ppo_cli_runs_with_a_learned_reward(tmp_path, sft_checkpoint):
    problems = arithmetic_problems(20, "train", n_terms=2, max_operand=4)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(problems)))
    main(["reward", "--init", str(sft_checkpoint), "--data", str(data), "--out-dir", str(tmp_path / "rm"),
          "--max-steps", "2", "--batch-size", "4"])
    out = tmp_path / "ppo"
    main(["ppo", "--init", str(sft_checkpoint), "--reward-model", str(tmp_path / "rm"), "--out-dir", str(out),
          "--prompts-per-step", "4", "--max-new-tokens", "8", *TASK, "--max-steps", "3",
          "--beta", "0.05", "--target-kl", "0.1", "--log-interval", "1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "pg_loss" in r]
    assert len(train_rows) == 3 and all(math.isfinite(r["vf_loss"]) for r in train_rows)
    assert train_rows[0]["beta"] != 0.05  # the adaptive controller moved beta
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["value_head"]["weight"].shape == (1, 32)


def test_cli_errors_are_one_line(tmp_path, checkpoint, refused):
    """A flag the user can fix exits 2 (argparse's usage code); a file that is not there exits 1."""
    for argv, message, expected_code in (
            (["ppo", "--init", checkpoint, "--out-dir", tmp_path / "x"], "needs --reward-model", 2),
            (["reward", "--init", checkpoint, "--data", tmp_path / "missing.json", "--out-dir", tmp_path / "y"],
             "no such file", 1),
            (["grpo", "--init", checkpoint, "--samples-per-prompt", "1", "--out-dir", tmp_path / "z"],
             "samples-per-prompt must be >= 2", 2),
            (["grpo", "--out-dir", tmp_path / "w"], "--init (the SFT checkpoint to start from) is required", 2)):
        code, err = refused(main, *argv)
        assert code == expected_code and message in err and len(err.strip().splitlines()) == 1, err


def test_reward_cli_resumes_exactly(tmp_path, checkpoint):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(arithmetic_problems(10, "train"))))
    common = ["--init", str(checkpoint), "--data", str(data), "--eval-fraction", "0.2", "--batch-size", "3",
              "--eval-interval", "2", "--lr", "3e-3"]
    main(["reward", *common, "--out-dir", str(tmp_path / "straight"), "--max-steps", "5"])
    main(["reward", *common, "--out-dir", str(tmp_path / "resumed"), "--max-steps", "2"])
    main(["reward", *common, "--out-dir", str(tmp_path / "resumed"), "--max-steps", "5", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
