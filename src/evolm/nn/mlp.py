"""Position-wise feed-forward networks.

* ``MLP``: ``down(act(up(x)))``, the Transformer's original FFN (Vaswani et al., 2017), with
  GELU (Hendrycks & Gimpel, 2016) in GPT-2/BERT.
* ``GatedMLP``: ``down(act(gate(x)) * up(x))``, the GLU variants of Shazeer (2020): SwiGLU with
  SiLU (Llama, Mistral, Qwen), GeGLU with GELU (Gemma).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from evolm.errors import ConfigError
from evolm.nn.linear import Linear, linear_group

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class MLPConfig:
    """Feed-forward block shape.

    Attributes:
        hidden_size: Inner width (``intermediate_size`` in HF configs).
        gated: GLU variant with ``gate_proj`` (SwiGLU/GeGLU) instead of a plain two-layer MLP.
        activation: One of ``ACTIVATIONS``.
        bias: Linear layers carry biases.
    """

    hidden_size: int
    gated: bool = True
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    bias: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size <= 0:
            raise ConfigError(f"mlp.hidden_size={self.hidden_size}; must be > 0")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"mlp.activation={self.activation!r}; allowed: {sorted(ACTIVATIONS)}")


class MLP(nn.Module):
    """``down_proj(act(up_proj(x)))``."""

    def __init__(self, dim: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.up_proj = Linear(dim, cfg.hidden_size, bias=cfg.bias)
        self.down_proj = Linear(cfg.hidden_size, dim, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.down_proj(self.act(self.up_proj(x)))


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (Shazeer, 2020)."""

    def __init__(self, dim: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, cfg.hidden_size, bias=cfg.bias)
        self.up_proj = Linear(dim, cfg.hidden_size, bias=cfg.bias)
        self.down_proj = Linear(cfg.hidden_size, dim, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        gate, up = linear_group(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.act(gate) * up)


def make_mlp(cfg: MLPConfig, dim: int) -> nn.Module:
    """Build the feed-forward block ``cfg`` describes for model width ``dim``."""
    return GatedMLP(dim, cfg) if cfg.gated else MLP(dim, cfg)
