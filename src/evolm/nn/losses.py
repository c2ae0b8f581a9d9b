"""Token-level log-probabilities and the language-modelling loss.

``token_logprobs`` is the one function that turns logits and target tokens into log p(target):
evaluation (perplexity, multiple choice), preference optimisation (DPO), policy gradients (PPO,
GRPO) and reward scoring all call it, so they agree to the bit.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p(labels[b, t]) under logits[b, t], in float32; 0 where ``labels == ignore_index``.

    Args:
        logits: (B, T, V) unnormalised scores; position t predicts ``labels[:, t]``.
        labels: (B, T) target ids (already shifted: the caller aligns targets with positions).
        ignore_index: Label value of positions that carry no target.

    Returns:
        (B, T) float32.
    """
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    nll = F.cross_entropy(logits.float().flatten(0, 1), safe.flatten(), reduction="none").view_as(labels)
    return (-nll).masked_fill(~valid, 0.0)


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens.

    Returning the sum (not the mean) lets gradient accumulation and data parallelism normalise by
    the tokens of the whole global batch (``loss_sum / n_tokens``), so every token weighs the same
    however the batch is split.

    Args:
        logits: (B, T, V).
        labels: (B, T) aligned targets; ``ignore_index`` where there is none.

    Returns:
        ``(loss_sum, n_tokens)``: float32 scalar and int64 scalar.
    """
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()
