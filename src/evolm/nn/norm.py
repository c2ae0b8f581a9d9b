"""Normalisation layers: LayerNorm (Ba et al., 2016) and RMSNorm (Zhang & Sennrich, 2019).

Both compute in float32 and cast back, as the reference implementations do, so that bf16 models
normalise with full-precision statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from evolm.errors import ConfigError


@dataclass(frozen=True)
class NormConfig:
    """Which normalisation a model uses.

    Attributes:
        kind: ``"rmsnorm"`` or ``"layernorm"``.
        eps: Added to the variance before the square root.
        bias: LayerNorm only: learn an additive bias (GPT-2, BLOOM) or not (OLMo-style).
        affine: Learn a scale at all; ``False`` gives OLMo-1's parameter-free LayerNorm.
        unit_offset: RMSNorm only: scale by ``1 + w`` with ``w`` initialised at zero (Gemma).
    """

    kind: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    eps: float = 1e-6
    bias: bool = True
    affine: bool = True
    unit_offset: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"norm.kind={self.kind!r}; allowed: 'rmsnorm', 'layernorm'")
        if not self.eps > 0:
            raise ConfigError(f"norm.eps={self.eps}; must be > 0")


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * w`` (Zhang & Sennrich, 2019).

    With ``unit_offset`` the scale is ``1 + w`` (Gemma), so a zero-initialised weight is the identity.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of ``x`` (any shape ``(..., dim)``)."""
        dtype = x.dtype
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + self.weight.float())).to(dtype)
        return self.weight * y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


class LayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al., 2016) computed in float32, with optional bias and affine scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def make_norm(cfg: NormConfig, dim: int) -> nn.Module:
    """Build the norm ``cfg`` describes over a last dimension of size ``dim``."""
    if cfg.kind == "rmsnorm":
        return RMSNorm(dim, eps=cfg.eps, unit_offset=cfg.unit_offset)
    return LayerNorm(dim, eps=cfg.eps, elementwise_affine=cfg.affine, bias=cfg.bias and cfg.affine)
