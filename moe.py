"""moe.py: the sparse mixture-of-experts feed-forward that model.py puts in place of a block's MLP when
n_experts > 0 (Mixtral, Qwen2-MoE): the router, its two training losses, the dispatch of tokens to their
experts, and the routing statistics train.py logs and plots (docs/moe.md).

The equations are below; tests/test_moe.py checks the layer and the losses against transformers' Mixtral
and Qwen2-MoE and the sorted dispatch against the loop.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Mixture of experts (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; Mixtral, Jiang et al. 2024;
# Qwen1.5-MoE). The MLP becomes E SwiGLU experts and a router; each token x goes to k of them:
#
#     p = softmax(W_g x)                          (E,) router probabilities, in fp32
#     w, S = topk(p, k)                           the k largest and their experts
#     w = w / sum(w)                              Mixtral (always); Qwen-MoE only with norm_topk_prob
#     y = sum_{j<k} w_j expert_{S_j}(x)  [+ sigmoid(g . x) shared_expert(x)]   (Qwen-MoE's shared expert)
#
# A token costs k experts' FLOPs while the model holds E experts' parameters. Training adds two losses
# over the N tokens of a batch, per layer, averaged over the layers:
#   load balancing (Switch eq. 4-6, HF Mixtral's form):  aux = E * sum_i f_i P_i,
#       f_i = (tokens whose top k includes i) / N  (sums to k),  P_i = mean_t p_t,i  (sums to 1).
#       f is piecewise constant; the gradient flows through P, pushing probability off the busy experts.
#       A uniform router gives aux = k; all tokens on k experts gives aux up to E.
#   router z-loss (ST-MoE, Zoph et al. 2022):  z = mean_t logsumexp(W_g x_t)^2, keeps the logits small.

def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """probs (N, E) router probabilities, experts (N, k) each token's chosen experts -> E sum_i f_i P_i."""
    f = torch.bincount(experts.flatten(), minlength=n_experts).float() / experts.size(0)   # (E,)
    return n_experts * (f * probs.float().mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits (N, E) -> mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoE(nn.Module):
    """The sparse feed-forward: router `gate`, `experts` (SwiGLU MLPs), optional `shared_expert` with its
    `shared_expert_gate`. Names follow Hugging Face's Qwen2-MoE, so its state-dict keys are the checkpoint's.

    Each forward keeps the routing statistics: `aux_loss` and `z_loss` of the batch (with gradients, for
    Transformer.forward to add in training) and running totals that `moe_stats()` reads and resets.
    """

    def __init__(self, config, expert):
        """config: a model.ModelConfig; expert: the class of an expert, model.MLP (built as expert(config, width))."""
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = config.n_experts, config.n_experts_per_token, config.norm_topk_prob
        self.gate = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(expert(config) for _ in range(config.n_experts))
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_dim:
            self.shared_expert = expert(config, config.shared_expert_dim)
            self.shared_expert_gate = nn.Linear(config.dim, 1, bias=False)
        self.aux_loss = self.z_loss = None
        self.reset_stats()

    def reset_stats(self):
        self.routed = self.prob_sum = None  # (E,) assignments and summed probabilities since the last reset
        self.z_sum, self.n_tokens = 0.0, 0  # z_sum: a tensor once a batch is seen (no device sync per step)

    def route(self, x):
        """x (N, dim) -> router logits (N, E), probabilities (N, E) fp32, weights (N, k) in x's dtype, experts (N, k)."""
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights.to(x.dtype), experts

    def dispatch_loop(self, x, weights, experts):
        """The reference: for each expert, gather the tokens that chose it, run it, add back w * output."""
        out = torch.zeros_like(x)                                          # (N, dim)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(experts == e)                        # which tokens, in which of their k slots
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out

    def dispatch_sorted(self, x, weights, experts):
        """The same sum with the N k (token, expert) assignments sorted by expert (MegaBlocks' permute ->
        grouped GEMM -> unpermute): one gather puts each expert's tokens in one contiguous segment, each
        expert runs on its segment, one scatter-add returns the weighted outputs to their tokens."""
        flat = experts.flatten()                                           # (N k,) expert of each assignment
        order = flat.argsort(stable=True)                                  # assignments grouped by expert
        token = order // self.top_k                                        # (N k,) their tokens
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()   # segment lengths
        segments = x[token].split(counts)                                  # E tensors (count_e, dim)
        # every expert runs, an unchosen one on 0 rows: all parameters stay in the autograd graph (DDP
        # needs that without find_unused_parameters)
        y = torch.cat([expert(s) for expert, s in zip(self.experts, segments)])
        return torch.zeros_like(x).index_add_(0, token, y * weights.flatten()[order, None])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                       # (N, dim), N = B T
        logits, probs, weights, experts = self.route(x)
        out = self.dispatch_sorted(x, weights, experts)                     # == dispatch_loop (tests)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        self.aux_loss = load_balancing_loss(probs, experts, self.n_experts)
        self.z_loss = router_z_loss(logits)
        with torch.no_grad():
            routed = torch.bincount(experts.flatten(), minlength=self.n_experts).float()
            self.routed = routed if self.routed is None else self.routed + routed
            self.prob_sum = probs.sum(0) if self.prob_sum is None else self.prob_sum + probs.sum(0)
            self.z_sum = self.z_sum + self.z_loss.detach() * len(x)
            self.n_tokens += len(x)
        return out.view(shape)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def reset_moe_stats(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.reset_stats()


def moe_stats(model: nn.Module) -> dict:
    """Routing since the last call, over every token the model saw (then the totals restart): per layer,
    each expert's share of the assignments (sums to 1), the load-balancing and z losses of those tokens,
    and the coefficient of variation of the shares (std / mean; 0 = perfectly balanced). {} for a dense model."""
    layers = [m for m in moe_layers(model) if m.n_tokens]
    if not layers:
        return {}
    shares, aux, z, cv = [], [], [], []
    for m in layers:
        f, P = m.routed / m.n_tokens, m.prob_sum / m.n_tokens
        share = f / m.top_k
        shares.append([round(s, 4) for s in share.tolist()])
        aux.append((m.n_experts * (f * P).sum()).item())
        z.append(float(m.z_sum) / m.n_tokens)
        cv.append((share.std(unbiased=False) / share.mean()).item())
        m.reset_stats()
    n = len(layers)
    return {"moe_expert_share": shares, "moe_aux_loss": sum(aux) / n, "moe_z_loss": sum(z) / n,
            "moe_share_cv": sum(cv) / n}


def plot_expert_shares(metrics_file: Path, out_png: Path) -> None:
    """Expert utilisation over training from metrics.jsonl rows that carry moe_expert_share: one panel
    per layer, one line per expert's share of the routed tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in map(json.loads, Path(metrics_file).read_text().splitlines()) if "moe_expert_share" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    shares = torch.tensor([r["moe_expert_share"] for r in rows])          # (evals, layers, experts)
    n_layers, n_experts = shares.shape[1:]
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers, 3), sharey=True, squeeze=False)
    for layer, ax in enumerate(axes[0]):
        for e in range(n_experts):
            ax.plot(steps, shares[:, layer, e], label=f"expert {e}")
        ax.axhline(1 / n_experts, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("share of routed tokens")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
