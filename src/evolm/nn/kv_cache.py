"""Per-layer key/value caches for incremental decoding.

A cache is an object per layer, passed to the layer explicitly. It stores keys and values in
pre-allocated buffers (the static cache of gpt-fast) and reports the slot index of every key it
returns, so the attention mask is built from indices, never from assumptions about layout.
"""

from __future__ import annotations

import torch


class KVCache:
    """Static, contiguous key/value cache of one attention layer.

    Buffers are (B, K, max_len, D); ``length`` slots are filled.

    Args:
        batch_size: B.
        n_kv_heads: K.
        max_len: Slots available.
        head_dim: D of keys.
        dtype: Storage dtype.
        device: Storage device.
        v_head_dim: D of values when it differs from keys (latent attention); default ``head_dim``.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        v_head_dim: int | None = None,
    ) -> None:
        self.k = torch.zeros(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_kv_heads, max_len, v_head_dim or head_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append new keys/values and return everything cached so far.

        Args:
            k: (B, K, T, D) new keys.
            v: (B, K, T, Dv) new values.

        Returns:
            ``(keys, values, k_index)``: (B, K, L, D), (B, K, L, Dv) and (L,) slot indices,
            L = length after the update.

        Raises:
            ValueError: ``k``/``v`` do not match the cache's batch, heads or widths, or the cache would
                overflow; the cache is left unchanged.
        """
        start, t = self.length, k.shape[2]
        b, n_kv, _, d = self.k.shape
        if k.shape != (b, n_kv, t, d) or v.shape != (b, n_kv, t, self.v.shape[3]):
            raise ValueError(
                f"KV cache update: keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit a cache of "
                f"(batch, kv_heads, slots, head_dim) = {tuple(self.k.shape)} / {tuple(self.v.shape)}"
            )
        if start + t > self.max_len:
            raise ValueError(
                f"KV cache overflow: {start} cached + {t} new tokens > max_len={self.max_len}; "
                "allocate the cache with a larger max_len"
            )
        self.k[:, :, start : start + t] = k
        self.v[:, :, start : start + t] = v
        self.length = start + t
        idx = torch.arange(self.length, device=self.k.device)
        return self.k[:, :, : self.length], self.v[:, :, : self.length], idx
