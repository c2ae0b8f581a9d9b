"""Multi-token prediction, MTP (DeepSeek-AI, 2024, DeepSeek-V3; after Gloeckle et al., 2024).

Besides the next token, the model learns to predict tokens further ahead with D small sequential
modules that share the embedding and the output head of the main model. Depth k keeps the causal
chain: it combines the previous depth's representation of token i with the embedding of token
i + k, runs one transformer block, and predicts token i + k + 1::

    depth k:   h^{k-1}_i ── hnorm ─┐
                                   ├─ cat ─ eh_proj ─ mtp_block ─ post_norm ─┬─ head ─> t_{i+k+1}
    Emb(t_{i+k}) ────── enorm ─────┘                                        └─ h^k_i (to depth k+1)

``h^0`` is the main model's final hidden state (after its final norm, as transformers' ``MtpModel``
takes it). The concatenation puts the embedding first and the block sees the positions of the
tokens it embeds (``i + k``), both as in DeepSeek-V3's checkpoints and transformers' ``MtpLayer``.
Module names (``enorm``, ``hnorm``, ``eh_proj``, ``mtp_block``, ``post_norm``) follow the latter.

The training objective is ``L_MTP = weight / D * sum_k CE_k`` (``mtp_loss``), added to the main
next-token loss. At inference the depths can draft tokens for speculative decoding.

The block is injected (composition): ``evolm.models`` builds it from the model's config, so this
module depends only on ``evolm.nn``.

Notation: B batch, T tokens, C model width, V vocabulary, D depths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from evolm.nn.attention import AttentionMask
from evolm.nn.linear import Linear
from evolm.nn.losses import IGNORE_INDEX, cross_entropy_sum
from evolm.nn.norm import RMSNorm
from evolm.nn.rope import RopeConfig, rope_cos_sin


class MTPDepth(nn.Module):
    """One prediction depth: norms, projection of the concatenation, one transformer block.

    Args:
        dim: Model width C.
        block: A transformer block called as ``block(x, mask, rope, cache)`` (a ``DecoderLayer``).
        eps: Epsilon of the three RMSNorms.
    """

    def __init__(self, dim: int, block: nn.Module, eps: float = 1e-6) -> None:
        super().__init__()
        self.enorm = RMSNorm(dim, eps=eps)
        self.hnorm = RMSNorm(dim, eps=eps)
        self.eh_proj = Linear(2 * dim, dim, bias=False)
        self.mtp_block = block
        self.post_norm = RMSNorm(dim, eps=eps)

    def forward(
        self,
        hidden: torch.Tensor,
        embeds: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """(B, N, C) previous representations and (B, N, C) embeddings of the tokens k ahead -> (B, N, C)."""
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(hidden)), dim=-1))  # (B, N, 2C) -> (B, N, C)
        return self.post_norm(self.mtp_block(x, mask, rope, None))


class MultiTokenPrediction(nn.Module):
    """D sequential MTP depths over a main model's hidden states.

    Args:
        dim: Model width C.
        blocks: One transformer block per depth.
        rope: Rotary configuration of the blocks (None if they take no rotary tables).
        eps: Epsilon of the norms.
    """

    def __init__(self, dim: int, blocks: Sequence[nn.Module], rope: RopeConfig | None, eps: float = 1e-6) -> None:
        super().__init__()
        self.rope = rope
        self.depths = nn.ModuleList(MTPDepth(dim, block, eps) for block in blocks)

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        embed: nn.Module,
        head: nn.Module,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Logits of every depth.

        Args:
            hidden: (B, T, C) the main model's final hidden states (``model.model(input_ids)``).
            input_ids: (B, T) the tokens the main model read.
            embed: The main model's token embedding (shared).
            head: The main model's output head (shared), (B, N, C) -> (B, N, V).
            position_ids: (B, T) or (T,) positions of ``input_ids``; default ``arange(T)``.
            document_ids: (B, T) ids of packed documents; tokens only see their own document.

        Returns:
            D tensors; depth k's (k = 1..D) is (B, T - k, V), and its position i predicts token
            ``i + k + 1`` (so its targets are ``labels[:, k:]`` for next-token labels ``labels``).
        """
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, t)
        logits = []
        h = hidden
        for k, depth in enumerate(self.depths, start=1):
            n = t - k
            if n <= 0:
                raise ValueError(f"MTP depth {k} needs more than {k} tokens; got {t}")
            index = torch.arange(n, device=input_ids.device)
            docs = document_ids[:, k:] if document_ids is not None else None
            mask = AttentionMask(q_index=index, k_index=index, q_doc=docs, k_doc=docs, keys_are_history=True)
            rope = rope_cos_sin(self.rope, position_ids[:, k:], dtype=h.dtype) if self.rope is not None else None
            h = depth(h[:, :n], embed(input_ids[:, k:]), mask, rope)  # (B, T-k, C)
            logits.append(head(h))  # (B, T-k, V)
        return logits


def mtp_loss(
    depth_logits: Sequence[torch.Tensor], labels: torch.Tensor, weight: float = 0.3, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """DeepSeek-V3's MTP objective ``weight / D * sum_k CE_k``, each ``CE_k`` a mean over its targets.

    Args:
        depth_logits: D tensors, depth k's (B, T - k, V), as ``MultiTokenPrediction`` returns them.
        labels: (B, T) next-token labels of the main model (``labels[:, i]`` is token ``i + 1``, or
            ``ignore_index``); depth k's targets are ``labels[:, k:]``.
        weight: The MTP loss weight (lambda; DeepSeek-V3 used 0.3, then 0.1).
        ignore_index: Label value of positions that carry no target.

    Returns:
        Float32 scalar (0 if no depth has a target).
    """
    total = labels.new_zeros((), dtype=torch.float32)
    for k, logits in enumerate(depth_logits, start=1):
        target = labels[:, k:]  # (B, T-k): token i + k + 1 at position i
        if logits.shape[:2] != target.shape:
            raise ValueError(
                f"depth {k}: logits {tuple(logits.shape)} do not match labels[:, {k}:] {tuple(target.shape)}"
            )
        loss_sum, n = cross_entropy_sum(logits, target, ignore_index)
        total = total + loss_sum / n.clamp(min=1)
    return total * (weight / max(len(depth_logits), 1))
