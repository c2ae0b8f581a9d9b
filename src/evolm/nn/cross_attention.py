"""Multi-head attention for encoder-decoder stacks (Vaswani et al., 2017): self-attention with an
additive score bias (T5's relative positions) and cross-attention over the encoder output.

The projections are plain ``nn.Linear`` with Hugging Face names (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``), as in ``SelfAttention``; the difference is where keys and values come from:

* self-attention: from the queries' own tokens, optionally extending a ``KVCache``;
* cross-attention: from the encoder output ``memory``, or from a ``CrossCache`` that holds its
  projections, computed once per generated sequence.

Notation: B batch, T queries, S keys, C model width, H query heads, K key/value heads, D head width.
"""

from __future__ import annotations

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.nn.attention import AttentionMask, attend
from evolm.nn.cross_cache import CrossCache
from evolm.nn.kv_cache import KVCache
from evolm.nn.linear import Linear
from evolm.nn.self_attention import AttentionConfig


class Attention(nn.Module):
    """Attention whose keys come from the queries' sequence or from an encoder's output.

    Args:
        dim: C.
        cfg: Heads and biases; positions must be ``"none"`` (an encoder-decoder stack adds
            absolute positions to its embeddings or passes a relative bias).
    """

    def __init__(self, dim: int, cfg: AttentionConfig) -> None:
        super().__init__()
        if cfg.position != "none" or cfg.qk_norm is not None or cfg.softcap is not None or cfg.clip_qkv is not None:
            raise ConfigError(
                "encoder-decoder attention supports position='none' without qk_norm, softcap or clip_qkv; got "
                f"position={cfg.position!r}, qk_norm={cfg.qk_norm!r}, softcap={cfg.softcap}, clip_qkv={cfg.clip_qkv}"
            )
        self.cfg = cfg
        h, k, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(dim, h * d, bias=cfg.qkv_bias)
        self.k_proj = Linear(dim, k * d, bias=cfg.qkv_bias)
        self.v_proj = Linear(dim, k * d, bias=cfg.qkv_bias)
        self.o_proj = Linear(h * d, dim, bias=cfg.out_bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.cfg.head_dim).transpose(1, 2)  # (B, T, n*D) -> (B, n, T, D)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of encoder output ``memory`` (B, S, C): each (B, K, S, D)."""
        k = self.cfg.n_kv_heads
        return self._heads(self.k_proj(memory), k), self._heads(self.v_proj(memory), k)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        *,
        memory: torch.Tensor | CrossCache | None = None,
        cache: KVCache | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: (B, T, C) normalised hidden states (the queries).
            mask: Visibility of keys. For self-attention with a cache, ``mask.k_index`` describes the
                keys the cache returns (``cache.key_index(T)``).
            memory: None for self-attention; the encoder output (B, S, C) or its ``CrossCache`` for
                cross-attention.
            cache: Self-attention only: this layer's KV cache, extended in place.
            bias: Additive score bias broadcastable to (B, H, T, S) (T5's relative positions).

        Returns:
            (B, T, C).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        q = self._heads(self.q_proj(x), cfg.n_heads)  # (B, H, T, D)
        if memory is None:
            k, v = self.memory_kv(x)  # (B, K, T, D) each
            if cache is not None:
                k, v, _ = cache.update(k, v)  # (B, K, S, D): cached and new keys
        else:
            if cache is not None:
                raise ValueError("cross-attention reads a CrossCache through memory=, not a KV cache")
            k, v = (memory.k, memory.v) if isinstance(memory, CrossCache) else self.memory_kv(memory)
        y = attend(q, k, v, mask, scale=cfg.scale, bias=bias)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim)  # (B, T, H*D)
        return self.o_proj(y)
