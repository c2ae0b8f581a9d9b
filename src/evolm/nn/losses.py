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
    if logits.dtype in (torch.bfloat16, torch.float16):  # mixed precision: no full-size float32 copy
        loss = _ChunkedCrossEntropySum.apply(logits.flatten(0, 1), labels.flatten(), ignore_index)
    else:
        flat = logits.float().flatten(0, 1)
        loss = F.cross_entropy(flat, labels.flatten(), ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of low-precision logits (N, V), computed in float32 a block of rows at a time.

    ``F.cross_entropy(logits.float())`` makes a float32 copy of all logits, a float32 log-softmax
    and, in backward, a zero-filled float32 gradient cast back to the logits' dtype: four passes
    over N x V values that leave the caches. Here each block of ~1M values is upcast while it is in
    cache: forward keeps only the per-row log-sum-exp, backward writes ``(softmax - onehot) * g``
    straight into a gradient of the logits' dtype. Same float32 math as the full-size version
    (gradients equal to ~1e-10); measured here on 1024 x 8192 bf16 logits: 55-60 ms -> 13-17 ms
    for forward and backward.
    """

    @staticmethod
    def _rows(v: int) -> int:
        return max(1, (1 << 20) // v)

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        n, v = logits.shape
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = _ChunkedCrossEntropySum._rows(v)
        for s in range(0, n, step):
            z = logits[s : s + step].float()  # (n_block, V)
            block_lse = torch.logsumexp(z, dim=-1)
            lse[s : s + step] = block_lse
            target = z.gather(1, safe[s : s + step, None])[:, 0]
            total += ((block_lse - target) * valid[s : s + step]).sum()
        ctx.save_for_backward(logits, safe, valid, lse)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, safe, valid, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        weight = valid.float() * grad  # (N,): ignored rows get no gradient
        step = _ChunkedCrossEntropySum._rows(logits.shape[1])
        for s in range(0, logits.shape[0], step):
            p = logits[s : s + step].float().sub_(lse[s : s + step, None]).exp_()  # softmax
            p.scatter_add_(1, safe[s : s + step, None], p.new_full((p.shape[0], 1), -1.0))
            out[s : s + step] = p.mul_(weight[s : s + step, None])
        return out, None, None
