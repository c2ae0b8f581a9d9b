"""Per-layer key/value caches for incremental decoding.

A cache is an object per layer, passed to the layer explicitly. It stores keys and values in
pre-allocated buffers and reports the slot index of every key it returns, so the attention mask
is built from indices, never from assumptions about layout:

* ``KVCache``: static and contiguous (gpt-fast): slot i holds token i.
* ``StaticKVCache``: the same buffers, but a one-token update returns *all* slots, written or not,
  so a compiled decode step sees the same shapes at every length (gpt-fast); the causal rule of the
  mask hides the slots after the query.
* ``RollingKVCache``: a ring of ``window`` slots for sliding-window layers (Mistral; Beltagy et
  al., 2020, Longformer): memory stays O(window) however long the sequence grows.

Both expose ``length`` (tokens seen), ``key_index(t)`` (slot indices of the keys the next
``update`` of ``t`` tokens returns, so a model can build its masks before running its layers)
and ``update(k, v)``.
"""

from __future__ import annotations

import torch


class ContiguousCache:
    """Slot bookkeeping of a static, contiguous cache (gpt-fast): slot i holds token i.

    Subclasses own the buffers and call ``_reserve`` before writing ``t`` new tokens.
    ``keys_are_history``: every key returned is a written slot, in order (a mask may then skip
    the causal rule for a single query).
    """

    keys_are_history = True

    def __init__(self, max_len: int, device: torch.device | str | None) -> None:
        self.length = 0
        self._index = torch.arange(max_len, device=device)

    @property
    def max_len(self) -> int:
        return self._index.shape[0]

    def key_index(self, t: int) -> torch.Tensor:
        """Slot indices, (length + t,), of the rows ``update`` returns after ``t`` new tokens."""
        return self._index[: self.length + t]

    def truncate(self, n: int) -> None:
        """Forget every token after the first ``n`` (a later update overwrites them)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n

    def _reserve(self, t: int, what: str) -> int:
        """The first slot of ``t`` new tokens; raises (cache unchanged) if they do not fit."""
        start = self.length
        if start + t > self.max_len:
            raise ValueError(
                f"{what} overflow: {start} cached + {t} new tokens > max_len={self.max_len}; "
                "allocate the cache with a larger max_len"
            )
        return start


class KVCache(ContiguousCache):
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
        super().__init__(max_len, self.k.device)

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
        t = k.shape[2]
        b, n_kv, _, d = self.k.shape
        if k.shape != (b, n_kv, t, d) or v.shape != (b, n_kv, t, self.v.shape[3]):
            raise ValueError(
                f"KV cache update: keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit a cache of "
                f"(batch, kv_heads, slots, head_dim) = {tuple(self.k.shape)} / {tuple(self.v.shape)}"
            )
        start = self._reserve(t, "KV cache")
        self.k[:, :, start : start + t] = k
        self.v[:, :, start : start + t] = v
        self.length = start + t
        return self.k[:, :, : self.length], self.v[:, :, : self.length], self._index[: self.length]


class StaticKVCache(KVCache):
    """A ``KVCache`` whose single-token updates return every slot: shapes that never change.

    A compiled decode step (``torch.compile``) then runs one graph for every length instead of one
    per length (the approach of gpt-fast). Slots after the newest token hold zeros or stale keys;
    the causal rule of the attention mask (key slot <= query slot) hides them, so the result equals
    ``KVCache``'s. Multi-token updates (prefill) return the written slots only, as ``KVCache`` does,
    so the prompt does not pay attention over empty slots. Arguments as ``KVCache``.
    """

    keys_are_history = False  # a single query's keys include unwritten slots: the mask is needed

    def key_index(self, t: int) -> torch.Tensor:
        """Slot indices of the rows ``update`` returns after ``t`` new tokens: all slots when t == 1."""
        return self._index if t == 1 else super().key_index(t)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``KVCache.update``, but one new token returns all ``max_len`` slots."""
        keys, values, index = super().update(k, v)
        if k.shape[2] == 1:
            return self.k, self.v, self._index
        return keys, values, index


# Index of a ring slot not yet written: so far before any query that the window rule hides it.
_EMPTY = -(2**40)


class RollingKVCache:
    """Ring-buffer cache of the last ``window`` tokens of one sliding-window attention layer.

    ``update`` returns the ring's contents followed by the new tokens, (B, K, window + T, D), with
    their slot indices; the sliding-window rule of the mask hides keys that fell out of the window
    (and the never-written slots, whose index is a large negative number). Afterwards the last
    ``min(T, window)`` new tokens overwrite the ring at ``slot % window``. Because the window rule
    needs at most ``window - 1`` past keys, attention over the returned keys equals attention over
    the whole history.

    Args:
        batch_size: B.
        n_kv_heads: K.
        window: The layer's attention window (> 0).
        head_dim: D of keys.
        dtype: Storage dtype.
        device: Storage device.
        v_head_dim: D of values when it differs from keys.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        window: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        v_head_dim: int | None = None,
    ) -> None:
        if window <= 0:
            raise ValueError(f"RollingKVCache window={window}; must be > 0")
        self.window = window
        self.k = torch.zeros(batch_size, n_kv_heads, window, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_kv_heads, window, v_head_dim or head_dim, dtype=dtype, device=device)
        self.slots = torch.full((window,), _EMPTY, dtype=torch.long, device=self.k.device)
        self.length = 0

    def truncate(self, n: int) -> None:
        """Forget tokens after the first ``n``.

        Possible while the ring still holds the ``window - 1`` tokens before ``n`` that the next
        query needs: when nothing has left the ring yet, or when ``n >= length - 1``.
        """
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        if self.length > self.window and n < self.length - 1:
            raise ValueError(
                f"cannot truncate a rolling cache of {self.length} tokens to {n}: tokens the window needs "
                "have already left the ring; rebuild the cache from the tokens instead"
            )
        self.slots = torch.where(self.slots >= n, torch.full_like(self.slots, _EMPTY), self.slots)
        self.length = n

    def key_index(self, t: int) -> torch.Tensor:
        """Slot indices, (window + t,), of the keys ``update`` returns after ``t`` new tokens."""
        return torch.cat([self.slots, torch.arange(self.length, self.length + t, device=self.slots.device)])

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend-able keys/values: the ring then the new tokens; then keep the newest in the ring.

        Args:
            k: (B, K, T, D) new keys.
            v: (B, K, T, Dv) new values.

        Returns:
            ``(keys, values, k_index)``: (B, K, window + T, D), (B, K, window + T, Dv), (window + T,).
        """
        b, n_kv, w, d = self.k.shape
        t = k.shape[2]
        if k.shape != (b, n_kv, t, d) or v.shape != (b, n_kv, t, self.v.shape[3]):
            raise ValueError(
                f"KV cache update: keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit a cache of "
                f"(batch, kv_heads, slots, head_dim) = {tuple(self.k.shape)} / {tuple(self.v.shape)}"
            )
        index = self.key_index(t)
        keys = torch.cat([self.k, k], dim=2)  # (B, K, W + T, D)
        values = torch.cat([self.v, v], dim=2)
        keep = min(t, w)
        new_slots = torch.arange(self.length + t - keep, self.length + t, device=self.slots.device)
        ring = new_slots % w
        self.k[:, :, ring] = k[:, :, t - keep :]
        self.v[:, :, ring] = v[:, :, t - keep :]
        self.slots[ring] = new_slots
        self.length += t
        return keys, values, index
