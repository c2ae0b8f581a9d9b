"""The one attention entry point: scaled dot-product attention (Vaswani et al., 2017) over a
described mask and bias, dispatched to a backend.

Notation: B batch, H query heads, K key/value heads (K divides H: MHA K=H, GQA 1<K<H, MQA K=1;
Ainslie et al., 2023; Shazeer, 2019), T queries, S keys, D head width.

Families never call SDPA themselves; they describe what each query may see (``AttentionMask``) and
what is added to or done with the scores (ALiBi slopes, a relative-position bias, a tanh soft-cap),
and ``attend`` chooses how to compute it. Today the backends are PyTorch SDPA (fast path), a
plain matmul-softmax path for score transforms SDPA cannot express (soft-capping), and, for decode
steps (one query per row) on AVX-512 CPUs once ``decode_kernels.available()`` has loaded it, the
one-query kernel of ``evolm.nn.decode_kernels``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from evolm.nn import decode_kernels


@dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend to.

    Queries and keys are identified by their *slot index*: the position in the sequence as
    stored (including any left padding). A key is visible when every rule holds:

    * causal: ``k_index <= q_index``;
    * window (Mistral's sliding window; Beltagy et al., 2020): ``q_index - k_index < window``;
    * key_valid: the key is a real token, not padding or an unwritten cache slot;
    * documents: ``q_doc == k_doc`` (packed sequences that must not see each other; Llama 3).

    Attributes:
        q_index: (T,) slot indices of the queries.
        k_index: (S,) slot indices of the keys.
        causal: Apply the causal rule (False: bidirectional, as in BERT).
        window: Sliding-window width, or None.
        key_valid: (B, N) bool indexed by slot index (column j is slot j), or None for all valid.
            Slots outside ``[0, N)`` (unwritten cache slots) count as invalid.
        q_doc: (B, T) document ids of queries, or None.
        k_doc: (B, S) document ids of keys, or None.
        keys_are_history: The caller guarantees ``k_index == arange(S)`` and ``q_index ==
            arange(S - T, S)`` (no cache, or a static one): a single causal query then sees every
            key, and no mask is built (the common decode step).
    """

    q_index: torch.Tensor
    k_index: torch.Tensor
    causal: bool = True
    window: int | None = None
    key_valid: torch.Tensor | None = None
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    keys_are_history: bool = False

    def with_window(self, window: int | None) -> AttentionMask:
        """The same mask with another sliding window (per-layer windows, e.g. Gemma 2)."""
        return self if window == self.window else dataclasses.replace(self, window=window)

    def is_plain_causal(self) -> bool:
        """True when the mask is exactly "causal over aligned, all-valid slots"."""
        return (
            self.causal
            and self.window is None
            and self.key_valid is None
            and self.q_doc is None
            and self.q_index.shape[0] == self.k_index.shape[0]
        )

    def for_keys(self, k_index: torch.Tensor) -> AttentionMask:
        """The same rules over other keys (those a KV cache returns)."""
        return dataclasses.replace(self, k_index=k_index)

    def dense(self) -> torch.Tensor | None:
        """The boolean visibility matrix, (B or 1, 1, T, S), or None when everything is visible.

        Computed once per mask object and reused by every layer that shares the mask (in eager
        mode; a compiled graph computes it once and shares it by common-subexpression elimination,
        since Dynamo cannot trace a cached property of a frozen dataclass).
        """
        if torch.compiler.is_compiling():
            return self._build_dense()
        return self._dense

    @functools.cached_property
    def _dense(self) -> torch.Tensor | None:
        return self._build_dense()

    def _build_dense(self) -> torch.Tensor | None:
        if (
            self.keys_are_history
            and self.q_index.shape[0] == 1
            and self.window is None
            and self.key_valid is None
            and self.q_doc is None
        ):
            return None  # the newest token sees all of its history
        qi, ki = self.q_index[:, None], self.k_index[None, :]  # (T, 1), (1, S)
        allowed = None
        if self.causal:
            allowed = ki <= qi
        if self.window is not None:
            w = (qi - ki) < self.window
            allowed = w if allowed is None else allowed & w
        if allowed is not None:
            allowed = allowed[None, None]  # (1, 1, T, S)
        if self.key_valid is not None:
            n = self.key_valid.shape[1]
            inside = (self.k_index >= 0) & (self.k_index < n)  # (S,)
            kv = self.key_valid[:, self.k_index.clamp(0, n - 1)] & inside  # (B, S): gathered by slot
            kv = kv[:, None, None, :]  # (B, 1, 1, S)
            allowed = kv if allowed is None else allowed & kv
        if self.q_doc is not None:
            same = self.q_doc[:, None, :, None] == self.k_doc[:, None, None, :]  # (B, 1, T, S)
            allowed = same if allowed is None else allowed & same
        if allowed is None:
            return None
        # A query that may see nothing (a left-padding slot) would give NaN; let it see everything.
        # Its output is padding and is never read.
        return allowed | ~allowed.any(dim=-1, keepdim=True)


