"""T5's bucketed relative position bias (Raffel et al., 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer"; after Shaw et al., 2018).

Instead of adding position vectors to the embeddings, every head learns one scalar per *bucket*
of the key-minus-query distance ``k - q``, added to the attention scores before the softmax. Half
of the buckets hold exact small distances; the other half cover distances up to ``max_distance``
on a logarithmic scale, and everything farther shares the last bucket. A bidirectional stack (the
encoder) splits the buckets between keys before and after the query; a causal one (the decoder)
only ever sees ``k <= q`` and uses all buckets for the past.

Notation: H heads, T queries, S keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """The bucket of each distance ``k - q``.

    Args:
        relative_position: Integer tensor of ``k - q`` distances, any shape.
        bidirectional: Separate buckets for keys after the query (encoder self-attention).
        num_buckets: Total buckets.
        max_distance: Distances at or beyond this share the last bucket.

    Returns:
        int64 tensor of the same shape, values in ``[0, num_buckets)``.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # keys after the query never occur (causal)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets from max_exact up to max_distance (distance 0 is small; log(0) is unused)
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), looked up as an additive attention bias.

    T5 computes it once per stack (in the first layer) and adds the same bias in every layer.

    Args:
        num_buckets: Buckets (T5: 32).
        n_heads: H.
        max_distance: Largest distinguished distance (T5: 128).
        bidirectional: True for the encoder, False for the causal decoder.
    """

    def __init__(self, num_buckets: int, n_heads: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        """Bias for queries at ``q_index`` (T,) attending to keys at ``k_index`` (S,): (1, H, T, S)."""
        distance = k_index[None, :] - q_index[:, None]  # (T, S)
        bucket = relative_position_bucket(
            distance, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        return self.embedding(bucket).permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)

    def extra_repr(self) -> str:
        return f"buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"
