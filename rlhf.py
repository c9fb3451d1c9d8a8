"""RLHF's last two stages: a reward model from preference pairs, then reinforcement learning of the policy
with PPO against that learned reward, or with GRPO against a verifiable reward (a program checks answers).

    python rlhf.py reward --init out/sft --data arithmetic --out-dir out/rm             # tasks.py's pairs
    python rlhf.py grpo --init out/sft --out-dir out/grpo --max-time 300                # reward = tasks.check
    python rlhf.py ppo --init out/sft --reward-model out/rm --out-dir out/ppo --max-time 300

Reward model (InstructGPT, Ouyang et al. 2022): the SFT model with a scalar head read at the answer's last
token, trained on Bradley-Terry: L = -log sigmoid(r_w - r_l - margin) + center * (r_w + r_l)^2.
PPO (Schulman et al. 2017; the details of Huang et al. 2022): sample answers, score them with the reward
model, give every answer token the reward r_t = -beta (log pi(y_t) - log pi_ref(y_t)) [+ the score on the
last token], turn rewards and a value head's V_t into advantages with GAE (Schulman et al. 2016),
A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, and minimise
    E[max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))] + vf_coef * E[max((V - R)^2, (V_clip - R)^2)] / 2.
GRPO (Shao et al. 2024, DeepSeekMath): no value model; G answers per prompt, A_i = (r_i - mean r) / (std r
+ eps) within the group, the same clipped objective plus beta times the k3 KL estimate
KL_t = pi_ref / pi - log(pi_ref / pi) - 1 in the loss.
The policy trains LoRA adapters by default, so the reference is the same model with its adapters off (one
model in memory). The loop, schedule and checkpoints are training.py's; outputs in --out-dir: ckpt.pt (the
merged policy, or the reward model), the tokenizer, metrics.jsonl, curves.png, summary.json.
"""
import copy
import math
import random
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chat import (IM_END, PAD, ChatDataError, answer_ids, chat_token_ids, load_preference_pairs, prompt_ids)
from common import (UsageError, check_tokenizer, check_trainable, exit_on_error, load_model, load_tokenizer,
                    read_checkpoint, resolve_device)
from evaluate import arithmetic_accuracy
from lora import apply_lora, disable_adapters
from model import ModelConfig, Transformer
from sample import generate
from tasks import arithmetic_problems, check, preference_pairs
from training import (RunConfig, RunDir, TrainingError, check_finite, make_optimizer, opt, parse_config,
                      rng_state, set_lr)

SUBCOMMANDS = ("reward", "ppo", "grpo")


# ----------------------------------------------------------------------------------------------------------
# The losses, each on plain tensors. Shapes: (B, T) per token with mask (B, T), 1 on answer tokens.

def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the masked entries (population std); masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def bradley_terry_loss(r_chosen, r_rejected, margin: float = 0.0, center: float = 0.0):
    """-log sigmoid(r_w - r_l - margin), averaged over pairs, + center * mean((r_w + r_l)^2)."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center:
        loss = loss + center * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation on (B, T) rows whose answer is one contiguous run of mask == 1.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the answer's last token is 0: the episode ends),
    A_t = delta_t + gamma lambda A_{t+1}. Returns (advantages, returns = advantages + values), 0 off the mask.

    Example, one answer of 3 tokens, the score 1.0 on the last, gamma = 1, lambda = 0.5:
        rewards [0, 0, 1], values [0.5, 0.5, 0.5]
        delta   [0 + 0.5 - 0.5, 0 + 0.5 - 0.5, 1 + 0 - 0.5] = [0, 0, 0.5]
        A       [0 + 0.5 * 0.25, 0 + 0.5 * 0.5, 0.5] = [0.125, 0.25, 0.5]   (from the end backwards)
        returns A + V = [0.625, 0.75, 1.0]
    The score reaches earlier tokens shrunk by (gamma lambda) per step; with lambda = 1 every A_t would be
    1 - V_t (Monte Carlo), with lambda = 0 only delta_t (one-step TD)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    T = rewards.size(1)
    for t in reversed(range(T)):
        going_on = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)   # 1 if token t+1 is in the answer
        next_value = values[:, t + 1] * going_on if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * going_on
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """GRPO: rewards (n_prompts * G,), consecutive groups of G answers to one prompt -> (r - mean) / (std + eps)
    within each group (std with Bessel's correction, as TRL's GRPOTrainer). A group of equal rewards gets 0.

    Example, 2 prompts, G = 4 answers each, reward 1 for a right answer:
        rewards [1, 0, 0, 0,  1, 1, 1, 1]
        group 1: mean 0.25, std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 -> [1.5, -0.5, -0.5, -0.5] (eps aside)
        group 2: all right, std 0 -> [0, 0, 0, 0]: nothing to learn from a prompt every answer solves
    The one right answer among wrong ones is pushed up three times as hard as each wrong one is pushed down;
    the advantages of a group sum to 0."""
    grouped = rewards.view(-1, group_size)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).flatten()


def clipped_policy_loss(logp, old_logp, advantages, clip: float):
    """Per-token PPO surrogate max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) and whether it clipped."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_value_loss(values, old_values, returns, clip: float):
    """Per-token 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    values_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || pi_ref) from samples of pi: exp(d) - d - 1 with d = log pi_ref - log pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n / self.horizon


# ----------------------------------------------------------------------------------------------------------
# Models: log-probabilities of answers, the scalar head of the reward model, the value head

def token_logprobs(logits, tokens, temperature: float = 1.0):
    """logits (B, T-1, V) of inputs tokens[:, :-1] -> (log p(tokens[:, 1:]) (B, T-1), entropy (B, T-1))."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def forward_with_hidden(model: Transformer, idx):
    """(logits, hidden): hidden (B, T, dim) is the final norm's output, what the LM head (or a value head) reads."""
    captured = {}
    handle = model.norm.register_forward_hook(lambda module, inputs, output: captured.update(hidden=output))
    try:
        logits, _ = model(idx)
    finally:
        handle.remove()
    return logits, captured["hidden"]


