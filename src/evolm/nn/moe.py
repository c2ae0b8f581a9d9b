"""Sparse mixture-of-experts feed-forward layers (Shazeer et al., 2017; GShard; Switch; Mixtral;
DeepSeekMoE, Dai et al., 2024).

Notation: B batch, T time, N = B*T tokens, C model width, E routed experts, K experts per token,
F expert width, M = N*K token-expert assignments (fewer after capacity drops).

    x (B,T,C) ─┬─ router ── (N,K) experts, weights ──┐
               │                                      v
               ├─ sort the M assignments by expert ── gather (M,C) ── expert e on its slice ──
               │     weighted index_add back to (N,C) ─────────────────────────────────────(+)──> y
               └─ shared experts (always on; Qwen2-MoE: times sigmoid(shared_expert_gate(x))) ┘

Dispatch scales with tokens: one stable argsort of the M assignments, one gather, each expert run
once on its contiguous slice (a loop over experts, not tokens), one index_add. Expert weights are
stored fused as transformers 5 holds them in memory, ``experts.gate_up_proj`` (E, 2F, C) and
``experts.down_proj`` (E, C, F), so a grouped matmul reads them in place; checkpoints store one
2-D tensor per expert, which ``fuse_expert_weights`` / ``split_expert_weights`` map by name.

Training records the layer's balancing loss, z-loss and expert load; ``aux_loss()`` hands them to
the training objective. Inference records nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from evolm.errors import ConfigError
from evolm.nn import linear as _linear
from evolm.nn.linear import Linear
from evolm.nn.mlp import ACTIVATIONS, GatedMLP, MLPConfig
from evolm.nn.router import Router, Routing


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts feed-forward layer.

    Attributes:
        n_experts: E routed experts.
        top_k: K experts per token.
        expert_hidden: F, each expert's inner width (``moe_intermediate_size``).
        router: ``softmax``, ``noisy`` (Shazeer 2017) or ``sigmoid`` (DeepSeek-V3); see ``evolm.nn.router``.
        norm_topk: Renormalise the K kept weights to sum to 1 (Mixtral, DeepSeek-V3).
        routed_scale: Multiply the routed weights by this (DeepSeek ``routed_scaling_factor``).
        n_group: G expert groups for group-limited routing (1: none).
        topk_group: Groups a token may use.
        correction_bias: Keep DeepSeek-V3's balancing bias ``e_score_correction_bias`` (added to the
            scores for the choice of experts only).
        bias_update_rate: Auxiliary-loss-free balancing (DeepSeek-V3): after each optimizer step the
            bias of an overloaded expert drops by this, of an underloaded one rises (0: off).
        capacity_factor: Switch capacity: an expert takes at most ``ceil(factor * M / E)`` assignments
            per batch while training; the rest are dropped (the token keeps its residual). None: no cap.
        aux_loss_coef: Weight of the balancing loss (Switch loss; importance + load for ``noisy``).
        z_loss_coef: Weight of the router z-loss (ST-MoE).
        activation: Expert activation (``evolm.nn.mlp.ACTIVATIONS``).
        gated: GLU experts (``act(gate) * up``) instead of a two-layer MLP.
        shared_hidden: Inner width of the always-on shared expert (0: none). DeepSeekMoE's
            ``n_shared_experts`` shared experts are one MLP of ``n_shared * F``.
        shared_gate: Scale the shared expert by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).
    """

    n_experts: int
    top_k: int
    expert_hidden: int
    router: Literal["softmax", "noisy", "sigmoid"] = "softmax"
    norm_topk: bool = False
    routed_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False
    bias_update_rate: float = 0.0
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    gated: bool = True
    shared_hidden: int = 0
    shared_gate: bool = False

    def __post_init__(self) -> None:
        e, k = self.n_experts, self.top_k
        for name in ("n_experts", "top_k", "expert_hidden", "n_group", "topk_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"moe.{name}={value!r}; must be a positive integer")
        if k > e:
            raise ConfigError(f"moe.top_k={k}; must be <= n_experts={e}")
        if self.router not in ("softmax", "noisy", "sigmoid"):
            raise ConfigError(f"moe.router={self.router!r}; allowed: 'softmax', 'noisy', 'sigmoid'")
        if self.router == "noisy" and k == e:
            raise ConfigError(
                f"moe.router='noisy' needs top_k < n_experts (got {k} of {e}): its load loss compares with the (K+1)-th"
            )
        if e % self.n_group or self.topk_group > self.n_group:
            raise ConfigError(
                f"moe.n_group={self.n_group}, topk_group={self.topk_group}; n_group must divide n_experts={e} "
                "and topk_group must be <= n_group"
            )
        if self.n_group > 1 and k > self.topk_group * (e // self.n_group):
            raise ConfigError(
                f"moe.top_k={k} exceeds the {self.topk_group * (e // self.n_group)} experts of the kept groups"
            )
        if self.n_group > 1 and self.router == "sigmoid" and e // self.n_group < 2:
            raise ConfigError("moe: sigmoid group scores sum each group's two best experts; groups need >= 2 experts")
        if self.bias_update_rate < 0 or (self.bias_update_rate > 0 and not self.correction_bias):
            raise ConfigError(
                f"moe.bias_update_rate={self.bias_update_rate}; must be >= 0, and > 0 needs correction_bias"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"moe.capacity_factor={self.capacity_factor}; must be > 0 or None")
        for name in ("aux_loss_coef", "z_loss_coef", "routed_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name}={getattr(self, name)}; must be >= 0")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"moe.activation={self.activation!r}; allowed: {sorted(ACTIVATIONS)}")
        if self.shared_hidden < 0 or (self.shared_gate and self.shared_hidden == 0):
            raise ConfigError(f"moe.shared_hidden={self.shared_hidden}; must be >= 0, and > 0 with shared_gate")


def _product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x w^T``: x (n, I), w (O, I) any strides -> (n, O); oneDNN on CPU (see ``evolm.nn.linear``)."""
    if x.shape[0] == 0:
        return x.new_empty(0, w.shape[0])
    if _linear._ENABLED and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        return _linear._mm(x.contiguous(), w)
    return F.linear(x, w)


# d act(h) / dh applied to a gradient, as single fused ATen kernels: (grad, h) -> grad * act'(h)
_ACT_BACKWARD = {
    "silu": torch.ops.aten.silu_backward,
    "gelu": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="none"),
    "gelu_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "relu": lambda g, h: torch.ops.aten.threshold_backward(g, h, 0),
}


class _ExpertMLP(torch.autograd.Function):
    """Every expert's feed-forward on its contiguous rows: a grouped matmul with the activation fused in.

    For expert e with rows x_e (n_e, C), ``W_up`` (E, 2F, C) = ``[W_gate; W_up]`` per expert ((E, F, C)
    ungated) and ``W_down`` (E, C, F)::

        forward   g = x_e W_gate_e^T, u = x_e W_up_e^T   (n_e, F)    a = act(g) * u   (n_e, F)
                  y_e = a W_down_e^T                      (n_e, C)
        backward  da = dy_e W_down_e                      dW_down_e = dy_e^T a
                  dg = da * u * act'(g), du = da * act(g)
                  dx_e = dg W_gate_e + du W_up_e          dW_gate_e = dg^T x_e, dW_up_e = du^T x_e

    Products run through oneDNN on CPU (``evolm.nn.linear``), gate and up as two products on the two
    contiguous halves of ``W_up[e]`` so every elementwise step reads contiguous (n_e, F) tensors. The
    saved tensors are those autograd would save (g, u, act(g), a); only the (M, C) output, the input
    gradient and the weight gradients are concatenated.
    """

    @staticmethod
    def forward(ctx, x, w_up, w_down, counts: list[int], activation: str, gated: bool) -> torch.Tensor:
        """x (M, C) sorted by expert, ``counts[e]`` rows each -> (M, C)."""
        act = ACTIVATIONS[activation]
        f = w_down.shape[2]
        saved, ys = [], []
        for e, xe in enumerate(x.split(counts)):
            if gated:
                g, u = _product(xe, w_up[e, :f]), _product(xe, w_up[e, f:])  # (n_e, F) each
                ag = act(g)
                a = ag * u
                saved.append((g, u, ag, a))
            else:
                g = _product(xe, w_up[e])  # (n_e, F)
                a = act(g)
                saved.append((g, a))
            ys.append(_product(a, w_down[e]))  # (n_e, C)
        ctx.save_for_backward(x, w_up, w_down)
        ctx.saved, ctx.counts, ctx.activation, ctx.gated = saved, counts, activation, gated
        return torch.cat(ys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w_up, w_down = ctx.saved_tensors
        act_backward = _ACT_BACKWARD[ctx.activation]
        f = w_down.shape[2]
        gx, g_up, g_down = [], [], []
        for e, (xe, dy) in enumerate(zip(x.split(ctx.counts), grad.split(ctx.counts), strict=True)):
            if len(xe) == 0:
                gx.append(xe)
                g_up.append(w_up.new_zeros(w_up.shape[1:]))
                g_down.append(w_down.new_zeros(w_down.shape[1:]))
                continue
            da = _product(dy, w_down[e].t())  # (n_e, F)
            if ctx.gated:
                g, u, ag, a = ctx.saved[e]
                dg, du = act_backward(da * u, g), da * ag  # (n_e, F) each
                gx.append(_product(dg, w_up[e, :f].t()) + _product(du, w_up[e, f:].t()))  # (n_e, C)
                g_up += [_product(dg.t(), xe.t()), _product(du.t(), xe.t())]  # (F, C) each
            else:
                g, a = ctx.saved[e]
                dg = act_backward(da, g)
                gx.append(_product(dg, w_up[e].t()))  # (n_e, C)
                g_up.append(_product(dg.t(), xe.t()))  # (F, C)
            g_down.append(_product(dy.t(), a.t()))  # (C, F)
        ctx.saved = None
        return torch.cat(gx), torch.cat(g_up).view(w_up.shape), torch.stack(g_down), None, None, None


class Experts(nn.Module):
    """E feed-forward experts with fused weights: ``gate_up_proj`` (E, 2F, C) and ``down_proj`` (E, C, F)
    (``up_proj`` (E, F, C) instead of ``gate_up_proj`` for ungated experts)."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        e, f = cfg.n_experts, cfg.expert_hidden
        self.gated = cfg.gated
        if cfg.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, dim))
        else:
            self.up_proj = nn.Parameter(torch.empty(e, f, dim))
        self.down_proj = nn.Parameter(torch.empty(e, dim, f))
        self.activation = cfg.activation
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Every expert matrix ~ N(0, std), as ``nn.Linear`` weights are initialised (GPT-2)."""
        for p in self.parameters():
            if not p.is_meta:
                p.normal_(0.0, std)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (M, C) sorted by expert, ``counts[e]`` rows for expert e -> (M, C).

        Under autocast the products run in the autocast dtype, as ``F.linear``'s would.
        """
        w_up = self.gate_up_proj if self.gated else self.up_proj
        w_down = self.down_proj
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_up, w_down = x.to(dtype), w_up.to(dtype), w_down.to(dtype)
        return _ExpertMLP.apply(x, w_up, w_down, counts, self.activation, self.gated)


