"""The unbiased pass@k estimator against its closed form 1 - C(n-c, k) / C(n, k) in exact arithmetic."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from evolm.errors import ConfigError
from evolm.eval.passk import mean_pass_at_k, pass_at_k


def _closed_form(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_equals_closed_form_on_random_n_c_k():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 300)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        exact = _closed_form(n, c, k)
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10, abs=1e-12), (n, c, k)


def test_special_cases():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # any 3 of 10 contain one of the 8 passing
    for n, c in [(1, 0), (1, 1), (7, 3), (200, 13)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-12)  # pass@1 is the pass rate
    assert pass_at_k(200, 1, 200) == 1.0


def test_mean_over_problems():
    assert mean_pass_at_k(5, [0, 5, 1], 1) == pytest.approx((0 + 1 + 0.2) / 3)
    assert mean_pass_at_k([4, 2], [1, 1], 2) == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (3, 1, 5, "k=5 exceeds the n=3 samples"),
        (3, 4, 1, "c=4"),
        (3, -1, 1, "c=-1"),
        (3, 1, 0, "k=0"),
        (0, 0, 1, "n=0"),
        (3.0, 1, 1, "n=3.0"),
    ],
)
def test_bad_input_is_a_clear_error(n, c, k, message):
    with pytest.raises(ConfigError, match=message):
        pass_at_k(n, c, k)


def test_mean_bad_input():
    with pytest.raises(ConfigError, match="3 sample counts for 2 problems"):
        mean_pass_at_k([1, 1, 1], [0, 1], 1)
    with pytest.raises(ConfigError, match="k=2 exceeds the n=1"):
        mean_pass_at_k(1, [0, 1], 2)
