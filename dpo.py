"""Preference alignment: DPO and its main variants, from an SFT checkpoint and pairs of answers.

    python dpo.py --init out/sft --data ../shared/data/preference/dpo_en_demo.json --out-dir out/dpo
    python dpo.py --init out/sft --data pairs.jsonl --loss simpo --lora-rank 8 --out-dir out/simpo
    python dpo.py --init out/sft --data ../shared/data/preference/kto_en_demo.json --loss kto --out-dir out/kto

Each loss is a function of sequence log-probs log pi(y|x) summed over the answer's tokens, under the policy
pi and a frozen reference pi_ref (the SFT model). For a chosen y_w and a rejected y_l,
h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]:

  sigmoid  DPO (Rafailov et al. 2023, eq. 7)   -log sigmoid(beta h); cDPO: label smoothing eps
  ipo      IPO (Azar et al. 2023, eq. 17)      (h - 1 / (2 beta))^2
  hinge    SLiC-HF (Zhao et al. 2023)          max(0, 1 - beta h)
  simpo    SimPO (Meng et al. 2024, eq. 6)     -log sigmoid(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)
  orpo     ORPO (Hong et al. 2024, eq. 6)      -avg log pi(y_w) - lambda log sigmoid(log odds(y_w) - log odds(y_l))
  kto      KTO (Ethayarajh et al. 2024)        unpaired good/bad answers against a batch KL estimate z0
  (+ RPO, --rpo-alpha a: a times the chosen answer's NLL per token, Pang et al. 2024)

The implicit reward of an answer is beta (log pi - log pi_ref) (DPO's eq. 5). At step 0 the policy IS the
reference, so h = 0 and the sigmoid loss is exactly ln 2 = 0.693; a loss that stays there means nothing
moves (a warning names the usual causes). The reference is a frozen copy, the policy's base weights with
its LoRA adapters off (--lora-rank), or log-probs computed once (--precompute-ref). The loop, schedule and
checkpoints are training.py's; outputs in --out-dir: ckpt.pt (merged), adapter.pt with LoRA, metrics.jsonl,
loss.png, rewards.png, summary.json.
"""
from __future__ import annotations  # the losses come first, the config they read after them
import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from chat import (PAD, ChatDataError, answer_ids, chat_token_ids, load_preference_pairs, load_unpaired,
                  pad_batch, parse_placeholders, prompt_ids, read_records)
from common import UsageError, check_trainable, load_model, load_tokenizer, resolve_device
from lora import ALL_LINEAR, apply_lora, disable_adapters
from training import (RunConfig, RunDir, TrainingError, check_finite, main_of, make_optimizer, opt, rng_state,
                      seed_everything, set_lr)

LN2 = math.log(2)
LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
INTERNAL = ("answer_tokens", "max_abs_logratio")  # per-batch diagnostics for the ln 2 warning, not logged


# ----------------------------------------------------------------------------------------------------------
# The losses: log-probs in (B,), per-pair losses and implicit rewards out (B,)

def sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO, -log sigmoid(beta h); with label smoothing eps, conservative DPO (cDPO)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """IPO: regress h onto 1 / (2 beta) (here beta is the paper's tau); no sigmoid saturates it."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """SLiC's hinge on the reference-relative log-ratio: zero once beta h >= 1."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = torch.relu(1 - beta * h)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def simpo_loss(avg_chosen, avg_rejected, beta: float, gamma: float):
    """SimPO on average log-probs per answer token (no reference): -log sigmoid(beta (avg_w - avg_l) - gamma)."""
    losses = -F.logsigmoid(beta * (avg_chosen - avg_rejected) - gamma)
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def log_odds(avg_logp):
    """log(P / (1 - P)) for P = exp(avg_logp) < 1; log(1 - P) as log(-expm1(.)), exact near P = 1.

    Example: an answer whose tokens have probabilities 0.5 and 0.8 has avg_logp = (ln 0.5 + ln 0.8) / 2
    = -0.458, so P = exp(-0.458) = 0.632 (the geometric mean) and log odds = ln(0.632 / 0.368) = 0.543.
    ORPO compares these between the chosen and the rejected answer: log odds 0.543 against, say, -1.0
    gives -log sigmoid(1.543) = 0.194. Near P = 1 (avg_logp = -1e-6) the naive log(1 - exp(x)) loses
    every digit to cancellation; -expm1(x) = 1e-6 keeps them, so the log odds is 13.8, not -inf or NaN."""
    avg_logp = avg_logp.clamp(max=-1e-6)
    return avg_logp - torch.log(-torch.expm1(avg_logp))