class _Dispatch(torch.autograd.Function):
    """Gather token rows into expert order: ``x[token]``; backward sums each token's K slots.

    ``position`` (K*N,) gives each routing slot's row in the sorted buffer, or M for a dropped one, so
    the backward is a gather too (no scatter-add with repeated indices).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, position: torch.Tensor, k: int) -> torch.Tensor:
        """x (N, C), token (M,) -> (M, C)."""
        ctx.save_for_backward(position)
        ctx.k, ctx.n = k, x.shape[0]
        return x.index_select(0, token)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (position,) = ctx.saved_tensors
        if grad.shape[0] < position.shape[0]:  # dropped slots read a zero row
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])
        gx = grad.index_select(0, position).view(ctx.k, ctx.n, -1).sum(0)  # (K, N, C) -> (N, C)
        return gx, None, None, None


class _Combine(torch.autograd.Function):
    """Expert outputs back to routing-slot order: (M, C) -> (K*N, C), zeros for dropped slots."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, order: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        if y.shape[0] < position.shape[0]:
            y = torch.cat([y, y.new_zeros(1, y.shape[1])])
        return y.index_select(0, position)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


def dispatch(
    x: torch.Tensor,
    routing: Routing,
    experts: nn.Module,
    capacity: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Run every token through its K experts and sum the weighted outputs.

    The K*N routing slots (first choices first) are sorted by expert (stable: token order within an
    expert), gathered into one (M, C) buffer, run as E contiguous slices, gathered back to slot
    order and summed over K with their weights. Every data movement is a gather.

    Args:
        x: (N, C) tokens.
        routing: The router's (N, K) experts and weights and (E,) counts.
        experts: Module called as ``experts(x_sorted (M, C), counts: list[int]) -> (M, C)``.
        capacity: Most assignments an expert takes (Switch); the surplus, latest tokens and second
            choices first, is dropped and contributes nothing. None: no cap.

    Returns:
        (N, C) mixture output and the number of dropped assignments.
    """
    n, k = routing.experts.shape
    slots = routing.experts.t().reshape(-1)  # (K*N,) slot s = k*N + n, first choices first
    order = torch.argsort(slots, stable=True)  # (K*N,) grouped by expert, token order within
    counts = routing.counts
    dropped = 0
    if capacity is not None and int(counts.max()) > capacity:
        starts = counts.cumsum(0) - counts  # (E,)
        rank = torch.arange(order.numel(), device=x.device) - starts[slots[order]]  # place in its expert's queue
        order = order[rank < capacity]
        counts = counts.clamp(max=capacity)
        dropped = n * k - order.numel()
    position = torch.full_like(slots, order.numel())  # (K*N,) row of each slot in the buffer; M: dropped
    position[order] = torch.arange(order.numel(), device=x.device)
    xs = _Dispatch.apply(x, order % n, position, k)  # (M, C)
    ys = _Combine.apply(experts(xs, counts.tolist()), order, position)  # (K*N, C)
    w = routing.weights.t().to(ys.dtype)[..., None]  # (K, N, 1)
    return (ys.view(k, n, -1) * w).sum(0), dropped


class MoE(nn.Module):
    """A sparse mixture-of-experts feed-forward layer: ``router`` + ``experts`` (+ shared experts).

    Parameter names follow transformers 5: ``gate.weight`` (E, C), ``gate.e_score_correction_bias``,
    ``experts.gate_up_proj``, ``experts.down_proj``, ``shared_experts.{gate,up,down}_proj.weight``,
    ``shared_expert_gate.weight`` (1, C).
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(dim, cfg)
        self.experts = Experts(dim, cfg)
        if cfg.shared_hidden:
            self.shared_experts = GatedMLP(dim, MLPConfig(cfg.shared_hidden, activation=cfg.activation))
        if cfg.shared_gate:
            self.shared_expert_gate = Linear(dim, 1, bias=False)
        self._record: tuple[torch.Tensor | None, torch.Tensor, int] | None = None
        self._load_sum: torch.Tensor | None = None  # assignments per expert since the last bias update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        cfg = self.cfg
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # (N, C)
        train = self.training and torch.is_grad_enabled()
        routing = self.gate(h, losses=train)
        capacity = None
        if train and cfg.capacity_factor is not None:
            capacity = math.ceil(cfg.capacity_factor * routing.experts.numel() / cfg.n_experts)
        y, dropped = dispatch(h, routing, self.experts, capacity)  # (N, C)
        if cfg.shared_hidden:
            shared = self.shared_experts(h)  # (N, C)
            if cfg.shared_gate:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            y = y + shared
        self._record = None
        if train:
            loss = None
            if routing.balance is not None:
                loss = cfg.aux_loss_coef * routing.balance
            if routing.z_loss is not None:
                z = cfg.z_loss_coef * routing.z_loss
                loss = z if loss is None else loss + z
            self._record = (loss, routing.counts.detach(), dropped)
            if cfg.bias_update_rate > 0:
                load = routing.counts.detach().float()
                self._load_sum = load if self._load_sum is None else self._load_sum + load
        return y.view(shape)

    def aux_loss(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The last training forward's weighted balancing + z-loss (a per-token mean, or None) and
        expert-utilisation metrics: ``load_max`` / ``load_min``, the busiest / idlest expert's
        assignments over the mean (1 and 1 when balanced; E/K and 0 when collapsed), and
        ``dropped``, the share of assignments over capacity (when a capacity factor is set)."""
        if self._record is None:
            return None, {}
        loss, counts, dropped = self._record
        c = counts.float()
        mean = c.mean().clamp_min(1e-9)
        metrics = {"load_max": float(c.max() / mean), "load_min": float(c.min() / mean)}
        if self.cfg.capacity_factor is not None:
            metrics["dropped"] = dropped / max(int(counts.sum()), 1)
        return loss, metrics


@torch.no_grad()
def update_router_biases(model: nn.Module, rate: float | None = None) -> int:
    """Auxiliary-loss-free load balancing (DeepSeek-AI, 2024, DeepSeek-V3, section 2.1.2).

    After an optimizer step, each MoE layer's ``e_score_correction_bias`` moves by ``rate`` against
    its expert's load over the step: ``b_i += rate * sign(mean_load - load_i)``. Loads are summed
    over all ranks when ``torch.distributed`` is initialised, so replicas stay identical. Layers with
    ``bias_update_rate == 0`` (the default) accumulate no load and are left alone.

    Args:
        model: Any module containing ``MoE`` layers (others are a no-op).
        rate: Step size; None uses each layer's ``cfg.bias_update_rate``.

    Returns:
        The number of layers updated.
    """
    updated = 0
    for m in model.modules():
        if not isinstance(m, MoE) or m._load_sum is None:
            continue
        load, m._load_sum = m._load_sum, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        step = m.cfg.bias_update_rate if rate is None else rate
        bias = m.gate.e_score_correction_bias
        bias += (step * torch.sign(load.mean() - load)).to(bias.dtype)
        updated += 1
    return updated


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)\.weight$")


def fuse_expert_weights(
    state: Mapping[str, torch.Tensor], names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> dict[str, torch.Tensor]:
    """Checkpoint per-expert tensors -> the fused layout of ``Experts``.

    ``P.experts.{e}.{gate}.weight`` (F, C) and ``P.experts.{e}.{up}.weight`` (F, C) become
    ``P.experts.gate_up_proj`` (E, 2F, C); ``P.experts.{e}.{down}.weight`` (C, F) becomes
    ``P.experts.down_proj`` (E, C, F). An ungated checkpoint (no gate tensors) gives
    ``P.experts.up_proj`` (E, F, C). Other tensors pass through.

    Args:
        state: Checkpoint tensors.
        names: The checkpoint's (gate, up, down) names: HF's default, Mixtral's ``("w1", "w3", "w2")``.
    """
    gate, up, down = names
    out: dict[str, torch.Tensor] = {}
    found: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, t in state.items():
        m = _EXPERT.match(key)
        if m is None or m.group(3) not in names:
            out[key] = t
            continue
        found.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
    for prefix, parts in found.items():
        stacked = {name: torch.stack([parts[name][e] for e in sorted(parts[name])]) for name in parts}
        if gate in stacked:
            out[f"{prefix}.gate_up_proj"] = torch.cat([stacked[gate], stacked[up]], dim=1)  # (E, 2F, C)
        else:
            out[f"{prefix}.up_proj"] = stacked[up]  # (E, F, C)
        out[f"{prefix}.down_proj"] = stacked[down]  # (E, C, F)
    return out


def split_expert_weights(
    state: Mapping[str, torch.Tensor], names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> dict[str, torch.Tensor]:
    """Inverse of ``fuse_expert_weights``: fused ``P.experts.*`` tensors -> one 2-D tensor per expert."""
    gate, up, down = names
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        prefix, _, leaf = key.rpartition(".")
        if not prefix.endswith("experts") or leaf not in ("gate_up_proj", "up_proj", "down_proj") or t.dim() != 3:
            out[key] = t
            continue
        for e in range(t.shape[0]):
            if leaf == "gate_up_proj":
                g, u = t[e].chunk(2, dim=0)  # (F, C) each
                out[f"{prefix}.{e}.{gate}.weight"] = g.contiguous()
                out[f"{prefix}.{e}.{up}.weight"] = u.contiguous()
            else:
                out[f"{prefix}.{e}.{up if leaf == 'up_proj' else down}.weight"] = t[e].contiguous()
    return out