def alibi_bias(slopes: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """ALiBi's linear distance penalty (Press et al., 2021): ``slope_h * (k - q)``, (1, H, T, S)."""
    dist = (mask.k_index[None, :] - mask.q_index[:, None]).float()  # (T, S)
    return slopes.float()[None, :, None, None] * dist[None, None]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``k``/``v`` under ``mask``.

    Args:
        q: (B, H, T, D).
        k: (B, K, S, D) with K dividing H.
        v: (B, K, S, Dv).
        mask: Which keys each query may see.
        scale: Multiplier on q·k; default ``D ** -0.5``.
        softcap: Gemma 2's logit soft-cap: scores become ``c * tanh(scores / c)``.
        alibi_slopes: (H,) ALiBi slopes, or None.
        bias: Additive score bias broadcastable to (B, H, T, S) (e.g. T5 relative buckets).

    Returns:
        (B, H, T, Dv) in the dtype of ``q``.
    """
    n_heads, n_kv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if alibi_slopes is not None:
        ab = alibi_bias(alibi_slopes, mask)
        bias = ab if bias is None else bias + ab

    if (
        q.shape[2] == 1
        and decode_kernels.loaded
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and softcap is None
        and bias is None
        and not (torch.is_grad_enabled() and q.requires_grad)  # the kernel has no backward
    ):
        # A decode step (eager or compiled): one kernel over the cache in its own dtype, no float32 copy.
        return decode_kernels.decode_attention(q, k, v, mask.dense(), scale)
    if q.shape[2] == 1 and q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu":
        # The decode step: PyTorch's CPU kernels for one low-precision query are several times
        # slower than upcasting the (small) q/k/v and running float32 SDPA (measured here, 1024
        # keys: bf16 SDPA 629 us, bf16 matmuls 201 us, float32 SDPA with the casts 105 us).
        out = attend(q.float(), k.float(), v.float(), mask, scale=scale, softcap=softcap, bias=bias)
        return out.to(q.dtype)
    if (
        q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and q.requires_grad
        and 1 < q.shape[2] <= 1024
        and softcap is None
        and bias is None
        and mask.is_plain_causal()
    ):
        # bf16 training on CPU: SDPA's bf16 backward kernel is slower than grouped batched matmuls
        # (measured here, B4 H8 K4 T256 D64 forward+backward: SDPA 26-40 ms, matmuls with a float32
        # softmax 20-28 ms, the fused form below 8-10 ms). Up to 1024 keys, where the (T, T) scores
        # are small.
        return _attend_causal_bf16(q, k, v, mask.dense(), scale)
    if softcap is None:
        if bias is None and mask.is_plain_causal():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=n_kv != n_heads)
        allowed = mask.dense()
        attn_mask = allowed
        if bias is not None:
            attn_mask = bias.to(q.dtype)
            if allowed is not None:
                attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=n_kv != n_heads)
    return _attend_matmul(q, k, v, mask.dense(), scale, softcap, bias)


def _attend_causal_bf16(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """``softmax(q k^T) v`` under a mask shared by every query row of the batch, for bf16 training:
    the scale and the mask (``allowed``, (1, 1, T, S), the mask's dense form) ride in the score
    product (``baddbmm``: bias + scale * q k^T) and the softmax reads and writes bf16 (its kernel
    computes in float32), so no (T, S) float32 copy, mask or scale pass is made. Query heads are
    grouped per key/value head as in ``_attend_matmul``."""
    b, h, t, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    g = h // n_kv
    bias = torch.zeros(t, s, dtype=q.dtype, device=q.device).masked_fill(~allowed[0, 0], float("-inf"))
    bias = bias.repeat(g, 1)  # (G*T, S): the rows of the grouped query heads
    qg = q.reshape(b * n_kv, g * t, d)  # (B*K, G*T, D)
    scores = torch.baddbmm(bias, qg, k.reshape(b * n_kv, s, d).transpose(1, 2), alpha=scale)  # (B*K, G*T, S)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v.reshape(b * n_kv, s, v.shape[-1])).view(b, h, t, v.shape[-1])  # (B, H, T, Dv)


def _attend_matmul(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Explicit ``softmax(q k^T) v`` with float32 softmax, for what SDPA cannot express (soft-cap)
    or does slowly. Query heads are grouped per key/value head (G = H / K) instead of copying
    keys and values H / K times."""
    b, h, t, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    qg = q.reshape(b, n_kv, g * t, d)  # (B, K, G*T, D): query heads of one kv head side by side
    scores = torch.matmul(qg, k.transpose(-2, -1)).view(b, h, t, -1) * scale  # (B, H, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype).view(b, n_kv, g * t, -1)  # (B, K, G*T, S)
    return torch.matmul(probs, v).view(b, h, t, v.shape[-1])  # (B, H, T, Dv)
