"""Low-rank adapters as a module transform: LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023)
and DoRA (Liu et al., 2024, weight-decomposed low-rank adaptation).

``apply_lora(model, cfg)`` walks ``named_modules()`` and swaps every targeted linear layer for a
``LoRALinear`` that keeps the original layer as ``base_layer``; nothing else in the model changes.
Parameter names are PEFT's (``<name>.base_layer.weight``, ``<name>.lora_A.weight``,
``<name>.lora_B.weight``, ``<name>.lora_magnitude_vector``), so adapters map onto PEFT files by
name (``evolm.models.adapters``).

Notation: N tokens (any leading shape), I = in_features, O = out_features, r = rank, s = scaling::

              ┌──── base_layer: W (O, I), frozen ─────────┐
    x (N, I) ─┤                                            (+)──> y (N, O)
              └── dropout ── A (r, I) ── B (O, r) ── × s ──┘

    LoRA    y = x W^T + b + s · dropout(x) A^T B^T        s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA    W' = m ⊙ (W + s B A) / ‖W + s B A‖_row        m (O,) learned, the norm detached (DoRA §4.3)

B starts at zero, so a freshly wrapped model computes exactly what the base model does. DoRA's
magnitude starts at the row norms of W, so it too starts as the identity. The base layer can be
an ``nn.Linear`` or a 4-bit ``evolm.nn.nf4.Linear4bit`` (QLoRA): its weight is read through
``base_weight()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from evolm.errors import ConfigError

LORA_PARAM_NAMES = ("lora_A", "lora_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class LoRAConfig:
    """Which linear layers get adapters, and their shape.

    Attributes:
        rank: Rank r of the update B A.
        alpha: Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        dropout: Dropout on the adapter's input (training only).
        targets: Module names to adapt, matched as PEFT matches a list: a module whose full name
            equals an entry or ends with ``.entry``; ``all-linear`` adapts every linear layer but
            the output head. Comma-separated strings are split (``q_proj,v_proj``).
        rslora: Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023).
        dora: Weight-decomposed LoRA: a learned magnitude per output row (Liu et al., 2024).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False
    dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"lora.rank={self.rank!r}; must be a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha!r}; must be a positive number")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout={self.dropout!r}; must be in [0, 1)")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        split = tuple(t.strip() for entry in targets for t in str(entry).split(",") if t.strip())
        if not split:
            raise ConfigError("lora.targets is empty; name the linear layers to adapt (e.g. q_proj,v_proj)")
        object.__setattr__(self, "targets", split)

    @property
    def scaling(self) -> float:
        """The factor s on the update B A."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The (O, I) weight of a plain or quantised linear layer, dequantised if it is stored packed."""
    dequantize = getattr(layer, "dequantize", None)
    return dequantize() if dequantize is not None else layer.weight


