"""Absolute position signals: sinusoidal (Vaswani et al., 2017) and ALiBi (Press et al., 2021).

Learned absolute positions (GPT-1/2) are a plain ``nn.Embedding`` indexed by position.
"""

from __future__ import annotations

import math

import torch


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention Is All You Need".

    ``PE[p, 2i] = sin(p / 10000^(2i/d))`` and ``PE[p, 2i+1] = cos(p / 10000^(2i/d))``.

    Args:
        positions: Integer positions of any shape ``S``.
        dim: Model width (even).

    Returns:
        float32 tensor of shape ``S + (dim,)``.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got dim={dim}")
    div = torch.exp(torch.arange(0, dim, 2, device=positions.device).float() * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * div  # S + (dim/2,)
    out = torch.stack((angles.sin(), angles.cos()), dim=-1)  # S + (dim/2, 2): interleave sin, cos
    return out.flatten(-2)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al., 2021), as BLOOM uses them.

    For ``n`` a power of two the slopes are ``2^(-8 i / n)``, i = 1..n. Otherwise the slopes of the
    closest smaller power of two are followed by every other slope of the next power of two.

    Returns:
        float32 tensor (n_heads,).
    """
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra_base = 2.0 ** (-4.0 / closest)  # = 2^(-8 / (2 * closest))
        n_extra = n_heads - closest
        slopes += [extra_base ** (2 * i + 1) for i in range(n_extra)]
    return torch.tensor(slopes, dtype=torch.float32)