def orpo_loss(avg_chosen, avg_rejected, lam: float):
    """ORPO: the SFT loss on the chosen answer plus lambda times the odds-ratio loss (no reference)."""
    odds_ratio_loss = -F.logsigmoid(log_odds(avg_chosen) - log_odds(avg_rejected))
    losses = -avg_chosen + lam * odds_ratio_loss
    return losses, lam * avg_chosen.detach(), lam * avg_rejected.detach()


def kto_loss(policy, ref, policy_mismatched, ref_mismatched, desirable, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO on unpaired answers: (B,) log-probs of the answers and of mismatched (prompt, answer) pairs,
    desirable (B,) bool. z0 = max(0, mean log-ratio of the mismatched pairs), detached (the paper's
    batch estimate of KL(pi || pi_ref)). Returns per-example losses, rewards beta * r, and z0."""
    z0 = (policy_mismatched - ref_mismatched).mean().clamp(min=0).detach()
    r = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, beta * r.detach(), z0


# ----------------------------------------------------------------------------------------------------------
# Data: every item becomes two sequences, (chosen, rejected), or for kto (answer, mismatched answer)

def is_unpaired_file(path) -> bool:
    records = read_records(path)
    return bool(records) and isinstance(records[0], dict) and "label" in records[0]


def load_items(paths: str, config: DPOConfig) -> tuple[list[dict], int]:
    """(items, n_skipped) from comma-separated files. Paired: {"prompt", "chosen", "rejected"};
    kto: {"prompt", "completion", "label"} (a paired file gives one good and one bad item per pair)."""
    placeholders = parse_placeholders(config.set)
    items, skipped = [], 0
    for path in [p for p in paths.split(",") if p]:
        if is_unpaired_file(path):
            if config.loss != "kto":
                raise ChatDataError(f"{path}: unpaired ('label') records; --loss {config.loss} needs chosen/rejected pairs "
                                    f"(use --loss kto)")
            got, n = load_unpaired(path, placeholders, config.skip_bad_records)
        else:
            got, n = load_preference_pairs(path, placeholders, config.skip_bad_records)
            if config.loss == "kto":
                got = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
                       for p in got for key in ("chosen", "rejected")]
        items += got
        skipped += n
    return items, skipped


def fit(prompt: list[int], answer: list[int], max_len: int, max_prompt_len: int = 0) -> tuple[list[int], list[int], bool]:
    """(ids, mask, truncated): prompt + answer in at most max_len tokens, the answer's tokens masked 1.
    Too long: the prompt keeps its last tokens (at least max_prompt_len, 0: half of max_len), then the answer is
    cut. E.g. max_len 8, max_prompt_len 2, a prompt of 6 and an answer of 5: the prompt's last 3, the answer's 5."""
    if len(prompt) + len(answer) > max_len:
        keep = max(min(max_prompt_len, max_len - 1) or max_len // 2, max_len - len(answer))
        prompt = prompt[-keep:]
        answer = answer[:max_len - len(prompt)]
        return prompt + answer, [0] * len(prompt) + [1] * len(answer), True
    return prompt + answer, [0] * len(prompt) + [1] * len(answer), False


def tokenize_items(tokenizer, items, config: DPOConfig, max_len: int) -> tuple[list, int]:
    """[(first (ids, mask), second (ids, mask))] per item and the number truncated.

    Paired: (prompt + chosen, prompt + rejected). kto: (prompt_i + answer_i, prompt_i + answer_{i+1}):
    the second is a mismatched pair for the KL estimate, fixed per item so it can be precomputed."""
    prompts = [prompt_ids(tokenizer, item["prompt"]) for item in items]
    truncated = 0
    sequences = []
    if config.loss == "kto":
        answers = [answer_ids(tokenizer, item["completion"]) for item in items]
        pairs = [(answers[i], answers[(i + 1) % len(items)]) for i in range(len(items))]
    else:
        pairs = [(answer_ids(tokenizer, item["chosen"]), answer_ids(tokenizer, item["rejected"])) for item in items]
    for prompt, (first, second) in zip(prompts, pairs):
        a, b = fit(prompt, first, max_len, config.max_prompt_len), fit(prompt, second, max_len, config.max_prompt_len)
        truncated += a[2] or b[2]
        sequences.append(((a[0], a[1]), (b[0], b[1])))
    return sequences, truncated


def make_batch(sequences, index: list[int], pad_id: int, device, labels=None) -> dict:
    """Rows 0..B-1 the items' first sequences, rows B..2B-1 their second: one forward pass for both."""
    rows = [sequences[i][0] for i in index] + [sequences[i][1] for i in index]
    inputs, targets, loss_mask = pad_batch(rows, pad_id, device)
    batch = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "index": torch.tensor(index)}
    if labels is not None:
        batch["desirable"] = torch.tensor([labels[i] for i in index], device=device)
    return batch