def make_reward_model(model: Transformer, seed: int) -> Transformer:
    """Replace the LM head by a linear map to one scalar (init N(0, 1/(dim+1)), as Stiennon et al. 2020)."""
    head = nn.Linear(model.config.dim, 1, bias=False, device=model.embed_tokens.weight.device)
    nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.dim + 1), generator=torch.Generator().manual_seed(seed))
    model.lm_head = head
    return model


def load_reward_model(path, device="cpu") -> Transformer:
    ckpt = read_checkpoint(path)
    if not ckpt.get("reward_model"):
        raise ValueError(f"{path}: not a reward model (write one with `python rlhf.py reward`)")
    model = make_reward_model(Transformer(ModelConfig(**ckpt["model_config"])), seed=0)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def rewards_at_end(reward_model: Transformer, tokens, lengths):
    """tokens (B, T) right-padded, lengths (B,) -> the scalar at each row's last token (B,)."""
    scores, _ = reward_model(tokens)                                     # (B, T, 1)
    return scores[torch.arange(tokens.size(0)), lengths - 1, 0].float()


def reference_of(model, ref_model):
    """The frozen reference: the same model with its adapters disabled, or a separate frozen copy."""
    return nullcontext(ref_model) if ref_model is not None else disable_adapters(model)


# ----------------------------------------------------------------------------------------------------------
# Rollouts

@dataclass
class Rollouts:
    tokens: torch.Tensor       # (B, T) prompt + answer (+ <|im_end|>), right-padded
    mask: torch.Tensor         # (B, T-1) 1 where the target tokens[:, 1:] is an answer token
    lengths: torch.Tensor      # (B,) prompt + answer length of each row
    answers: list              # [list of answer ids, without <|im_end|>]
    stopped: torch.Tensor      # (B,) bool: the answer ended with <|im_end|>


def pack_rollouts(prompts, answers, stopped, end_id: int, pad_id: int, device) -> Rollouts:
    """Right-pad prompt + answer (+ <|im_end|> when the answer stopped) into one batch; causal attention
    means the padding on the right changes nothing before it."""
    rows = [p + a + ([end_id] if s else []) for p, a, s in zip(prompts, answers, stopped)]
    T = max(map(len, rows))
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T - 1))
    for i, (p, row) in enumerate(zip(prompts, rows)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(p) - 1:len(row) - 1] = 1                         # targets tokens[len(p):len(row)]
    return Rollouts(tokens.to(device), mask.to(device), torch.tensor(list(map(len, rows)), device=device),
                    answers, torch.tensor(stopped, device=device))


@torch.no_grad()
def sample_answers(model, prompts, max_new_tokens: int, temperature: float, seed: int, end_id: int):
    """Sample one answer per prompt -> (answers without <|im_end|>, stopped flags)."""
    was_training = model.training
    model.eval()
    budget = min(max_new_tokens, model.config.max_seq_len - max(map(len, prompts)))
    # (adapters stay unmerged: merging and unmerging would round the frozen weights, i.e. move the reference)
    new = generate(model, prompts, budget, temperature=temperature, seed=seed, stop_tokens=[end_id])
    model.train(was_training)
    return [t.tolist() for t in new], [len(t) < budget for t in new]


def greedy_accuracy(model, tokenizer, problems, max_new_tokens: int) -> dict:
    """Held-out accuracy of greedy answers (evaluate.arithmetic_accuracy, tasks.check) and the stop rate."""
    was_training = model.training
    model.eval()
    metrics = arithmetic_accuracy(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=128, problems=problems)
    model.train(was_training)
    return {"accuracy": metrics["arith_acc_0shot"], "stop_rate": metrics["arith_stop_rate"]}


def question_prompt(tokenizer, problem) -> list[int]:
    return prompt_ids(tokenizer, [{"role": "user", "content": problem["question"]}])


