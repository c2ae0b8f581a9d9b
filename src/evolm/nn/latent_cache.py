"""Per-layer cache of multi-head latent attention (DeepSeek-AI, 2024, DeepSeek-V2).

MLA does not cache keys and values. Every token leaves two small vectors: the normalised
compressed latent ``c_kv`` (R = ``kv_lora_rank`` wide), from which ``kv_b_proj`` rebuilds every
head's key and value, and the one rotary key ``k_rope`` (Dr = ``qk_rope_head_dim``) that all heads
share. Both are stored side by side in one buffer, a row per token::

    latent[b, s] = [ c_kv (R) | k_rope (Dr) ]

so the absorbed decode path reads the whole row as the single key head of a multi-query attention
(and its first R channels as the value) without copying. Cache size per token and layer is
``R + Dr`` values, against ``2 * K * D`` for a key/value cache.

The interface is ``KVCache``'s (``length``, ``max_len``, ``key_index``, ``truncate``, ``update``),
so ``evolm.infer`` generates with it unchanged.

Notation: B batch, T new tokens, S cached tokens after an update, R latent width, Dr rope width.
"""

from __future__ import annotations

import torch

from evolm.nn.kv_cache import ContiguousCache


class LatentCache(ContiguousCache):
    """Static, contiguous latent cache of one MLA layer: slot i holds token i.

    Args:
        batch_size: B.
        max_len: Slots available.
        kv_lora_rank: R, width of the compressed latent.
        rope_dim: Dr, width of the shared rotary key.
        dtype: Storage dtype.
        device: Storage device.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.latent = torch.zeros(batch_size, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        super().__init__(max_len, self.latent.device)

    @property
    def c_kv(self) -> torch.Tensor:
        """(B, length, R): the cached compressed latents (a view)."""
        return self.latent[:, : self.length, : self.kv_lora_rank]

    @property
    def k_rope(self) -> torch.Tensor:
        """(B, length, Dr): the cached rotary keys, already rotated (a view)."""
        return self.latent[:, : self.length, self.kv_lora_rank :]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this layer's cache."""
        return self.latent.shape[2] * self.latent.element_size()

    def update(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new rows and return every row cached so far.

        Args:
            latent: (B, T, R + Dr) new rows ``[c_kv | k_rope]``.

        Returns:
            ``(rows, k_index)``: (B, S, R + Dr) a view of the buffer, and (S,) slot indices,
            S = length after the update.

        Raises:
            ValueError: ``latent`` does not match the cache's batch or width, or the cache would
                overflow; the cache is left unchanged.
        """
        t = latent.shape[1]
        b, _, w = self.latent.shape
        if latent.dim() != 3 or latent.shape[0] != b or latent.shape[2] != w:
            raise ValueError(
                f"latent cache update: rows {tuple(latent.shape)} do not fit a cache of "
                f"(batch, slots, kv_lora_rank + rope_dim) = {tuple(self.latent.shape)}"
            )
        start = self._reserve(t, "latent cache")
        self.latent[:, start : start + t] = latent
        self.length = start + t
        return self.latent[:, : self.length], self._index[: self.length]