def sequence_logps(model, inputs, targets, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over the masked-in (answer) tokens, their count), each (N,)."""
    logits, _ = model(inputs)                                                       # (N, T, V)
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    token_logps = token_logps.view_as(loss_mask)                                    # (N, T)
    return (token_logps * loss_mask).sum(-1), loss_mask.sum(-1)


# ----------------------------------------------------------------------------------------------------------
# The reference: what log pi_ref(y|x) of a batch comes from

class Reference:
    """kind: "none" (reference-free loss), "copy" (a frozen copy), "lora" (the policy with its adapters
    off) or "cache" (log-probs precomputed per item, (n_items, 2)). A split found in `cache` is read from
    it whatever the kind: train() computes the held-out split's log-probs once, as they never change."""

    def __init__(self, kind: str, policy=None, cache: dict | None = None):
        self.kind, self.policy, self.cache = kind, policy, cache or {}
        self.model = None
        if kind == "copy":
            self.model = copy.deepcopy(policy).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    def describe(self) -> str:
        return {"none": "none (reference-free loss)",
                "copy": "a frozen copy of the initial model (two models in memory)",
                "lora": "the base weights with the LoRA adapters switched off (one model in memory)",
                "cache": "log-probs precomputed once (only the policy in memory)"}[self.kind]

    @torch.no_grad()
    def live_logps(self, batch) -> torch.Tensor:
        if self.kind == "copy":
            return sequence_logps(self.model, batch["inputs"], batch["targets"], batch["loss_mask"])[0]
        with disable_adapters(self.policy):
            return sequence_logps(self.policy, batch["inputs"], batch["targets"], batch["loss_mask"])[0]

    def logps(self, batch, split: str) -> torch.Tensor | None:
        """(2B,) reference log-probs in the batch's row order, or None when reference-free."""
        if self.kind == "none":
            return None
        if split in self.cache:
            return self.cache[split][batch["index"]].T.reshape(-1).to(batch["inputs"].device)
        return self.live_logps(batch)

    def precompute(self, sequences, pad_id: int, batch_size: int, device) -> torch.Tensor:
        """(n_items, 2) log-probs of every item's two sequences under the copy or the adapter-free policy."""
        if self.kind == "copy":
            return precompute_reference(self.model, sequences, pad_id, batch_size, device)
        with disable_adapters(self.policy):
            return precompute_reference(self.policy, sequences, pad_id, batch_size, device)