# ----------------------------------------------------------------------------------------------------------
# One RL step of each algorithm (the CLI below loops over them)

def policy_terms(model, batch: Rollouts, temperature: float, value_head=None):
    """Per-token log-probabilities, entropies and (with a value head) values of the answer tokens, (B, T-1)."""
    if value_head is None:
        logits, _ = model(batch.tokens[:, :-1])
        return (*token_logprobs(logits, batch.tokens, temperature), None)
    logits, hidden = forward_with_hidden(model, batch.tokens[:, :-1])
    return (*token_logprobs(logits, batch.tokens, temperature), value_head(hidden).squeeze(-1).float())


def minibatch_indices(n: int, minibatches: int, generator) -> list:
    order = torch.randperm(n, generator=generator)
    return [chunk for chunk in order.chunk(minibatches) if chunk.numel()]


def select(batch: Rollouts, rows) -> Rollouts:
    rows_list = rows.tolist()
    return Rollouts(batch.tokens[rows], batch.mask[rows], batch.lengths[rows], [batch.answers[i] for i in rows_list],
                    batch.stopped[rows])


def optimizer_step(params, optimizer, loss, grad_clip: float) -> float:
    """Backward, clip, step: one update of a minibatch (an RL step makes several); returns the grad norm."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def grpo_step(model, ref_model, optimizer, prompts, reward_fn, config, seed: int, end_id: int, pad_id: int) -> dict:
    """Sample G answers per prompt, reward them, update the policy on the group-relative advantages.

    reward_fn(prompt_index, answer_ids) -> float. Returns the step's statistics."""
    G = config.samples_per_prompt
    device = model.embed_tokens.weight.device
    expanded = [p for p in prompts for _ in range(G)]                  # groups of G consecutive rows
    answers, stopped = sample_answers(model, expanded, config.max_new_tokens, config.temperature, seed, end_id)
    rewards = torch.tensor([float(reward_fn(i // G, a)) for i, a in enumerate(answers)], device=device)
    advantages = group_advantages(rewards, G, config.group_eps)       # (B,)
    batch = pack_rollouts(expanded, answers, stopped, end_id, pad_id, device)
    with torch.no_grad():
        old_logp = policy_terms(model, batch, config.temperature)[0]
        with reference_of(model, ref_model) as ref:
            ref_logp = policy_terms(ref, batch, config.temperature)[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(config.ppo_epochs):
        for rows in minibatch_indices(len(answers), config.minibatches, generator):
            mb = select(batch, rows)
            logp, entropy, _ = policy_terms(model, mb, config.temperature)
            pg, clipped = clipped_policy_loss(logp, old_logp[rows], advantages[rows, None], config.clip)
            kl = kl_k3(logp, ref_logp[rows])
            # DeepSeekMath's 1/|o_i|: the mean over each answer's tokens, then over answers
            loss = masked_mean(pg + config.beta * kl, mb.mask, dim=1).mean()
            grad_norm = optimizer_step(params, optimizer, loss + model.router_loss(), config.grad_clip)
            stats.append({"loss": loss.item(), "kl": masked_mean(kl.detach(), mb.mask).item(),
                          "clipfrac": masked_mean(clipped, mb.mask).item(),
                          "entropy": masked_mean(entropy.detach(), mb.mask).item(), "grad_norm": grad_norm})
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    return {**out, "reward": rewards.mean().item(), "answer_len": batch.mask.sum(1).mean().item(),
            "stop_rate": batch.stopped.float().mean().item(),
            "solved_groups": (rewards.view(-1, G).std(1) > 0).float().mean().item()}


def ppo_step(model, ref_model, value_head, reward_model, optimizer, prompts, config, kl_ctl: AdaptiveKLController,
             reward_norm: tuple, seed: int, end_id: int, pad_id: int) -> dict:
    """Sample answers, score them with the reward model, GAE, then clipped policy and value updates."""
    device = model.embed_tokens.weight.device
    answers, stopped = sample_answers(model, prompts, config.max_new_tokens, config.temperature, seed, end_id)
    batch = pack_rollouts(prompts, answers, stopped, end_id, pad_id, device)
    B = len(answers)
    with torch.no_grad():
        old_logp, _, old_values = policy_terms(model, batch, config.temperature, value_head)
        with reference_of(model, ref_model) as ref:
            ref_logp = policy_terms(ref, batch, config.temperature)[0]
        rm_scores = rewards_at_end(reward_model, batch.tokens, batch.lengths)
        scores = (rm_scores - reward_norm[0]) / reward_norm[1]
        scores = torch.where(batch.stopped, scores, torch.full_like(scores, config.missing_end_penalty))
        kl = (old_logp - ref_logp) * batch.mask                       # k1 per token: its sum is the sequence's KL
        rewards = -kl_ctl.beta * kl
        last = batch.lengths - 2                                      # the target index of each row's last token
        rewards[torch.arange(B), last] += scores
        advantages, returns = gae(rewards, old_values * batch.mask, batch.mask, config.gamma, config.lam)
        advantages = masked_whiten(advantages, batch.mask)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(config.ppo_epochs):
        for rows in minibatch_indices(B, config.minibatches, generator):
            mb = select(batch, rows)
            logp, entropy, values = policy_terms(model, mb, config.temperature, value_head)
            pg, clipped = clipped_policy_loss(logp, old_logp[rows], advantages[rows], config.clip)
            vf = clipped_value_loss(values, old_values[rows], returns[rows], config.value_clip)
            pg_loss, vf_loss = masked_mean(pg, mb.mask), masked_mean(vf, mb.mask)
            grad_norm = optimizer_step(params, optimizer, pg_loss + config.vf_coef * vf_loss + model.router_loss(),
                                       config.grad_clip)
            stats.append({"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
                          "clipfrac": masked_mean(clipped, mb.mask).item(),
                          "entropy": masked_mean(entropy.detach(), mb.mask).item(), "grad_norm": grad_norm})
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    sequence_kl = kl.sum(1).mean().item()
    kl_ctl.update(sequence_kl, B)
    return {**out, "rm_score": rm_scores.mean().item(), "score": scores.mean().item(), "kl": sequence_kl,
            "beta": kl_ctl.beta, "answer_len": batch.mask.sum(1).mean().item(),
            "stop_rate": batch.stopped.float().mean().item(), "answers": answers}


# ----------------------------------------------------------------------------------------------------------
# Configs: one per subcommand, on common.RunConfig; the RL ones share RLConfig's fields

@dataclass
class RewardConfig(RunConfig):
    init: str = opt("", "the model to start from (an SFT checkpoint directory); its LM head becomes a scalar head")
    data: str = opt("arithmetic", "comma-separated preference files (dpo.py's formats), or 'arithmetic' for "
                                  "tasks.py's right-vs-wrong answer pairs")
    eval_data: str = opt("", "held-out preference files (default: --eval-fraction of --data; for 'arithmetic' "
                             "the pairs of the test split)")
    eval_fraction: float = opt(0.1, "share of --data held out when --eval-data is not given")
    out_dir: str = opt("out/rm", "where the reward model, metrics and summary go")
    tokenizer: str = opt("", "tokenizer file (default: the one beside --init)")
    max_len: int = opt(256, "longest prompt + answer in tokens (the prompt is cut from the left first)")
    n_problems: int = opt(800, "arithmetic: train-split problems to make pairs from")
    pairs_per_problem: int = opt(4, "arithmetic: wrong answers (pairs) per problem")
    n_eval_problems: int = opt(100, "arithmetic: test-split problems to evaluate on")
    margin: float = opt(0.0, "Bradley-Terry margin: -log sigmoid(r_w - r_l - margin)")
    center: float = opt(0.01, "weight of the centering term (r_w + r_l)^2 (0: off)")
    lora_rank: int = opt(0, "LoRA rank on the trunk (0: fine-tune everything)")
    lora_alpha: float = opt(16.0, "LoRA alpha")
    batch_size: int = opt(16, "pairs per step")
    # the reward model's defaults of RunConfig's options (their help is RunConfig's)
    max_steps: int = 400
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_interval: int = 100


@dataclass
class RLConfig(RunConfig):
    init: str = opt("", "the policy to start from (an SFT checkpoint directory); also the frozen reference")
    out_dir: str = opt("out/rl", "where the policy, metrics and summary go")
    tokenizer: str = opt("", "tokenizer file (default: the one beside --init)")
    # the task: tasks.py's arithmetic
    n_terms: int = opt(3, "arithmetic: numbers per question")
    max_operand: int = opt(9, "arithmetic: largest number")
    n_train: int = opt(800, "train-split problems the prompts are drawn from")
    n_eval: int = opt(100, "held-out (test split) problems for greedy accuracy")
    # rollouts
    prompts_per_step: int = opt(16, "prompts sampled per step")
    samples_per_prompt: int = opt(1, "answers sampled per prompt (GRPO's group size G)")
    max_new_tokens: int = opt(16, "longest sampled answer")
    temperature: float = opt(1.0, "sampling temperature (the log-probabilities use the same)")
    # the objective
    beta: float = opt(0.05, "KL penalty coefficient (to the reference)")
    clip: float = opt(0.2, "PPO clip range eps: ratio kept in [1 - eps, 1 + eps]")
    ppo_epochs: int = opt(1, "passes over each batch of rollouts")
    minibatches: int = opt(1, "minibatches per pass")
    # the policy
    lora_rank: int = opt(16, "LoRA rank of the policy (0: full fine-tuning against a frozen copy)")
    lora_alpha: float = opt(32.0, "LoRA alpha")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "layers to adapt")
    lora_embedding_rank: int = opt(0, "with --lora-rank: rank of an adapter on the token embedding (and a tied head)")
    # the RL defaults of RunConfig's options (their help is RunConfig's)
    max_steps: int = opt(200, "RL steps (each: rollouts, then the updates; the cosine schedule ends here)")
    lr: float = 2e-3
    min_lr: float = 2e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    eval_interval: int = 20
    log_interval: int = 5


@dataclass
class GRPOConfig(RLConfig):  # a field declared without opt() changes RLConfig's default only
    out_dir: str = "out/grpo"
    samples_per_prompt: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-3
    group_eps: float = opt(1e-4, "added to the group's std in the advantage")


@dataclass
class PPOConfig(RLConfig):
    out_dir: str = "out/ppo"
    reward_model: str = opt("", "the reward model (a directory written by `rlhf.py reward`)")
    prompts_per_step: int = 32
    ppo_epochs: int = 2
    minibatches: int = 2
    beta: float = opt(0.2, "initial KL penalty coefficient (0.05 let the policy hack the reward model: README)")
    lr: float = 1e-3
    min_lr: float = 1e-3
    target_kl: float = opt(0.0, "adaptive KL controller's target per answer (0: fixed beta)")
    kl_horizon: int = opt(10000, "adaptive KL controller's horizon (answers)")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    vf_coef: float = opt(0.1, "weight of the value loss")
    value_clip: float = opt(0.2, "value clip range")
    missing_end_penalty: float = opt(-1.0, "score of an answer cut off before <|im_end|> (replaces the RM's)")
    normalize_reward: bool = opt(True, "scale RM scores to mean 0, std 1 on the SFT policy's answers at the start")


PRESETS = {"reward": {}, "ppo": {}, "grpo": {}}
CONFIGS = {"reward": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig}


# ----------------------------------------------------------------------------------------------------------
# Shared plumbing of the three commands

def load_tokenizer_for(config):
    tokenizer = load_tokenizer(config.init, config.tokenizer or None)
    check_tokenizer(config.init, tokenizer, config.tokenizer or None)
    chat_token_ids(tokenizer)  # a clear error now if the chat special tokens are missing
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# rlhf.py reward

def load_pairs(paths: str) -> list:
    pairs = []
    for path in filter(None, (p.strip() for p in paths.split(","))):
        found, _ = load_preference_pairs(path)
        print(f"{path}: {len(found):,} preference pairs")
        pairs += found
    if not pairs:
        raise TrainingError(f"no preference pairs in {paths!r}")
    return pairs


def reward_data(config: RewardConfig) -> tuple[list, list]:
    """(train pairs, held-out pairs) as {"prompt", "chosen", "rejected"}."""
    if config.data == "arithmetic":
        problems = arithmetic_problems(config.n_problems, split="train")
        train = [pair for k in range(config.pairs_per_problem) for pair in preference_pairs(problems, seed=k)]
        held_out = preference_pairs(arithmetic_problems(config.n_eval_problems, split="test"), seed=0)
    else:
        train = load_pairs(config.data)
        if config.eval_data:
            held_out = load_pairs(config.eval_data)
        else:
            random.Random(config.seed).shuffle(train)
            n_eval = max(1, int(len(train) * config.eval_fraction))
            held_out, train = train[:n_eval], train[n_eval:]
    if config.eval_data and config.data == "arithmetic":
        held_out = load_pairs(config.eval_data)
    return train, held_out


def encode_pair(tokenizer, pair, max_len: int) -> tuple[list, list, bool]:
    """(chosen ids, rejected ids, truncated): prompt + answer + <|im_end|>; a long prompt loses its start,
    then a long answer its end (at least half of max_len stays for the answer)."""
    prompt = prompt_ids(tokenizer, pair["prompt"])
    out, truncated = [], False
    for answer in (pair["chosen"], pair["rejected"]):
        ids = answer_ids(tokenizer, answer)
        keep_prompt = max(max_len - len(ids), max_len // 2)
        p = prompt[-keep_prompt:]
        full = (p + ids)[:max_len]
        truncated |= len(full) < len(prompt) + len(ids)
        out.append(full)
    return out[0], out[1], truncated


def pair_batch(encoded, pad_id: int, device):
    """Chosen rows then rejected rows, right-padded: (tokens (2B, T), lengths (2B,))."""
    rows = [c for c, _ in encoded] + [r for _, r in encoded]
    T = max(map(len, rows))
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
    return tokens.to(device), torch.tensor(list(map(len, rows)), device=device)


def pair_rewards(model, encoded, pad_id: int, device):
    tokens, lengths = pair_batch(encoded, pad_id, device)
    r = rewards_at_end(model, tokens, lengths)
    return r[:len(encoded)], r[len(encoded):]


@torch.no_grad()
def evaluate_reward_model(model, encoded, pad_id: int, device, batch_size: int = 32) -> dict:
    """Pairwise accuracy (r_w > r_l), mean Bradley-Terry loss and the reward distribution on `encoded`."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(encoded), batch_size):
        c, r = pair_rewards(model, encoded[i:i + batch_size], pad_id, device)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"accuracy": (chosen > rejected).float().mean().item(),
            "bt_loss": bradley_terry_loss(chosen, rejected).item(),
            "chosen_mean": chosen.mean().item(), "chosen_std": chosen.std().item() if len(chosen) > 1 else 0.0,
            "rejected_mean": rejected.mean().item(),
            "rejected_std": rejected.std().item() if len(rejected) > 1 else 0.0,
            "margin_mean": (chosen - rejected).mean().item()}


def train_reward_model(config: RewardConfig) -> dict:
    if not config.init:
        raise UsageError("--init (the SFT checkpoint the reward model starts from) is required")
    run = RunDir(config, "reward")
    if run.finished:
        return run.finished
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer_for(config)
    pad_id = chat_token_ids(tokenizer)[PAD]
    train_pairs, eval_pairs = reward_data(config)
    encoded = [encode_pair(tokenizer, p, config.max_len) for p in train_pairs]
    eval_encoded = [encode_pair(tokenizer, p, config.max_len) for p in eval_pairs]
    n_truncated = sum(t for *_, t in encoded + eval_encoded)
    encoded, eval_encoded = [(c, r) for c, r, _ in encoded], [(c, r) for c, r, _ in eval_encoded]
    print(f"{len(encoded):,} training pairs, {len(eval_encoded):,} held out ({n_truncated} truncated to "
          f"--max-len {config.max_len})")

    model = load_model(config.init, device=device)
    check_trainable(model, config.init, config.lora_rank)
    model = make_reward_model(model, config.seed)
    model.config.max_seq_len = max(model.config.max_seq_len, config.max_len)
    if config.lora_rank:
        apply_lora(model, r=config.lora_rank, alpha=config.lora_alpha)
        model.lm_head.requires_grad_(True)  # the new head always trains
    optimizer = make_optimizer(model, config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    order = torch.Generator().manual_seed(config.seed)
    permutation, position = torch.randperm(len(encoded), generator=order).tolist(), 0

    if run.resuming:
        ckpt = run.checkpoint
        run.check_model(model.config)
        model.load_state_dict(ckpt["train_state"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        order.set_state(ckpt["order"])
        permutation, position = ckpt["permutation"], ckpt["position"]
    step = run.start()
    tokenizer.save(run.path / "tokenizer")

    def save():
        run.save_checkpoint(model, lora=bool(config.lora_rank), reward_model=True, train_state=model.state_dict(),
                            optimizer=optimizer.state_dict(), order=order.get_state(), permutation=permutation,
                            position=position, rng=rng_state(), step=step, elapsed=run.elapsed(),
                            reward_config=asdict(config), tokenizer="tokenizer")

    @run.timed_eval
    def run_eval():
        metrics = evaluate_reward_model(model, eval_encoded, pad_id, device)
        print(f"eval step {step}: held-out accuracy {metrics['accuracy']:.1%} | BT loss {metrics['bt_loss']:.4f} | "
              f"reward chosen {metrics['chosen_mean']:+.3f} +- {metrics['chosen_std']:.3f}, rejected "
              f"{metrics['rejected_mean']:+.3f} +- {metrics['rejected_std']:.3f}")
        run.record({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
        run.plot("curves.png", {key: [key] for key in ("loss", "accuracy", "eval_accuracy")})
        return metrics

    initial = run_eval() if step == 0 else {k[5:]: v for k, v in run.rows()[0].items() if k.startswith("eval_")}
    model.train()
    while not (stop_reason := run.stop_reason(step)):
        lr = set_lr(optimizer, config, step, run.elapsed())
        rows = []
        while len(rows) < config.batch_size:
            if position >= len(permutation):
                permutation, position = torch.randperm(len(encoded), generator=order).tolist(), 0
            rows.append(encoded[permutation[position]])
            position += 1
        # forward: the Bradley-Terry loss of the pairs' rewards
        r_chosen, r_rejected = pair_rewards(model, rows, pad_id, device)
        loss = bradley_terry_loss(r_chosen, r_rejected, config.margin, config.center)
        # backward, clip, step
        grad_norm = optimizer_step(params, optimizer, loss + model.router_loss(), config.grad_clip)
        check_finite(loss.item(), step, run.ckpt_path)
        step += 1
        # log
        accuracy = (r_chosen > r_rejected).float().mean().item()
        if step % config.log_interval == 0:
            step_time, _, eta = run.lap(step)
            run.log_step(step, eta, [f"loss {loss.item():.4f}", f"batch accuracy {accuracy:.0%}", f"lr {lr:.2e}",
                                     f"grad norm {grad_norm:.3f}", f"{step_time * 1000:.0f} ms/step"],
                         {"loss": loss.item(), "accuracy": accuracy, "lr": lr, "grad_norm": grad_norm})
        if run.eval_due(step):
            run_eval()
            save()

    final = run_eval()
    save()
    summary = {**{f"initial_{k}": v for k, v in initial.items()}, **final, "train_pairs": len(encoded),
               "eval_pairs": len(eval_encoded), "truncated": n_truncated}
    return run.finish(summary, step, stop_reason, device, f"held-out pairwise accuracy {initial['accuracy']:.1%} -> "
                      f"{final['accuracy']:.1%} on {len(eval_encoded)} pairs")


# ----------------------------------------------------------------------------------------------------------
# rlhf.py ppo | grpo

def reinforce(config: RLConfig, algorithm: str) -> dict:
    if not config.init:
        raise UsageError("--init (the SFT checkpoint to start from) is required")
    if algorithm == "ppo" and not config.reward_model:
        raise UsageError("ppo needs --reward-model (a directory written by `rlhf.py reward`)")
    if algorithm == "grpo" and config.samples_per_prompt < 2:
        raise UsageError(f"--samples-per-prompt must be >= 2 for GRPO's group statistics, got "
                         f"{config.samples_per_prompt}")
    run = RunDir(config, algorithm)
    if run.finished:
        return run.finished
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer_for(config)
    special = chat_token_ids(tokenizer)
    end_id, pad_id = special[IM_END], special[PAD]
    train_problems = arithmetic_problems(config.n_train, "train", n_terms=config.n_terms, max_operand=config.max_operand)
    eval_problems = arithmetic_problems(config.n_eval, "test", n_terms=config.n_terms, max_operand=config.max_operand)

    model = load_model(config.init, device=device)
    check_trainable(model, config.init, config.lora_rank)
    ref_model = None
    if config.lora_rank:
        counts = apply_lora(model, config.lora_targets.split(","), config.lora_rank, config.lora_alpha,
                            embedding_rank=config.lora_embedding_rank)
    else:
        ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        counts = {"trainable": model.num_params(), "total": model.num_params()}
    print(f"policy: {counts['total'] / 1e6:.2f}M parameters, {counts['trainable'] / 1e6:.3f}M trainable"
          + (f" (LoRA r={config.lora_rank}; the reference is the model with adapters off)" if config.lora_rank
             else " (full fine-tuning; the reference is a frozen copy)"))
    modules = nn.ModuleDict({"policy": model})
    value_head = reward_model = None
    if algorithm == "ppo":
        value_head = nn.Linear(model.config.dim, 1).to(device)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        modules["value_head"] = value_head
        reward_model = load_reward_model(config.reward_model, device).requires_grad_(False)
    optimizer = make_optimizer(modules, config, device)
    kl_ctl = AdaptiveKLController(config.beta, getattr(config, "target_kl", 0.0), getattr(config, "kl_horizon", 1))

    reward_norm = (0.0, 1.0)
    if run.resuming:
        ckpt = run.checkpoint
        run.load_weights(model, lora=bool(config.lora_rank))
        if value_head is not None:
            value_head.load_state_dict(ckpt["value_head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        reward_norm, kl_ctl.beta = ckpt["reward_norm"], ckpt["beta"]
    step = run.start()
    tokenizer.save(run.path / "tokenizer")

    def save():
        extra = {"value_head": value_head.state_dict()} if value_head is not None else {}
        run.save_checkpoint(model, lora=bool(config.lora_rank), optimizer=optimizer.state_dict(), rng=rng_state(),
                            step=step, elapsed=run.elapsed(), reward_norm=reward_norm, beta=kl_ctl.beta,
                            tokenizer="tokenizer", **{f"{algorithm}_config": asdict(config)}, **extra)

    def step_problems(k: int) -> list:  # a function of (seed, step) only, so --resume draws the same prompts
        return random.Random(f"{config.seed}:{k}").sample(train_problems, config.prompts_per_step)

    @run.timed_eval
    def run_eval():
        metrics = greedy_accuracy(model, tokenizer, eval_problems, config.max_new_tokens)
        print(f"eval step {step}: held-out greedy accuracy {metrics['accuracy']:.1%} on {len(eval_problems)} "
              f"problems | stop rate {metrics['stop_rate']:.0%}")
        run.record({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
        keys = ["reward", "kl", "entropy", "eval_accuracy"] if algorithm == "grpo" else \
            ["score", "train_accuracy", "kl", "eval_accuracy"]
        run.plot("curves.png", {key: [key] for key in keys})
        return metrics

    if algorithm == "ppo" and step == 0 and config.normalize_reward:
        reward_norm = calibrate_reward(model, reward_model, tokenizer, [p for k in range(4) for p in step_problems(-1 - k)],
                                       config, end_id, pad_id)
        print(f"reward model scores on the SFT policy's answers: mean {reward_norm[0]:+.3f}, std {reward_norm[1]:.3f} "
              f"(used to normalise)")
    initial = run_eval() if step == 0 else {k[5:]: v for k, v in run.rows()[0].items() if k.startswith("eval_")}
    model.train()
    while not (stop_reason := run.stop_reason(step)):
        lr = set_lr(optimizer, config, step, run.elapsed())
        problems = step_problems(step)
        prompts = [question_prompt(tokenizer, p) for p in problems]
        seed = config.seed * 1_000_003 + step
        # rollouts, rewards, then forward / backward / clip / step on each minibatch (grpo_step, ppo_step)
        if algorithm == "grpo":
            stats = grpo_step(model, ref_model, optimizer, prompts,
                              lambda i, ids: check(problems[i], tokenizer.decode(ids)), config, seed, end_id, pad_id)
        else:
            stats = ppo_step(model, ref_model, value_head, reward_model, optimizer, prompts, config, kl_ctl, reward_norm,
                             seed, end_id, pad_id)
            answers = stats.pop("answers")
            stats["train_accuracy"] = sum(check(p, tokenizer.decode(a)) for p, a in zip(problems, answers)) / len(problems)
        check_finite(stats.get("loss", stats.get("pg_loss")), step, run.ckpt_path)
        step += 1
        # log (a row every step: rewards and KL are noisy)
        row = {"lr": lr, **stats}
        if step % config.log_interval == 0:
            step_time, _, eta = run.lap(step)
            main_stats = [f"reward {stats['reward']:.3f}"] if algorithm == "grpo" else \
                [f"RM score {stats['score']:+.3f}", f"checker accuracy {stats['train_accuracy']:.0%}"]
            run.log_step(step, eta, [*main_stats, f"KL {stats['kl']:.4f}", f"entropy {stats['entropy']:.3f}",
                                     f"clipfrac {stats['clipfrac']:.3f}", f"answer {stats['answer_len']:.1f} tokens",
                                     f"{step_time:.2f} s/step"], row)
        else:
            run.record_step(step, row)
        if run.eval_due(step):
            run_eval()
            save()

    final = run_eval()
    save()
    train_rows = [r for r in run.rows() if "kl" in r]
    first, last = train_rows[:10], train_rows[-10:]
    key = "reward" if algorithm == "grpo" else "score"

    def mean(rs, k):
        return sum(r[k] for r in rs) / max(len(rs), 1)
    summary = {"initial_accuracy": initial["accuracy"], "final_accuracy": final["accuracy"],
               "eval_problems": len(eval_problems), "prompts_seen": step * config.prompts_per_step,
               "answers_sampled": step * config.prompts_per_step * config.samples_per_prompt,
               f"{key}_first10": mean(first, key), f"{key}_last10": mean(last, key),
               "kl_last10": mean(last, "kl"), "kl_max": max((r["kl"] for r in train_rows), default=0.0),
               "final_stop_rate": final["stop_rate"], "trainable_params": counts["trainable"]}
    if algorithm == "ppo":
        summary.update(train_accuracy_first10=mean(first, "train_accuracy"),
                       train_accuracy_last10=mean(last, "train_accuracy"), reward_norm=list(reward_norm))
    return run.finish(summary, step, stop_reason, device, f"held-out greedy accuracy {initial['accuracy']:.1%} -> "
                      f"{final['accuracy']:.1%} on {len(eval_problems)} problems | {key} "
                      f"{summary[f'{key}_first10']:+.3f} -> {summary[f'{key}_last10']:+.3f} (first/last 10 steps) | "
                      f"KL {summary['kl_last10']:.4f}")


@torch.no_grad()
def calibrate_reward(model, reward_model, tokenizer, problems, config, end_id: int, pad_id: int) -> tuple:
    """(mean, std) of the reward model's scores on answers the starting policy samples (InstructGPT's reward
    normalisation: the RL starts with rewards of mean 0 and std 1)."""
    prompts = [question_prompt(tokenizer, p) for p in problems]
    answers, stopped = sample_answers(model, prompts, config.max_new_tokens, config.temperature, config.seed, end_id)
    batch = pack_rollouts(prompts, answers, stopped, end_id, pad_id, model.embed_tokens.weight.device)
    scores = rewards_at_end(reward_model, batch.tokens, batch.lengths)[batch.stopped]
    if scores.numel() < 2:
        return 0.0, 1.0
    return scores.mean().item(), max(scores.std().item(), 1e-6)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        print(__doc__.split("\n\n")[1])
        sys.exit(f"usage: rlhf.py {{{'|'.join(SUBCOMMANDS)}}} [--help] [flags]" if not argv or argv[0] not in ("-h", "--help")
                 else 0)
    command, rest = argv[0], argv[1:]
    description = {"reward": "Train a reward model on preference pairs (Bradley-Terry loss).",
                   "ppo": "PPO against a learned reward model, with a per-token KL penalty to the SFT model.",
                   "grpo": "GRPO against tasks.py's verifiable reward (group-relative advantages, k3 KL)."}[command]
    config = parse_config(CONFIGS[command], PRESETS[command], description, rest)
    try:
        if command == "reward":
            train_reward_model(config)
        else:
            reinforce(config, command)
    except (TrainingError, ChatDataError, FileNotFoundError, ValueError) as e:
        exit_on_error(e)


if __name__ == "__main__":
    main()
