"""Mixture-of-experts routers: which K of the E experts each token visits, and with what weight.

Notation: N tokens (batch and time flattened), C model width, E routed experts, K experts per
token, G expert groups (E / G experts each), G_K groups a token may use.

One ``Router`` covers the published variants; ``MoEConfig`` picks one:

* ``softmax`` top-k: ``p = softmax(x W_g^T)``, keep the K largest. With ``norm_topk`` the kept
  weights are renormalised, which is a softmax over the K selected logits (Mixtral; Jiang et al.,
  2024); without, the raw probabilities weigh the experts (Qwen-MoE, DeepSeek-V2). K = 1 with a
  capacity factor is Switch routing (Fedus et al., 2021).
* ``noisy`` top-k gating (Shazeer et al., 2017): ``H = x W_g^T + eps * softplus(x W_noise^T)``,
  ``eps ~ N(0, 1)`` while training, softmax over the K largest of H.
* ``sigmoid`` affinities (DeepSeek-V3; DeepSeek-AI, 2024): ``s = sigmoid(x W_g^T)``, experts chosen
  by ``s + b`` where b is the auxiliary-loss-free balancing bias (``e_score_correction_bias``),
  weighted by s itself (normalised over the K chosen with ``norm_topk``).
* group-limited routing (DeepSeek-V2's device-limited, V3's node-limited): experts fall in G groups;
  a token first keeps the G_K groups with the best group score (softmax: the group's best
  affinity, V2; sigmoid: the sum of its two best, V3), then its top K among their experts.

Balancing losses (per-token means, weighted by ``aux_loss_coef``):

* Switch / GShard (Fedus et al., 2021; Lepikhin et al., 2020): ``E * sum_i f_i P_i``, f_i the share
  of the N*K assignments routed to expert i, P_i its mean normalised affinity; 1 when balanced.
* importance + load (Shazeer et al., 2017), for the noisy router: ``CV(importance)^2 + CV(load)^2``,
  importance the summed gates per expert, load the smooth estimate of how many tokens each expert
  receives, ``sum_x Phi((clean_i(x) - kth_excluding(H(x), K, i)) / noise_std_i(x))``.
* router z-loss (Zoph et al., 2022, ST-MoE): ``mean_x logsumexp(logits(x))^2``, weighted by
  ``z_loss_coef``; keeps router logits small so the softmax stays in a stable range.

Routers compute in float32 (also under autocast): the choice of experts is discrete and small
logit errors flip it (Fedus et al., 2021, "selective precision").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from evolm.nn.moe import MoEConfig


@dataclass
class Routing:
    """One forward's routing decision.

    Attributes:
        experts: (N, K) int64 expert ids, distinct per token.
        weights: (N, K) float32 combine weights.
        counts: (E,) int64 assignments per expert (before any capacity drop).
        balance: 0-d float32 balancing loss (unweighted), or None when not asked for.
        z_loss: 0-d float32 router z-loss (unweighted), or None when not asked for.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    balance: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` of a (E,) vector (Shazeer et al., 2017)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def _group_limit(choice: torch.Tensor, n_group: int, topk_group: int, top2_sum: bool) -> torch.Tensor:
    """Mask (to -inf) the experts outside each token's ``topk_group`` best groups.

    Args:
        choice: (N, E) selection scores.
        n_group: G, groups of E / G consecutive experts.
        topk_group: G_K groups kept per token.
        top2_sum: Score a group by the sum of its two best experts (DeepSeek-V3), else by its best (V2).

    Returns:
        (N, E) scores with the experts of dropped groups at -inf.
    """
    n, e = choice.shape
    grouped = choice.view(n, n_group, e // n_group)  # (N, G, E/G)
    score = grouped.topk(2, dim=-1).values.sum(-1) if top2_sum else grouped.max(-1).values  # (N, G)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep[..., None], -math.inf).view(n, e)  # (N, E)


class Router(nn.Module):
    """Chooses K experts per token (see the module docstring for the variants).

    Parameters (HF names): ``weight`` (E, C); ``noise_weight`` (E, C) for the noisy router; buffer
    ``e_score_correction_bias`` (E,) with ``correction_bias`` (DeepSeek-V3's name).
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, dim))
        if cfg.router == "noisy":
            self.noise_weight = nn.Parameter(torch.zeros(cfg.n_experts, dim))
        if cfg.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Router weight ~ N(0, std); the noise weight and the balancing bias start at zero."""
        if self.weight.is_meta:
            return
        self.weight.normal_(0.0, std)
        if hasattr(self, "noise_weight"):
            self.noise_weight.zero_()
        if hasattr(self, "e_score_correction_bias"):
            self.e_score_correction_bias.zero_()

    def forward(self, x: torch.Tensor, losses: bool = False) -> Routing:
        """Route N tokens.

        Args:
            x: (N, C) token states.
            losses: Also compute the balancing loss and z-loss (training).

        Returns:
            The ``Routing``: (N, K) experts and weights, (E,) counts, optional losses.
        """
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            logits = F.linear(xf, self.weight.float())  # (N, E)
            select = logits
            noise_std = None
            if cfg.router == "noisy" and self.training:
                noise_std = F.softplus(F.linear(xf, self.noise_weight.float()))  # (N, E)
                select = logits + torch.randn_like(logits) * noise_std
            scores = torch.sigmoid(select) if cfg.router == "sigmoid" else torch.softmax(select, dim=-1)  # (N, E)
            choice = scores
            if cfg.correction_bias:
                choice = scores + self.e_score_correction_bias.float()
            if cfg.n_group > 1:
                choice = _group_limit(choice, cfg.n_group, cfg.topk_group, top2_sum=cfg.router == "sigmoid")
            experts = choice.topk(cfg.top_k, dim=-1).indices  # (N, K)
            weights = scores.gather(1, experts)  # (N, K)
            if cfg.norm_topk:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            if cfg.routed_scale != 1.0:
                weights = weights * cfg.routed_scale
            counts = torch.bincount(experts.flatten(), minlength=cfg.n_experts)  # (E,)
            balance = z_loss = None
            if losses and cfg.aux_loss_coef > 0:
                if noise_std is not None:
                    balance = self._importance_load(logits, select, noise_std, experts, weights)
                else:
                    probs = scores if cfg.router != "sigmoid" else scores / scores.sum(-1, keepdim=True)
                    share = counts.float() / experts.numel()  # (E,) f_i
                    balance = cfg.n_experts * (share * probs.mean(0)).sum()
            if losses and cfg.z_loss_coef > 0:
                z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return Routing(experts, weights, counts, balance, z_loss)

    def _importance_load(
        self,
        clean: torch.Tensor,
        noisy: torch.Tensor,
        noise_std: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Shazeer et al. (2017): ``CV(importance)^2 + CV(load)^2`` over the batch.

        Args:
            clean: (N, E) logits without noise.
            noisy: (N, E) logits with noise (the ones the top-k ran on).
            noise_std: (N, E) per-token noise scale ``softplus(x W_noise^T)``.
            experts: (N, K) chosen experts.
            weights: (N, K) their gates.
        """
        k = self.cfg.top_k
        importance = torch.zeros(self.cfg.n_experts, device=clean.device).index_add(
            0, experts.flatten(), weights.flatten()
        )  # (E,)
        top = noisy.topk(k + 1, dim=-1).values  # (N, K+1)
        threshold_in, threshold_out = top[:, k : k + 1], top[:, k - 1 : k]  # (N, 1) each
        is_in = noisy > threshold_in  # (N, E): would stay selected with the (K+1)-th as competitor
        normal = torch.distributions.Normal(0.0, 1.0)
        threshold = torch.where(is_in, threshold_in, threshold_out)  # (N, E) kth_excluding(H, K, i)
        load = normal.cdf((clean - threshold) / noise_std.clamp_min(1e-9)).sum(0)  # (E,)
        return _cv_squared(importance) + _cv_squared(load)
