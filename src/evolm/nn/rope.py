"""Rotary position embedding (Su et al., 2021, RoFormer) and the context-extension scalings
found in real checkpoints.

Scalings (``RopeScaling.kind``):
* ``linear``: position interpolation (Chen et al., 2023): every frequency divided by ``factor``.
* ``dynamic``: dynamic NTK-aware scaling (bloc97, 2023; Code Llama): the base grows with the
  current length once it passes ``original_max_position``.
* ``llama3``: Llama 3.1's wavelength-banded interpolation (Meta, 2024).
* ``yarn``: YaRN (Peng et al., 2023): ramped interpolation by wavelength plus a temperature on
  cos/sin.
* ``longrope``: LongRoPE (Ding et al., 2024; Phi-3): per-frequency rescale factors, short/long.

Rotation is the "rotate half" layout of GPT-NeoX / HF (pairs ``(i, i + d/2)``), applied to the first
``rotary_dim`` channels of each head only (partial rotary, GPT-NeoX / Phi).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from evolm.errors import ConfigError

SCALINGS = ("linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE context-extension scheme; fields not used by ``kind`` keep their defaults."""

    kind: Literal["linear", "dynamic", "llama3", "yarn", "longrope"]
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    attention_factor: float | None = None  # yarn, longrope: temperature on cos/sin
    short_factor: tuple[float, ...] = field(default_factory=tuple)  # longrope
    long_factor: tuple[float, ...] = field(default_factory=tuple)  # longrope

    def __post_init__(self) -> None:
        if self.kind not in SCALINGS:
            raise ConfigError(f"rope scaling kind={self.kind!r}; supported: {list(SCALINGS)}")
        if self.kind != "longrope" and not self.factor >= 1.0:
            raise ConfigError(f"rope scaling factor={self.factor}; must be >= 1")
        if self.kind in ("dynamic", "llama3", "yarn", "longrope") and not self.original_max_position:
            raise ConfigError(f"rope scaling {self.kind!r} needs original_max_position (> 0)")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention layer.

    Attributes:
        theta: Base of the geometric frequency ladder.
        rotary_dim: Channels per head that rotate (even); the rest pass through.
        scaling: Optional context-extension scheme.
    """

    theta: float = 10000.0
    rotary_dim: int = 64
    scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ConfigError(f"rope.rotary_dim={self.rotary_dim}; must be a positive even number")
        if not self.theta > 0:
            raise ConfigError(f"rope.theta={self.theta}; must be > 0")


def _base_inv_freq(theta: float, dim: int, device: torch.device | None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponents)


def inverse_frequencies(
    cfg: RopeConfig, seq_len: int, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies and the cos/sin temperature for a given context length.

    Args:
        cfg: The rotary configuration.
        seq_len: Largest position in use plus one; only ``dynamic`` and ``longrope`` depend on it.
        device: Where to build the result.

    Returns:
        ``(inv_freq, attention_factor)``: ``inv_freq`` is float32 of shape ``(rotary_dim // 2,)``.
    """
    d, s = cfg.rotary_dim, cfg.scaling
    if s is None:
        return _base_inv_freq(cfg.theta, d, device), 1.0
    if s.kind == "linear":
        return _base_inv_freq(cfg.theta, d, device) / s.factor, 1.0
    if s.kind == "dynamic":
        orig = s.original_max_position
        if seq_len <= orig:
            return _base_inv_freq(cfg.theta, d, device), 1.0
        base = cfg.theta * ((s.factor * seq_len / orig) - (s.factor - 1)) ** (d / (d - 2))
        return _base_inv_freq(base, d, device), 1.0
    if s.kind == "llama3":
        return _llama3(cfg, device), 1.0
    if s.kind == "yarn":
        return _yarn(cfg, device)
    return _longrope(cfg, seq_len, device)


def _llama3(cfg: RopeConfig, device: torch.device | None) -> torch.Tensor:
    s = cfg.scaling
    inv = _base_inv_freq(cfg.theta, cfg.rotary_dim, device)
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)  # long waves: interpolate fully
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: RopeConfig, device: torch.device | None) -> tuple[torch.Tensor, float]:
    s, d = cfg.scaling, cfg.rotary_dim
    factor = s.factor
    if s.attention_factor is not None:
        attn = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attn = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
    else:
        attn = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return d * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where wavelengths are short: keep the original frequency
    pos_freqs = cfg.theta ** (torch.arange(0, d, 2, device=device).float() / d)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attn)


def _longrope(cfg: RopeConfig, seq_len: int, device: torch.device | None) -> tuple[torch.Tensor, float]:
    s, d = cfg.scaling, cfg.rotary_dim
    factor = s.factor
    if s.attention_factor is not None:
        attn = s.attention_factor
    elif factor <= 1.0:
        attn = 1.0
    else:
        attn = math.sqrt(1 + math.log(factor) / math.log(s.original_max_position))
    ext = s.long_factor if seq_len > s.original_max_position else s.short_factor
    if len(ext) != d // 2:
        raise ConfigError(f"longrope factors have {len(ext)} entries; expected rotary_dim/2 = {d // 2}")
    ext_t = torch.tensor(ext, dtype=torch.float32, device=device)
    return _base_inv_freq(cfg.theta, d, device) / ext_t, float(attn)


def rope_cos_sin(
    cfg: RopeConfig, positions: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions.

    Args:
        cfg: The rotary configuration.
        positions: Integer positions, shape (B, T).
        dtype: Dtype of the returned tables (angles are always computed in float32).

    Returns:
        ``(cos, sin)``, each (B, T, rotary_dim), already multiplied by the scaling's temperature.
    """
    seq_len = 1
    if cfg.scaling is not None and cfg.scaling.kind in ("dynamic", "longrope") and positions.numel():
        # only these depend on the sequence length; reading it syncs (and breaks compiled graphs)
        seq_len = int(positions.max().item()) + 1
    inv_freq, attn_factor = inverse_frequencies(cfg, seq_len, positions.device)
    angles = positions.float()[..., None] * inv_freq  # (B, T, rotary_dim/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, rotary_dim)
    return (emb.cos() * attn_factor).to(dtype), (emb.sin() * attn_factor).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of every head.

    Args:
        x: (B, H, T, D) queries or keys.
        cos: (B, T, R) with R <= D even; cast to the dtype of ``x`` (as transformers does).
        sin: (B, T, R).

    Returns:
        (B, H, T, D), same dtype as ``x``.
    """
    r = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, R): broadcast over heads
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
