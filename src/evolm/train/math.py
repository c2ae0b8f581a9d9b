"""The numerically subtle parts of a training loop, as pure functions tested once and used by
every recipe: learning-rate schedules, token-normalised gradient accumulation, FLOPs and MFU."""

from __future__ import annotations

import math

from evolm.models.config import DecoderConfig


def lr_at(
    step: int,
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    kind: str = "cosine",
    min_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    * ``cosine``: linear warmup to ``peak``, then half a cosine down to ``min_ratio * peak`` at
      ``total_steps`` (Loshchilov & Hutter, 2017; GPT-3).
    * ``wsd``: warmup, a stable plateau at ``peak``, and a linear decay to ``min_ratio * peak`` over
      the last ``decay_fraction`` of training (warmup-stable-decay; Hu et al., 2024, MiniCPM).
    * ``constant``: warmup, then ``peak``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = peak * min_ratio
    if kind == "constant":
        return peak
    if kind == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_steps = max(1, round(total_steps * decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / decay_steps)
        return peak + (floor - peak) * progress
    raise ValueError(f"unknown schedule {kind!r}; allowed: cosine, wsd, constant")


def scheduled_lr(step: int, optim, schedule, total_steps: int) -> float:
    """``lr_at`` for a recipe's ``OptimConfig`` (peak, floor ratio) and ``ScheduleConfig``."""
    return lr_at(
        step,
        peak=optim.lr,
        total_steps=total_steps,
        warmup_steps=schedule.warmup_steps,
        kind=schedule.kind,
        min_ratio=optim.min_lr_ratio,
        decay_fraction=schedule.decay_fraction,
    )


def loss_scale(n_tokens_global: int, world_size: int) -> float:
    """Factor turning a micro-batch's summed loss into its share of the global mean.

    Each micro-batch contributes ``loss_sum * loss_scale``; summed over micro-batches this is the
    mean over every target token of the global batch. Data parallelism averages gradients over
    ranks, hence the ``world_size`` factor that undoes that average.
    """
    if n_tokens_global <= 0:
        raise ValueError("the global batch has no target tokens")
    return world_size / n_tokens_global


def flops_per_token(cfg: DecoderConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's
    ``12 * layers * heads * head_dim * seq_len`` (Kaplan et al., 2020; PaLM appendix B).

    ``n_params`` should exclude the embedding lookup table (it does no matmul); a tied or untied
    output head does count.
    """
    a = cfg.attention
    return 6.0 * n_params + 12.0 * cfg.n_layers * a.n_heads * a.head_dim * seq_len


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: everything but the input embedding table(s)."""
    skip = set()
    backbone = getattr(model, "model", None)
    for name in ("embed_tokens", "embed_positions"):
        mod = getattr(backbone, name, None)
        if mod is not None:
            skip.add(id(mod.weight))
    lm_head = getattr(model, "lm_head", None)
    total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in skip and not (lm_head is not None and p is lm_head.weight):
            continue
        total += p.numel()
    return total
