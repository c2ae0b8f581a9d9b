"""Turning next-token logits into tokens.

Processors run in Hugging Face's order so seeded results are comparable: repetition penalty
(Keskar et al., 2019, CTRL), then temperature, top-k (Fan et al., 2018), nucleus / top-p
(Holtzman et al., 2020) and min-p (Nguyen et al., 2024), then greedy argmax or a draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evolm.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen.

    Attributes:
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_k: Keep the k most likely tokens (None or 0: no limit).
        top_p: Keep the smallest set whose probability reaches p, in (0, 1].
        min_p: Drop tokens below ``min_p`` times the top probability, in [0, 1].
        repetition_penalty: > 1 discourages tokens already in the sequence (CTRL's rule).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature}; must be >= 0 (0 means greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ConfigError(f"top_k={self.top_k}; must be an integer >= 0 (0 or None disables it)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}; must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p={self.min_p}; must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty}; must be > 0 (1 disables it)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token id present in ``context``.

    Args:
        logits: (B, V).
        context: (B, S) token ids seen so far (prompt and generated).
        penalty: > 1 penalises; positive scores are divided by it, negative ones multiplied.
    """
    if penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, context)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, context, score)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to (B, V) float logits; removed entries are -inf."""
    neg = torch.finfo(logits.dtype).min
    logits = logits / cfg.temperature
    if cfg.top_k:
        k = min(cfg.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, neg)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, neg)
    if cfg.min_p:
        probs = logits.softmax(dim=-1)
        threshold = cfg.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, neg)
    return logits


def nonfinite_logits_error(finite_rows: torch.Tensor) -> FloatingPointError:
    """The error for logits with NaN/Inf values; ``finite_rows`` (B,) is True where a row's are all finite."""
    bad = (~finite_rows).nonzero().flatten().tolist()
    return FloatingPointError(
        f"non-finite (NaN/Inf) logits in batch rows {bad}; stopping generation instead of emitting garbage "
        "(often an overflow: try float32 or bfloat16 instead of float16)"
    )


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    context: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token of every row.

    Args:
        logits: (B, V) next-token logits.
        cfg: Sampling settings.
        context: (B, S) ids so far, for the repetition penalty.
        generator: RNG for reproducible draws.

    Returns:
        (B,) token ids.

    Raises:
        FloatingPointError: the logits contain NaN or Inf, which would make any choice garbage.
    """
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise nonfinite_logits_error(torch.isfinite(logits).all(dim=-1))
    if context is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, context, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, cfg).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
