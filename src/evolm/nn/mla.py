"""Multi-head latent attention, MLA (DeepSeek-AI, 2024, DeepSeek-V2; also DeepSeek-V3).

Keys and values are rebuilt from a low-rank latent that every token leaves in the cache, and
position enters through a separate, small rotary key shared by all heads ("decoupled RoPE"):
rotating the latent-derived keys would tie RoPE into ``kv_b_proj`` and forbid folding it away.

Notation: B batch, T queries, S keys, C model width, H heads, R ``kv_lora_rank`` (latent width),
Rq ``q_lora_rank``, Dn ``qk_nope_head_dim``, Dr ``qk_rope_head_dim``, Dv ``v_head_dim``,
Dq = Dn + Dr (query/key width per head).

Projections keep Hugging Face's DeepSeek names::

    x ─ q_proj ─────────────────────────────────┐            (or, with q_lora_rank:
        (q_a_proj ─ q_a_layernorm ─ q_b_proj)    ├─ q (H, Dn | Dr) ─ rope on the Dr part
    x ─ kv_a_proj_with_mqa ─┬─ c_kv (R) ─ kv_a_layernorm ─ kv_b_proj ─ k_nope (H, Dn), v (H, Dv)
                            └─ k_rope (Dr, one head) ─ rope
    k = [k_nope | k_rope broadcast to H heads];  out = o_proj(softmax(q k^T * scale) v)

Two ways to compute the same attention:

* naive (training, prefill): expand the latent through ``kv_b_proj`` into H keys and values and
  call ``attend``; cost grows with S * R * H * (Dn + Dv) for every call.
* absorbed (decode): ``q_nope . k_nope = q_nope . (W_uk c) = (W_uk^T q_nope) . c``, so the key
  part of ``kv_b_proj`` is folded into the query and the value part into the output:
  ``q_abs = W_uk^T q_nope`` (H, R); scores are ``q_abs . c_kv + q_rope . k_rope``; the context
  ``probs @ c_kv`` (H, R) goes through ``W_uv`` then ``o_proj``. That is multi-query attention
  with one key head ``[c_kv | k_rope]`` (R + Dr wide) and one value head ``c_kv`` (R wide), read
  straight from the latent cache without expanding it (explicit matmuls; see ``_absorbed``).

The softmax scale is ``Dq ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN
(Peng et al., 2023) as DeepSeek's checkpoints define it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.nn.attention import AttentionMask, attend
from evolm.nn.latent_cache import LatentCache
from evolm.nn.linear import Linear
from evolm.nn.norm import RMSNorm
from evolm.nn.rope import RopeConfig, apply_rope
from evolm.nn.self_attention import AttentionConfig, SelfAttention


@dataclass(frozen=True)
class MLAConfig:
    """Shape of a multi-head latent attention layer.

    Attributes:
        n_heads: H.
        kv_lora_rank: R, width of the compressed key/value latent (what the cache stores).
        qk_nope_head_dim: Dn, per-head query/key channels without position.
        qk_rope_head_dim: Dr, per-head query channels and shared key channels that rotate.
        v_head_dim: Dv, per-head value width.
        rope: Rotary configuration of the Dr channels (``rotary_dim == qk_rope_head_dim``).
        q_lora_rank: Rq, width of the compressed query (``q_a_proj``/``q_b_proj``), or None for a
            direct ``q_proj`` (DeepSeek-V2-Lite).
        bias: ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` carry biases (``attention_bias``).
        latent_norm_eps: Epsilon of ``q_a_layernorm`` and ``kv_a_layernorm``.
        rope_interleave: Rotary pairs are adjacent channels ``(2i, 2i + 1)`` (DeepSeek's layout; all
            V2 checkpoints, V3 by default) rather than ``(i, i + Dr/2)``.
    """

    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    q_lora_rank: int | None = None
    bias: bool = False
    latent_norm_eps: float = 1e-6
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        sizes = ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"mla.{name}={value!r}; must be a positive integer")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"mla.q_lora_rank={self.q_lora_rank}; must be > 0 or None")
        if self.rope.rotary_dim != self.qk_rope_head_dim:
            raise ConfigError(
                f"mla.rope.rotary_dim={self.rope.rotary_dim}; must equal qk_rope_head_dim={self.qk_rope_head_dim}"
            )

    @property
    def position(self) -> Literal["rope"]:
        """Positions are rotary (the decoder computes cos/sin tables of ``rope`` for every layer)."""
        return "rope"

    @property
    def head_dim(self) -> int:
        """Dq = Dn + Dr, the query/key width of a head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_kv_heads(self) -> int:
        """H: expanded (the naive form), every query head has its own key and value."""
        return self.n_heads

    @property
    def cache_values_per_token(self) -> int:
        """Values one token stores per layer: R + Dr (a key/value cache stores ``2 * K * D``)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``Dq ** -0.5``, times YaRN's ``mscale(factor, mscale_all_dim) ** 2`` when the rope sets it."""
        scale = self.head_dim**-0.5
        s = self.rope.scaling
        if s is not None and s.mscale_all_dim:
            m = 1.0 if s.factor <= 1 else 0.1 * s.mscale_all_dim * math.log(s.factor) + 1.0
            scale *= m * m
        return scale


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al., 2021) over adjacent channel pairs ``(2i, 2i + 1)``, DeepSeek's layout.

    The result is written de-interleaved, ``[rotated evens | rotated odds]`` (as transformers'
    DeepSeek-V3 does): queries and keys get the same permutation, so their dot products are those of
    the interleaved rotation. Computed in float32 (DeepSeek-V2 rotates in complex float32).

    Args:
        x: (B, H, T, Dr).
        cos: (B, T, Dr) tables as ``rope_cos_sin`` builds them (``cat(angles, angles)``).
        sin: (B, T, Dr).

    Returns:
        (B, H, T, Dr), dtype of ``x``.
    """
    half = cos.shape[-1] // 2
    c, s = cos[:, None, :, :half].float(), sin[:, None, :, :half].float()  # (B, 1, T, Dr/2)
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()  # (B, H, T, Dr/2) each
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class MultiHeadLatentAttention(nn.Module):
    """MLA over the tokens of one batch, optionally extending a ``LatentCache``.

    ``absorb`` chooses the computation: ``"auto"`` (absorbed for single-token steps with a cache,
    naive otherwise), ``"always"`` or ``"never"``. The absorbed path reads ``kv_b_proj.weight``;
    a transform that swaps ``kv_b_proj`` for a module without a dense ``weight`` (quantisation,
    LoRA) should set ``absorb = "never"``.
    """

    def __init__(self, dim: int, cfg: MLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.absorb: Literal["auto", "always", "never"] = "auto"
        h, r, dr = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(dim, h * cfg.head_dim, bias=False)
        else:
            self.q_a_proj = Linear(dim, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.latent_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * cfg.head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(dim, r + dr, bias=cfg.bias)
        self.kv_a_layernorm = RMSNorm(r, eps=cfg.latent_norm_eps)
        self.kv_b_proj = Linear(r, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(h * cfg.v_head_dim, dim, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: (B, T, C) normalised hidden states.
            mask: Visibility of keys; with a cache, replaced by the cache's keys if it describes
                only the new ones.
            rope: ``(cos, sin)`` tables, each (B, T, Dr).
            cache: This layer's latent cache, extended in place.

        Returns:
            (B, T, C).
        """
        cfg = self.cfg
        if rope is None:
            raise ValueError("multi-head latent attention needs the rotary tables (cos, sin)")
        b, t, _ = x.shape
        h, r, dn = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim
        low_rank_q = cfg.q_lora_rank is not None
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if low_rank_q else self.q_proj(x)  # (B, T, H*Dq)
        q = q.view(b, t, h, cfg.head_dim).transpose(1, 2)  # (B, H, T, Dq)
        q_nope, q_rope = q.split([dn, cfg.qk_rope_head_dim], dim=-1)  # (B, H, T, Dn), (B, H, T, Dr)

        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([r, cfg.qk_rope_head_dim], dim=-1)  # (B, T, R), (B, T, Dr)
        c_kv = self.kv_a_layernorm(c_kv)
        k_rope = k_rope[:, None]  # (B, 1, T, Dr): one rotary key head shared by all query heads
        rotate = apply_rope_interleaved if cfg.rope_interleave else apply_rope
        cos, sin = rope
        q_rope, k_rope = rotate(q_rope, cos, sin), rotate(k_rope, cos, sin)
        latent = torch.cat((c_kv, k_rope[:, 0]), dim=-1)  # (B, T, R+Dr): the rows a cache stores
        if cache is not None:
            latent, k_index = cache.update(latent)  # (B, S, R+Dr)
            if mask.k_index.shape[0] != latent.shape[1]:  # caller described only the new keys
                mask = mask.for_keys(k_index)

        absorbed = self.absorb == "always" or (self.absorb == "auto" and cache is not None and t == 1)
        attend_mla = self._absorbed if absorbed else self._naive
        y = attend_mla(q_nope, q_rope, latent, mask)  # (B, H, T, Dv)
        y = y.transpose(1, 2).reshape(b, t, h * cfg.v_head_dim)  # (B, T, H*Dv)
        return self.o_proj(y)

    def _naive(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        """Expand the latent into per-head keys and values: (B, H, T, Dv)."""
        cfg = self.cfg
        b, s, _ = latent.shape
        h, r, dn, dr = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        kv = self.kv_b_proj(latent[..., :r])  # (B, S, H*(Dn+Dv))
        kv = kv.view(b, s, h, dn + cfg.v_head_dim).transpose(1, 2)  # (B, H, S, Dn+Dv)
        k_nope, v = kv.split([dn, cfg.v_head_dim], dim=-1)  # (B, H, S, Dn), (B, H, S, Dv)
        k_rope = latent[:, None, :, r:].expand(b, h, s, dr)  # (B, H, S, Dr)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, Dq)
        k = torch.cat((k_nope, k_rope), dim=-1)  # (B, H, S, Dq)
        return attend(q, k, v, mask, scale=cfg.softmax_scale)

    def _absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        """Attend in latent space, ``kv_b_proj`` folded into query and output: (B, H, T, Dv).

        This is multi-query attention with one key head ``[c_kv | k_rope]`` and one value head
        ``c_kv``, written as explicit matmuls with the H query heads folded into the query rows
        (one (H*T, R+Dr) x (R+Dr, S) product per sequence) rather than passed to ``attend``: PyTorch's
        CPU SDPA broadcasts the single key head to all H query heads (``enable_gqa``) and was ~250x
        slower here (one thread, H=16, S=2048, R+Dr=576: 390 ms against 1.4 ms).
        """
        cfg = self.cfg
        b, h, t, _ = q_nope.shape
        s, r, dn = latent.shape[1], cfg.kv_lora_rank, cfg.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(h, dn + cfg.v_head_dim, r)  # (H, Dn+Dv, R)
        w_uk, w_uv = w[:, :dn].to(q_nope.dtype), w[:, dn:].to(q_nope.dtype)  # (H, Dn, R), (H, Dv, R)
        q_abs = torch.matmul(q_nope, w_uk)  # (B, H, T, R): W_uk^T q_nope, per head
        q_lat = torch.cat((q_abs, q_rope), dim=-1).reshape(b, h * t, r + cfg.qk_rope_head_dim)  # (B, H*T, R+Dr)
        scores = torch.matmul(q_lat, latent.transpose(1, 2)).view(b, h, t, s) * cfg.softmax_scale  # (B, H, T, S)
        allowed = mask.dense()  # (B or 1, 1, T, S) or None
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(latent.dtype).view(b, h * t, s)  # (B, H*T, S)
        ctx = torch.matmul(probs, latent[..., :r]).view(b, h, t, r)  # (B, H, T, R): context in latent space
        return torch.matmul(ctx, w_uv.transpose(1, 2))  # (B, H, T, Dv)


def make_attention(cfg: AttentionConfig | MLAConfig, dim: int) -> nn.Module:
    """The attention module ``cfg`` describes for model width ``dim`` (``self_attn`` of a block)."""
    if isinstance(cfg, MLAConfig):
        return MultiHeadLatentAttention(dim, cfg)
    return SelfAttention(dim, cfg)
