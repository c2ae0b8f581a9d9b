"""The training loop's pure math against closed forms and PyTorch references: learning-rate
schedules, the loss scale of token-normalised accumulation, token log-probs and the summed
cross-entropy, FLOPs per token."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

import evolm
from evolm.nn.losses import IGNORE_INDEX, cross_entropy_sum, token_logprobs
from evolm.train.math import flops_per_token, loss_scale, lr_at, matmul_params

PEAK, FLOOR_RATIO = 3e-3, 0.1
FLOOR = PEAK * FLOOR_RATIO


def lr(step: int, kind: str, total: int = 100, warmup: int = 10, decay_fraction: float = 0.2) -> float:
    return lr_at(
        step,
        peak=PEAK,
        total_steps=total,
        warmup_steps=warmup,
        kind=kind,
        min_ratio=FLOOR_RATIO,
        decay_fraction=decay_fraction,
    )


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_from_peak_over_warmup_to_peak(kind):
    for step in range(10):
        assert lr(step, kind) == pytest.approx(PEAK * (step + 1) / 10, rel=1e-12)
    assert lr(0, kind) == pytest.approx(PEAK / 10) and lr(9, kind) == pytest.approx(PEAK)
    assert lr(10, kind) == pytest.approx(PEAK)  # the first step after warmup runs at the peak


def test_cosine_closed_form_and_floor():
    for step in range(10, 101):
        progress = (step - 10) / 90
        expected = FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr(step, "cosine") == pytest.approx(expected, rel=1e-12)
    assert lr(55, "cosine") == pytest.approx((PEAK + FLOOR) / 2)  # half way down
    assert lr(100, "cosine") == pytest.approx(FLOOR)  # reaches min_ratio * peak at total_steps
    assert lr(10_000, "cosine") == pytest.approx(FLOOR)  # and stays there
    values = [lr(s, "cosine") for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_wsd_plateau_then_linear_decay_to_floor():
    # decay over the last round(0.2 * 100) = 20 steps: plateau on [10, 80), linear on [80, 100]
    assert all(lr(s, "wsd") == PEAK for s in range(10, 80))
    for step in range(80, 101):
        assert lr(step, "wsd") == pytest.approx(PEAK + (FLOOR - PEAK) * (step - 80) / 20, rel=1e-12)
    assert lr(90, "wsd") == pytest.approx((PEAK + FLOOR) / 2)
    assert lr(100, "wsd") == pytest.approx(FLOOR) and lr(500, "wsd") == pytest.approx(FLOOR)


def test_constant_and_no_warmup():
    assert all(lr(s, "constant") == PEAK for s in range(10, 300))
    assert lr(0, "cosine", warmup=0) == PEAK and lr(0, "wsd", warmup=0) == PEAK
    with pytest.raises(ValueError, match="allowed: cosine, wsd, constant"):
        lr(50, "linear")


def test_loss_scale_turns_micro_batch_sums_into_the_global_token_mean():
    """Two ranks x three micro-batches of uneven token counts (ignored labels included): summing
    ``loss_sum * loss_scale`` per rank and averaging over ranks, as DDP does, gives the mean over
    every target token of the global batch; the mean of per-micro-batch means would not."""
    g = torch.Generator().manual_seed(0)
    world, micro, V = 2, 3, 11
    logits = [[torch.randn(2, 5, V, generator=g) for _ in range(micro)] for _ in range(world)]
    labels = [[torch.randint(0, V, (2, 5), generator=g) for _ in range(micro)] for _ in range(world)]
    for r in range(world):
        for i in range(micro):
            labels[r][i][torch.rand(2, 5, generator=g) < 0.15 * (r + i + 1)] = IGNORE_INDEX
    n_global = sum(int((y != IGNORE_INDEX).sum()) for ys in labels for y in ys)
    scale = loss_scale(n_global, world)
    assert scale == world / n_global
    per_rank = [
        sum(cross_entropy_sum(x, y)[0] * scale for x, y in zip(xs, ys, strict=True))
        for xs, ys in zip(logits, labels, strict=True)
    ]
    ddp_average = sum(per_rank) / world
    everything = F.cross_entropy(
        torch.cat([x.flatten(0, 1) for xs in logits for x in xs]),
        torch.cat([y.flatten() for ys in labels for y in ys]),
        ignore_index=IGNORE_INDEX,
    )
    torch.testing.assert_close(ddp_average, everything, rtol=1e-6, atol=0)
    mean_of_means = sum(
        F.cross_entropy(x.flatten(0, 1), y.flatten())
        for xs, ys in zip(logits, labels, strict=True)
        for x, y in zip(xs, ys, strict=True)
    ) / (world * micro)
    assert abs(float(mean_of_means - everything)) > 1e-3  # the uneven counts make the difference visible
    with pytest.raises(ValueError, match="no target tokens"):
        loss_scale(0, 1)


def test_token_logprobs_is_log_softmax_gather_and_zero_where_ignored():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 7, 13, generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    out = token_logprobs(logits, labels)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    valid = labels != IGNORE_INDEX
    reference = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out[valid], reference[valid], rtol=1e-6, atol=1e-6)
    assert torch.all(out[~valid] == 0)
    # a custom ignore_index: id 5 is skipped, every other id is scored
    ids = labels.clamp(min=0)
    own = token_logprobs(logits, ids, ignore_index=5)
    full = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
    keep = ids != 5
    assert 0 < int(keep.sum()) < ids.numel()
    torch.testing.assert_close(own[keep], full[keep], rtol=1e-6, atol=1e-6)
    assert torch.all(own[~keep] == 0)


def test_cross_entropy_sum_matches_torch_and_counts_targets():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 9, 17, generator=g, requires_grad=True)
    labels = torch.randint(0, 17, (4, 9), generator=g)
    labels[1] = IGNORE_INDEX
    labels[3, 4:] = IGNORE_INDEX
    loss_sum, n = cross_entropy_sum(logits, labels)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(loss_sum, reference, rtol=1e-6, atol=0)
    assert n.dtype == torch.int64 and int(n) == 4 * 9 - 9 - 5
    torch.testing.assert_close(-token_logprobs(logits, labels).sum(), loss_sum, rtol=1e-6, atol=0)
    loss_sum.backward()
    assert torch.all(logits.grad[1] == 0)  # ignored positions get no gradient
    half, n_half = cross_entropy_sum(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32 and int(n_half) == int(n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cross_entropy_blocks_equal_the_float32_reference(dtype):
    """bf16/fp16 logits take the block-wise path; loss and gradient equal F.cross_entropy over the
    float32 upcast (V = 70000 makes ~15 rows a block, so 64 rows span five blocks)."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(2, 32, 70000, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 70000, (2, 32), generator=g)
    labels[0, 3:9] = IGNORE_INDEX
    ours = base.clone().requires_grad_()
    ref = base.clone().requires_grad_()
    loss, n = cross_entropy_sum(ours, labels)
    expected = F.cross_entropy(ref.float().flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    (loss / n).backward()
    (expected / n).backward()
    assert ours.grad.dtype == dtype
    eps = torch.finfo(dtype).eps  # at most one rounding step apart
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), rtol=eps, atol=1e-6)
    assert torch.all(ours.grad[0, 3:9] == 0)


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_formula(tied, tiny_llama):
    cfg = tiny_llama().replace(tie_embeddings=tied)
    model = evolm.build_model(cfg, seed=0)
    total = sum(p.numel() for p in model.parameters())
    embedding = cfg.vocab_size * cfg.hidden_size
    # tied: the one matrix is the LM head's, a matmul; untied: the lookup table does no matmul
    assert matmul_params(model) == (total if tied else total - embedding)
    n, T = matmul_params(model), 96
    a = cfg.attention
    assert flops_per_token(cfg, n, T) == 6 * n + 12 * cfg.n_layers * a.n_heads * a.head_dim * T
    assert flops_per_token(cfg, n, T) == 6 * n + 12 * 2 * 4 * 16 * 96
