"""The cross-attention cache of one decoder layer of an encoder-decoder model.

During decoding the encoder output never changes, so each decoder layer projects it to keys and
values once (``CrossCache.from_memory``) and every later step reads them back. Unlike the
self-attention ``KVCache`` it does not grow; beam search reorders it along the batch only when
beams of different inputs are mixed (they never are: beams of one input share the same keys).

Notation: B batch, K key/value heads, S encoder tokens, D head width.
"""

from __future__ import annotations

from typing import Protocol

import torch


class _KVProjection(Protocol):
    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class CrossCache:
    """Encoder keys/values of one cross-attention layer, computed once.

    Args:
        k: (B, K, S, D) keys.
        v: (B, K, S, Dv) values.
        key_valid: (B, S) bool, False at encoder padding; None when every encoder token is real.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None = None) -> None:
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"cross cache keys {tuple(k.shape)} and values {tuple(v.shape)} disagree")
        if key_valid is not None and key_valid.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"cross cache key_valid has shape {tuple(key_valid.shape)}; expected (batch, encoder tokens) = "
                f"({k.shape[0]}, {k.shape[2]})"
            )
        self.k, self.v, self.key_valid = k, v, key_valid

    @classmethod
    def from_memory(
        cls, attention: _KVProjection, memory: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> CrossCache:
        """Project encoder output ``memory`` (B, S, C) with ``attention``'s key/value projections."""
        k, v = attention.memory_kv(memory)
        return cls(k, v, key_valid)

    @property
    def length(self) -> int:
        """S, the encoder tokens attended to."""
        return self.k.shape[2]

    def index_select(self, index: torch.Tensor) -> CrossCache:
        """A cache over rows ``index`` (B',) of this one (expanding inputs to beams)."""
        kv = self.key_valid.index_select(0, index) if self.key_valid is not None else None
        return CrossCache(self.k.index_select(0, index), self.v.index_select(0, index), kv)