@torch.no_grad()
def precompute_reference(model, sequences, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """(n_items, 2) log-probs of every item's two sequences under `model` (called before any update)."""
    out = torch.zeros(len(sequences), 2)
    for start in range(0, len(sequences), batch_size):
        index = list(range(start, min(start + batch_size, len(sequences))))
        batch = make_batch(sequences, index, pad_id, device)
        logps = sequence_logps(model, batch["inputs"], batch["targets"], batch["loss_mask"])[0].cpu()
        out[index] = logps.view(2, -1).T
    return out


# ----------------------------------------------------------------------------------------------------------
# One batch: loss and metrics

def batch_loss(policy, batch, reference: Reference, split: str, config: DPOConfig,
               policy_is_reference: bool = False) -> tuple[torch.Tensor, dict]:
    """(mean loss, metrics): each metric a (sum, count) so micro-batches and eval batches average exactly.
    policy_is_reference (before the first update): the policy's log-probs are the reference's, no forward."""
    ref = reference.logps(batch, split) if policy_is_reference else None
    if ref is not None:
        logps, n_tokens, router = ref.clone(), batch["loss_mask"].sum(-1), 0.0
    else:
        logps, n_tokens = sequence_logps(policy, batch["inputs"], batch["targets"], batch["loss_mask"])  # (2B,)
        router = policy.router_loss()  # MoE, in training: taken before the reference's forward re-routes
        ref = reference.logps(batch, split)
    B = logps.numel() // 2
    first, second = logps[:B], logps[B:]
    stats = {}
    if config.loss == "kto":
        desirable = batch["desirable"]
        losses, rewards, z0 = kto_loss(first, ref[:B], second, ref[B:], desirable, config.beta,
                                       config.kto_desirable_weight, config.kto_undesirable_weight)
        good, bad = desirable.float(), (~desirable).float()
        stats["rewards/chosen"] = ((rewards * good).sum().item(), good.sum().item())
        stats["rewards/rejected"] = ((rewards * bad).sum().item(), bad.sum().item())
        stats["rewards/accuracy"] = (((rewards > 0) == desirable).float().sum().item(), B)  # reward sign right
        stats["kl"] = (z0.item() * B, B)
        stats["logps/answer"] = (first.detach().sum().item(), B)
        stats["ref_logps/answer"] = (ref[:B].sum().item(), B)
    else:
        if config.loss in ("sigmoid", "ipo", "hinge"):
            args = (first, second, ref[:B], ref[B:], config.beta)
            losses, chosen, rejected = (sigmoid_loss(*args, config.label_smoothing) if config.loss == "sigmoid"
                                        else ipo_loss(*args) if config.loss == "ipo" else hinge_loss(*args))
            if config.rpo_alpha:  # keeps the chosen answers likely while the margin grows
                losses = losses - config.rpo_alpha * first / n_tokens[:B]
        else:
            avg_chosen, avg_rejected = first / n_tokens[:B], second / n_tokens[B:]
            losses, chosen, rejected = (simpo_loss(avg_chosen, avg_rejected, config.simpo_beta, config.simpo_gamma)
                                        if config.loss == "simpo" else orpo_loss(avg_chosen, avg_rejected, config.orpo_lambda))
        stats["rewards/chosen"] = (chosen.sum().item(), B)
        stats["rewards/rejected"] = (rejected.sum().item(), B)
        stats["rewards/accuracy"] = ((chosen > rejected).float().sum().item(), B)
        stats["rewards/margin"] = ((chosen - rejected).sum().item(), B)
        stats["logps/chosen"] = (first.detach().sum().item(), B)
        stats["logps/rejected"] = (second.detach().sum().item(), B)
        if ref is not None:
            stats["ref_logps/chosen"] = (ref[:B].sum().item(), B)
            stats["ref_logps/rejected"] = (ref[B:].sum().item(), B)
            stats["max_abs_logratio"] = ((logps.detach() - ref).abs().max().item(), 1)
    loss = losses.mean()
    stats["loss"] = (loss.item() * B, B)
    loss = loss + router
    stats["answer_tokens"] = (n_tokens.sum().item(), 1)
    if config.loss == "kto":
        stats["rewards/margin"] = (0.0, 0)  # filled in by averaged(): mean good reward - mean bad reward
    return loss, stats


def accumulate(total: dict, stats: dict) -> None:
    for k, (s, n) in stats.items():
        a, b = total.get(k, (0.0, 0))
        total[k] = (a + s, b + n)


def averaged(total: dict, prefix: str = "") -> dict:
    out = {prefix + k: s / n for k, (s, n) in total.items() if n}
    if total.get("rewards/margin", (0, 1))[1] == 0 and {prefix + "rewards/chosen", prefix + "rewards/rejected"} <= set(out):
        out[prefix + "rewards/margin"] = out[prefix + "rewards/chosen"] - out[prefix + "rewards/rejected"]
    return out


@torch.no_grad()
def evaluate_pairs(policy, sequences, reference, labels, pad_id, config, device, split="val",
                   policy_is_reference: bool = False) -> dict:
    total = {}
    for start in range(0, len(sequences), config.batch_size):
        index = list(range(start, min(start + config.batch_size, len(sequences))))
        batch = make_batch(sequences, index, pad_id, device, labels)
        accumulate(total, batch_loss(policy, batch, reference, split, config, policy_is_reference)[1])
    return averaged(total)


# ----------------------------------------------------------------------------------------------------------
# Training

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The items' order in one epoch: a function of (seed, epoch) only, so --resume needs just the position."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()


def stuck_warning(n_steps: int, lr: float, n_trainable: int, stats: dict, config: DPOConfig) -> str:
    diff = stats.get("max_abs_logratio", (float("nan"), 1))[0]
    return (f"warning: the loss has stayed at ln 2 = {LN2:.3f} for {n_steps} steps, i.e. the policy's log-probs "
            f"still equal the reference's (largest |log pi - log pi_ref| in the last batch: {diff:.2e}). Usual "
            f"causes: the policy is the reference or nothing trains ({n_trainable:,} trainable parameters), a zero "
            f"learning rate (lr now {lr:.2e}), answers masked out of the loss "
            f"({stats['answer_tokens'][0]:.0f} answer tokens in the last batch), or a beta ({config.beta}) too small "
            f"to move the loss")


# ----------------------------------------------------------------------------------------------------------
# Config and the loop

@dataclass
class DPOConfig(RunConfig):
    init: str = opt("", "the starting model: a nanollm checkpoint directory (an SFT model) or a Hugging Face one")
    data: str = opt("", "preference file(s), comma-separated (.json or .jsonl)")
    val_data: str = opt("", "held-out preference file(s); empty: hold out --val-fraction of --data")
    val_fraction: float = opt(0.1, "share of the pairs held out for evaluation when --val-data is not given")
    out_dir: str = opt("out/dpo", "where the model, metrics and the summary go")
    # the objective
    loss: str = opt("sigmoid", "preference loss (see the docstring)", choices=list(LOSSES))
    beta: float = opt(0.1, "beta: strength of the KL tie to the reference (sigmoid, ipo, hinge, kto)")
    label_smoothing: float = opt(0.0, "cDPO: assumed share of flipped labels, 0 <= eps < 0.5 (sigmoid)")
    simpo_beta: float = opt(2.0, "SimPO's beta (it scales average log-probs, hence larger than DPO's)")
    simpo_gamma: float = opt(1.0, "SimPO's target reward margin gamma")
    orpo_lambda: float = opt(0.1, "ORPO's weight lambda of the odds-ratio term")
    rpo_alpha: float = opt(0.0, "RPO: add alpha times the chosen answers' NLL per token to sigmoid / ipo / hinge")
    kto_desirable_weight: float = opt(1.0, "KTO's w_d, weight of the good answers")
    kto_undesirable_weight: float = opt(1.0, "KTO's w_u, weight of the bad answers")
    # the reference model
    precompute_ref: bool = opt(False, "compute the reference log-probs once before training (no reference in memory)")
    lora_rank: int = opt(0, "train LoRA adapters of this rank (0: every weight); the reference is then the base")
    lora_alpha: float = opt(16.0, "LoRA alpha")
    lora_targets: str = opt(",".join(ALL_LINEAR), "comma-separated layers to adapt")
    lora_embedding_rank: int = opt(0, "with --lora-rank: rank of an adapter on the token embedding (and a tied head)")
    # data
    max_len: int = opt(512, "prompt + answer tokens (the prompt's start is cut first; capped at the model's context)")
    max_prompt_len: int = opt(0, "when prompt + answer exceed --max-len, the prompt's last tokens kept (0: half of --max-len)")
    set: list = field(default_factory=list, metadata={"append": True, "help": "fill a {{KEY}} placeholder: KEY=VALUE (repeatable)"})
    skip_bad_records: bool = opt(False, "skip (and count) records that cannot be used instead of stopping")
    # batches
    batch_size: int = opt(8, "pairs per micro-batch (2x sequences through the model)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    stuck_steps: int = opt(30, "warn when the sigmoid loss stays at ln 2 for this many steps")
    # dpo.py's defaults of RunConfig's options (their help is RunConfig's)
    max_steps: int = 200
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 50


DPO_PRESETS = {
    # the arithmetic benchmark on a 2-core CPU: right-vs-wrong sums from tasks.py (README)
    "cpu-arithmetic": dict(loss="sigmoid", beta=0.1, rpo_alpha=1.0, lr=2e-4, min_lr=2e-5, batch_size=16, max_steps=150,
                           warmup_steps=10, eval_interval=25, log_interval=10, max_len=64),
    # the LLaMA-Factory demo pairs with the small CPU model: answers cut to the model's context
    "cpu-demo": dict(lr=1e-4, min_lr=1e-5, batch_size=8, max_steps=60, warmup_steps=5, eval_interval=10,
                     log_interval=10, max_len=128, val_fraction=0.2),
}


def build_policy(config: DPOConfig, device):
    model = load_model(config.init, device=device).float()
    check_trainable(model, config.init, config.lora_rank)
    lora_counts = None
    if config.lora_rank:
        targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
        lora_counts = apply_lora(model, targets=targets, r=config.lora_rank, alpha=config.lora_alpha,
                                 embedding_rank=config.lora_embedding_rank)
    return model.eval(), lora_counts  # eval: no dropout, so the policy starts equal to its reference


def check_config(config: DPOConfig) -> None:
    """Flags the run cannot go on with: one line naming the flag, exit 2 (common.UsageError)."""
    if not config.init:
        raise UsageError("--init is required: the SFT checkpoint directory to start from")
    if not Path(config.init).exists():
        raise UsageError(f"--init {config.init}: no such checkpoint directory")
    if not config.data:
        raise UsageError("--data is required: preference file(s)")
    if not 0 <= config.label_smoothing < 0.5:
        raise UsageError(f"--label-smoothing must be in [0, 0.5), got {config.label_smoothing}")
    if config.label_smoothing and config.loss != "sigmoid":
        raise UsageError(f"--label-smoothing is a variant of the sigmoid loss, not of {config.loss}")
    if config.beta <= 0:
        raise UsageError(f"--beta must be positive, got {config.beta}")
    if config.loss == "kto" and config.batch_size < 2:
        raise UsageError("--loss kto needs --batch-size >= 2 (the KL estimate averages over the batch)")
    if config.precompute_ref and config.loss in REFERENCE_FREE:
        raise UsageError(f"--precompute-ref: --loss {config.loss} uses no reference model")
    if not 0 <= config.max_prompt_len < config.max_len:
        raise UsageError(f"--max-prompt-len must be in [0, --max-len {config.max_len}), got {config.max_prompt_len}")
    if not 0 <= config.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")


def train(config: DPOConfig, log=print) -> dict:
    check_config(config)
    run = RunDir(config, "dpo")
    if run.finished:
        return run.finished
    seed_everything(config.seed)  # before the LoRA adapters' random init
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.init)
    pad_id = chat_token_ids(tokenizer)[PAD]

    items, skipped = load_items(config.data, config)
    if config.val_data:
        val_items, val_skipped = load_items(config.val_data, config)
        skipped += val_skipped
    else:
        order = list(range(len(items)))
        random.Random(config.seed).shuffle(order)
        n_val = round(len(items) * config.val_fraction)
        val_items = [items[i] for i in order[:n_val]]
        items = [items[i] for i in sorted(order[n_val:])]
    if not items:
        raise TrainingError(f"no usable training records in {config.data} ({skipped} skipped)")

    policy, lora_counts = build_policy(config, device)
    max_len = min(config.max_len, policy.config.max_seq_len)
    train_seqs, truncated = tokenize_items(tokenizer, items, config, max_len)
    val_seqs, val_truncated = tokenize_items(tokenizer, val_items, config, max_len)
    labels = [item["label"] for item in items] if config.loss == "kto" else None
    val_labels = [item["label"] for item in val_items] if config.loss == "kto" else None

    kind = ("none" if config.loss in REFERENCE_FREE else "cache" if config.precompute_ref
            else "lora" if config.lora_rank else "copy")
    optimizer = make_optimizer(policy, config, device)
    position, cache = 0, None
    if run.resuming:
        ckpt = run.checkpoint
        run.load_weights(policy, lora=bool(config.lora_rank))
        optimizer.load_state_dict(ckpt["optimizer"])
        position, cache = ckpt["position"], ckpt.get("ref_cache")
    if kind == "cache" and cache is None:  # before any update the policy is the reference
        t0 = time.time()
        cache = {"train": precompute_reference(policy, train_seqs, pad_id, config.batch_size, device),
                 "val": precompute_reference(policy, val_seqs, pad_id, config.batch_size, device)}
        log(f"precomputed reference log-probs of {len(train_seqs) + len(val_seqs)} items in {time.time() - t0:.1f}s")
    if kind == "copy" and run.resuming:
        reference = Reference(kind, load_model(config.init, device=device).float(), cache)
    else:
        reference = Reference(kind, policy, cache)
    # last: building the models above draws from the generators, as it did before the first step; a resumed
    # run's RNG state comes back here
    step = run.start(log)
    tokenizer.save(run.path / "tokenizer")

    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log(f"model: {policy.num_params() / 1e6:.2f}M parameters, {n_trainable:,} trainable"
        f"{' (LoRA rank %d on %d layers)' % (config.lora_rank, lora_counts['layers']) if lora_counts else ''} | "
        f"loss {config.loss} | reference: {reference.describe()}")
    log(f"data: {len(train_seqs)} train / {len(val_seqs)} held-out {'examples' if labels else 'pairs'} | "
        f"{truncated + val_truncated} truncated to {max_len} tokens | {skipped} bad records skipped")

    if kind in ("lora", "copy") and val_seqs and "val" not in reference.cache:
        # the held-out pairs' reference log-probs never change: one forward pass, not one per evaluation
        t0 = time.time()
        cache = reference.cache = {"val": reference.precompute(val_seqs, pad_id, config.batch_size, device)}
        log(f"reference log-probs of the {len(val_seqs)} held-out items in {time.time() - t0:.1f}s")

    def save():
        state = dict(optimizer=optimizer.state_dict(), rng=rng_state(), step=step, position=position,
                     elapsed=run.elapsed(), dpo_config=asdict(config), tokenizer="tokenizer")
        if cache is not None:
            state["ref_cache"] = cache
        run.save_checkpoint(policy, lora=bool(config.lora_rank), **state)

    @run.timed_eval
    def run_eval():
        if not val_seqs:
            return {}
        metrics = {"val/" + k: v for k, v in evaluate_pairs(policy, val_seqs, reference, val_labels, pad_id, config,
                                                              device, policy_is_reference=step == 0).items()
                   if k not in INTERNAL}
        log(f"eval step {step}: held-out loss {metrics['val/loss']:.4f} | reward accuracy "
            f"{metrics['val/rewards/accuracy']:.3f} | margin {metrics['val/rewards/margin']:.3f}")
        run.record({"step": step, "val_loss": metrics["val/loss"], **metrics})
        return metrics

    if step == 0:
        run_eval()
    n = len(train_seqs)
    params = [p for p in policy.parameters() if p.requires_grad]
    stuck, warned, last = 0, False, {}
    while not (stop_reason := run.stop_reason(step)):
        lr = set_lr(optimizer, config, step, run.elapsed())
        total = {}
        for _ in range(config.grad_accum):
            index = []
            while len(index) < min(config.batch_size, n):
                epoch, offset = divmod(position, n)
                index.append(epoch_order(n, config.seed, epoch)[offset])
                position += 1
            batch = make_batch(train_seqs, index, pad_id, device, labels)
            # forward: the preference loss of the chosen and rejected rows
            loss, stats = batch_loss(policy, batch, reference, "train", config)
            # backward
            (loss / config.grad_accum).backward()
            accumulate(total, stats)
        # clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
        # step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = averaged(total)
        check_finite(metrics["loss"], step, run.ckpt_path)
        step += 1
        last = metrics

        # log
        stuck = stuck + 1 if config.loss == "sigmoid" and abs(metrics["loss"] - LN2) < 1e-3 else 0
        if stuck == config.stuck_steps and not warned:
            log(stuck_warning(stuck, lr, n_trainable, total, config))
            warned = True
        row = {**{k: v for k, v in metrics.items() if k not in INTERNAL}, "lr": lr, "grad_norm": grad_norm.item()}
        if run.log_due(step):
            step_time, _, eta = run.lap(step)
            pairs_per_s = config.batch_size * config.grad_accum / step_time
            shown = {k: metrics.get("rewards/" + k, float("nan")) for k in ("accuracy", "margin", "chosen", "rejected")}
            run.log_step(step, eta, [f"loss {metrics['loss']:.4f}", f"accuracy {shown['accuracy']:.2f}",
                                     f"margin {shown['margin']:.3f}", f"chosen {shown['chosen']:.3f}",
                                     f"rejected {shown['rejected']:.3f}", f"lr {lr:.2e}",
                                     f"{pairs_per_s:.1f} {'examples' if labels else 'pairs'}/s"], row, log)
        else:  # a row every step: the reward curves are noisy
            run.record_step(step, row)
        if run.eval_due(step):
            run_eval()
            save()

    final = run_eval()
    save()
    run.plot()
    run.plot("rewards.png", {"reward accuracy": ["rewards/accuracy", "val/rewards/accuracy"],
                             "reward margin": ["rewards/margin", "val/rewards/margin"]})
    summary = {**{k: v for k, v in last.items() if k not in INTERNAL}, **final, "loss_type": config.loss,
               "reference": kind, "train_items": len(train_seqs), "val_items": len(val_seqs),
               "truncated": truncated + val_truncated, "skipped_records": skipped, "trainable_params": n_trainable,
               "stuck_at_ln2_warning": warned}
    return run.finish(summary, step, stop_reason, device, f"held-out reward accuracy {final['val/rewards/accuracy']:.3f}, "
                      f"margin {final['val/rewards/margin']:.3f}" if final else "", log)


def main(argv=None):
    main_of(DPOConfig, DPO_PRESETS, __doc__.split("\n\n")[0], train, argv)


if __name__ == "__main__":
    main()