class LoRALinear(nn.Module):
    """A linear layer plus a trainable low-rank update (LoRA), optionally weight-decomposed (DoRA).

    Args:
        base_layer: The layer to adapt: ``nn.Linear`` or ``Linear4bit``; kept (frozen) as ``base_layer``.
        cfg: Rank, alpha, dropout, scaling and DoRA.
    """

    def __init__(self, base_layer: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.cfg = cfg
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.scaling = cfg.scaling
        w = base_weight(base_layer)
        factory = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        # nn.Linear's default init of A is kaiming_uniform(a=sqrt(5)), PEFT's default; B = 0
        self.lora_A = nn.Linear(self.in_features, cfg.rank, bias=False, **factory)
        self.lora_B = nn.Linear(cfg.rank, self.out_features, bias=False, **factory)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        if cfg.dora:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(w.float(), dim=1).to(factory["dtype"])  # (O,)
            self.lora_magnitude_vector = nn.Parameter(norm)
        self.merged = False
        self._merge_norm: torch.Tensor | None = None  # DoRA's row norms at merge time, for unmerge

    def delta_weight(self) -> torch.Tensor:
        """s · B A, (O, I)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _dora_factor(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """m / ‖W + ΔW‖_row, (O,), the norm detached from the graph as DoRA §4.3 prescribes."""
        norm = torch.linalg.vector_norm(w + delta.detach(), dim=1).detach()
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., I) -> (..., O)."""
        y = self.base_layer(x)
        if self.merged:
            return y
        xd = self.lora_dropout(x)
        update = self.lora_B(self.lora_A(xd)) * self.scaling  # (..., r) -> (..., O)
        if not self.cfg.dora:
            return y + update
        w = base_weight(self.base_layer).to(x.dtype)
        factor = self._dora_factor(w, self.delta_weight().to(x.dtype))  # (O,)
        if xd is x:  # no dropout: the base product without bias is already inside y
            bias = self.base_layer.bias
            base = y - bias if bias is not None else y
        else:  # the magnitude rescales the product of the dropped-out input, as in PEFT
            base = F.linear(xd, w)
        return y + (factor - 1) * base + factor * update

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base_layer.weight`` (a plain ``nn.Linear`` base only)."""
        if self.merged:
            return
        if not isinstance(self.base_layer, nn.Linear):
            raise TypeError(
                f"cannot merge into a {type(self.base_layer).__name__} in place; use unload_lora(merge=True), "
                "which dequantises the base weight into a new nn.Linear"
            )
        w = self.base_layer.weight
        delta = self.delta_weight().to(w.dtype)
        if self.cfg.dora:
            self._merge_norm = torch.linalg.vector_norm(w + delta, dim=1)  # (O,)
            w.copy_((self.lora_magnitude_vector / self._merge_norm)[:, None] * (w + delta))
        else:
            w.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of ``base_layer.weight`` (exact up to float rounding)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        delta = self.delta_weight().to(w.dtype)
        if self.cfg.dora:
            w.copy_(w / (self.lora_magnitude_vector / self._merge_norm)[:, None] - delta)
            self._merge_norm = None
        else:
            w.sub_(delta)
        self.merged = False

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` whose weight is the adapted weight (the base is not changed)."""
        w = base_weight(self.base_layer)
        dtype = w.dtype if w.is_floating_point() else torch.float32
        w = w.to(dtype)
        if not self.merged:
            delta = self.delta_weight().to(dtype)
            if self.cfg.dora:
                w = (self.lora_magnitude_vector / torch.linalg.vector_norm(w + delta, dim=1))[:, None] * (w + delta)
            else:
                w = w + delta
        bias = self.base_layer.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias)
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        return f"rank={c.rank}, alpha={c.alpha}, scaling={self.scaling:.4g}, dropout={c.dropout}, dora={c.dora}"


def _is_linear(module: nn.Module) -> bool:
    from evolm.nn.nf4 import Linear4bit

    return isinstance(module, nn.Linear | Linear4bit)


def matches(name: str, targets: tuple[str, ...], output_head: str = "lm_head") -> bool:
    """Whether module ``name`` is targeted (PEFT's list rule: equal, or ending with ``.target``)."""
    if "all-linear" in targets and name != output_head and not name.endswith(f".{output_head}"):
        return True
    return any(name == t or name.endswith(f".{t}") for t in targets)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every targeted linear layer of ``model`` in a ``LoRALinear``, in place.

    Also freezes everything but the adapters (``mark_only_lora_trainable``).

    Returns:
        The full names of the wrapped modules, in model order.

    Raises:
        ConfigError: no linear layer matches ``cfg.targets`` (the message lists the linear names).
    """
    chosen = [
        name
        for name, module in model.named_modules()
        if _is_linear(module)
        and matches(name, cfg.targets)
        and not {"base_layer", "lora_A", "lora_B"} & set(name.split("."))  # already inside an adapter
    ]
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(f"lora.targets={list(cfg.targets)} match no linear layer; this model has {names}")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, LoRALinear(old, cfg).train(old.training))  # eval models stay in eval
    mark_only_lora_trainable(model)
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Name -> ``LoRALinear`` of every adapted layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_param(name: str) -> bool:
    """Whether parameter ``name`` belongs to an adapter (not to a base layer)."""
    return any(f".{p}" in f".{name}" for p in LORA_PARAM_NAMES)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """``requires_grad`` on adapter parameters only; every base parameter is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their module names (``...q_proj.lora_A.weight``, ...)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (``LoRALinear.merge``); forward then skips the adapters."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora``."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear``, in place, and return the model.

    With ``merge`` the new layer holds the adapted weight (quantised bases are dequantised), so the
    model saves under its original tensor names with the adapters folded in; without it the base
    layer comes back unchanged.
    """
    from evolm.nn.linear import Linear

    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        plain = layer.merged_linear() if merge else layer.base_layer
        if type(plain) is nn.Linear:  # evolm's Linear (same parameters) keeps its oneDNN products
            fast = Linear(plain.in_features, plain.out_features, bias=plain.bias is not None, device="meta")
            fast.weight, fast.bias = plain.weight, plain.bias
            plain = fast
        setattr(parent, child, plain)
    return model
