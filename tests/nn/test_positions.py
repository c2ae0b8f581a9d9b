"""Absolute position signals: sinusoidal (Vaswani et al., 2017) and ALiBi slopes (Press et al., 2021)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from evolm.nn.positions import alibi_slopes, sinusoidal_positions


def _vaswani(p: int, dim: int) -> list[float]:
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)), written out element by element."""
    row = []
    for j in range(dim):
        i = j // 2
        angle = p / 10000 ** (2 * i / dim)
        row.append(math.sin(angle) if j % 2 == 0 else math.cos(angle))
    return row


@pytest.mark.parametrize("dim", [2, 8, 64])
def test_sinusoidal_equals_the_paper_formula(dim):
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 511])
    out = sinusoidal_positions(positions, dim)
    assert out.shape == (7, dim) and out.dtype == torch.float32
    ref = torch.tensor([_vaswani(int(p), dim) for p in positions], dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)


def test_sinusoidal_keeps_leading_shape():
    positions = torch.tensor([[0, 1, 2], [4, 5, 6]])
    out = sinusoidal_positions(positions, 16)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out[1, 0], sinusoidal_positions(torch.tensor([4]), 16)[0])


def test_sinusoidal_needs_even_width():
    with pytest.raises(ValueError, match="dim=7"):
        sinusoidal_positions(torch.arange(3), 7)


def test_alibi_slopes_power_of_two_is_the_papers_geometric_sequence():
    """For 8 heads: 1/2, 1/4, ..., 1/256 (Press et al., 2021, section 3)."""
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]), rtol=0, atol=0)
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2.0 ** (-i / 2) for i in range(1, 17)]))


@pytest.mark.parametrize("n_heads", [1, 2, 4, 6, 8, 12, 16, 20, 32, 40, 112])
def test_alibi_slopes_equal_bloom(n_heads):
    # BLOOM's alibi for keys at positions (0, 1) is (0, slope_h); read the slopes off position 1.
    ref = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_heads, torch.float32)[:, 0, 1]  # (H,)
    out = alibi_slopes(n_heads)
    assert out.shape == (n_heads,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
