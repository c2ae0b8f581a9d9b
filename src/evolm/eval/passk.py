"""The unbiased pass@k estimator (Chen et al., 2021, "Evaluating Large Language Models Trained on Code").

With ``n`` samples of a problem of which ``c`` pass, the probability that at least one of ``k``
samples drawn without replacement passes is

    pass@k = 1 - C(n - c, k) / C(n, k)

Drawing ``k`` samples directly and counting would be unbiased too but noisy; this uses every one of
the ``n``. ``C(n, k)`` overflows floats for HumanEval-sized ``n`` (200), so the ratio is computed as
the product ``prod_{i = n - c + 1}^{n} (1 - k / i)``, which is the same number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from evolm.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem.

    Args:
        n: Samples generated (>= 1).
        c: Samples that passed, 0 <= c <= n.
        k: Budget of attempts, 1 <= k <= n.

    Returns:
        A probability in [0, 1].
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r}; must be an integer")
    if n < 1:
        raise ConfigError(f"n={n}; at least one sample per problem is needed")
    if not 0 <= c <= n:
        raise ConfigError(f"c={c}; the number of passing samples must be in [0, n={n}]")
    if k < 1:
        raise ConfigError(f"k={k}; must be >= 1")
    if k > n:
        raise ConfigError(
            f"k={k} exceeds the n={n} samples per problem; pass@k needs at least k samples, so generate "
            f"n >= {k} samples or ask for a smaller k"
        )
    if n - c < k:  # every draw of k samples contains a passing one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(n: Sequence[int] | int, c: Sequence[int], k: int) -> float:
    """pass@k averaged over problems.

    Args:
        n: Samples per problem, one count for all or one per problem.
        c: Passing samples per problem.
        k: Budget of attempts.
    """
    ns = [n] * len(c) if isinstance(n, int) else list(n)
    if len(ns) != len(c):
        raise ConfigError(f"{len(ns)} sample counts for {len(c)} problems; give one per problem")
    if not c:
        raise ConfigError("no problems to average pass@k over")
    return sum(pass_at_k(ni, ci, k) for ni, ci in zip(ns, c, strict=True)) / len(c)
