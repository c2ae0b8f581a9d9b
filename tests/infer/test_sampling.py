"""Sampling processors against transformers' logits processors, and argument validation."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as lp

from evolm.errors import ConfigError
from evolm.infer.sampling import SamplingConfig, apply_repetition_penalty, filter_logits, sample_next


def _logits(seed=0, b=3, v=50):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _kept(x):
    return torch.isfinite(x) & (x > torch.finfo(x.dtype).min)


@pytest.mark.parametrize("top_k", [1, 5, 49])
def test_top_k_matches_transformers(top_k):
    x = _logits()
    ours = filter_logits(x, SamplingConfig(temperature=1.0, top_k=top_k))
    ref = lp.TopKLogitsWarper(top_k)(None, x.clone())
    assert torch.equal(_kept(ours), _kept(ref))
    assert torch.allclose(ours[_kept(ours)], ref[_kept(ref)])


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 1.0])
def test_top_p_matches_transformers(top_p):
    x = _logits(1)
    ours = filter_logits(x, SamplingConfig(temperature=1.0, top_p=top_p))
    ref = lp.TopPLogitsWarper(top_p)(None, x.clone())
    assert torch.equal(_kept(ours), _kept(ref))


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_matches_transformers(min_p):
    x = _logits(2)
    ours = filter_logits(x, SamplingConfig(temperature=1.0, min_p=min_p))
    ref = lp.MinPLogitsWarper(min_p)(None, x.clone())
    assert torch.equal(_kept(ours), _kept(ref))


def test_temperature_and_repetition_penalty_match_transformers():
    x = _logits(3)
    ctx = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(ctx, x.clone())
    assert torch.allclose(apply_repetition_penalty(x, ctx, 1.3), ref)
    ref_t = lp.TemperatureLogitsWarper(0.7)(None, x.clone())
    assert torch.allclose(filter_logits(x, SamplingConfig(temperature=0.7)), ref_t)


def test_greedy_is_argmax_and_sampling_is_seeded():
    x = _logits(4)
    assert torch.equal(sample_next(x, SamplingConfig()), x.argmax(-1))
    cfg = SamplingConfig(temperature=1.0, top_k=10)
    draws = [sample_next(x, cfg, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    # top-k=1 sampling is greedy
    assert torch.equal(sample_next(x, SamplingConfig(temperature=1.0, top_k=1)), x.argmax(-1))


def test_sampled_frequencies_follow_softmax():
    x = torch.tensor([[0.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    cfg = SamplingConfig(temperature=1.0)
    for _ in range(4000):
        counts[sample_next(x, cfg, generator=g)] += 1
    assert torch.allclose(counts / counts.sum(), x.softmax(-1)[0], atol=0.03)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature=-0.1"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"min_p": 2.0}, "min_p=2.0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0"),
    ],
)
def test_invalid_arguments_name_value_and_range(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**kwargs)


def test_non_finite_logits_stop_with_an_error():
    x = _logits(5)
    x[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"rows \[1\]"):
        sample_next(x, SamplingConfig())
