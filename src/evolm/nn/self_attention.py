"""Multi-head self-attention with its projections (Vaswani et al., 2017), grouped-query
sharing of keys/values (Ainslie et al., 2023), optional QK-norm (Dehghani et al., 2023; Qwen3,
OLMo 2), rotary or ALiBi positions, and Gemma 2's logit soft-cap.

Projections are plain ``nn.Linear`` with Hugging Face names (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``) so adapters and quantisers can swap them by name.

Notation: B batch, T tokens, C model width, H query heads, K key/value heads, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.nn.attention import AttentionMask, attend
from evolm.nn.kv_cache import KVCache
from evolm.nn.linear import Linear, linear_group
from evolm.nn.norm import RMSNorm
from evolm.nn.positions import alibi_slopes
from evolm.nn.rope import RopeConfig, apply_rope


@dataclass(frozen=True)
class AttentionConfig:
    """Shape and options of a self-attention layer.

    Attributes:
        n_heads: H, query heads.
        n_kv_heads: K, key/value heads (H for MHA, 1 for MQA).
        head_dim: D.
        qkv_bias: q/k/v projections carry biases.
        out_bias: the output projection carries a bias.
        qk_norm: RMSNorm on queries and keys: ``"head"`` per head over D (Qwen3), ``"full"`` over
            the whole projection (OLMo 2), or None.
        qk_norm_eps: Epsilon of the QK-norm.
        scale: Score multiplier; None means ``D ** -0.5``.
        softcap: Gemma 2's tanh soft-cap on scores, or None.
        clip_qkv: Clamp q, k, v to ``[-clip, clip]`` (OLMo), or None.
        position: ``"rope"``, ``"alibi"`` or ``"none"`` (absolute positions added to embeddings).
        rope: Rotary configuration when ``position == "rope"``.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: Literal["head", "full"] | None = None
    qk_norm_eps: float = 1e-6
    scale: float | None = None
    softcap: float | None = None
    clip_qkv: float | None = None
    position: Literal["rope", "alibi", "none"] = "rope"
    rope: RopeConfig | None = None

    def __post_init__(self) -> None:
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.head_dim <= 0:
            raise ConfigError(
                f"attention n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}; "
                "all must be > 0"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"attention n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.position not in ("rope", "alibi", "none"):
            raise ConfigError(f"attention.position={self.position!r}; allowed: 'rope', 'alibi', 'none'")
        if self.position == "rope" and self.rope is None:
            raise ConfigError("attention.position='rope' needs attention.rope")
        if self.rope is not None and self.rope.rotary_dim > self.head_dim:
            raise ConfigError(f"rope.rotary_dim={self.rope.rotary_dim} exceeds head_dim={self.head_dim}")
        if self.qk_norm not in (None, "head", "full"):
            raise ConfigError(f"attention.qk_norm={self.qk_norm!r}; allowed: None, 'head', 'full'")


class SelfAttention(nn.Module):
    """Self-attention over the tokens of one sequence batch, optionally extending a KV cache."""

    def __init__(self, dim: int, cfg: AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, k, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(dim, h * d, bias=cfg.qkv_bias)
        self.k_proj = Linear(dim, k * d, bias=cfg.qkv_bias)
        self.v_proj = Linear(dim, k * d, bias=cfg.qkv_bias)
        self.o_proj = Linear(h * d, dim, bias=cfg.out_bias)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(d, eps=cfg.qk_norm_eps)
            self.k_norm = RMSNorm(d, eps=cfg.qk_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(h * d, eps=cfg.qk_norm_eps)
            self.k_norm = RMSNorm(k * d, eps=cfg.qk_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: (B, T, C) normalised hidden states.
            mask: Visibility of keys. With a cache, ``mask.k_index`` should describe the keys the cache
                returns (``cache.key_index(T)``); if it has another length it is replaced by them.
            rope: ``(cos, sin)`` tables, each (B, T, R), when positions are rotary.
            cache: This layer's KV cache, extended in place.

        Returns:
            (B, T, C).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = linear_group(x, (self.q_proj, self.k_proj, self.v_proj))  # (B, T, H*D), (B, T, K*D) x2
        if cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, K, T, D)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v, k_index = cache.update(k, v)  # (B, K, S, D): cached and new keys
            if mask.k_index.shape[0] != k.shape[2]:  # caller described only the new keys
                mask = mask.for_keys(k_index)
        slopes = alibi_slopes(cfg.n_heads).to(x.device) if cfg.position == "alibi" else None
        y = attend(q, k, v, mask, scale=cfg.scale, softcap=cfg.softcap, alibi_slopes=slopes)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim)  # (B, T, H*D)
        return self.o_proj(y)
