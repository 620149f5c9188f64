"""Small, dependency-free statistics for the shadow comparison: pure functions, no I/O.

- `wilson_interval`: a confidence interval for a proportion that stays inside [0, 1] and behaves
  at 0 and n successes (unlike the normal approximation).
- `two_proportion_ztest`: the pooled two-proportion z-test (challenger vs champion).
- `sign_test`: the exact two-sided binomial test at p = 0.5 for pairwise wins vs losses.

Everything works on counts so results are reproducible by hand (see tests/unit/shadow/test_stats.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

_STANDARD_NORMAL = NormalDist()


def z_critical(confidence: float) -> float:
    """Two-sided critical value of the standard normal, e.g. 1.959964 for confidence 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    return _STANDARD_NORMAL.inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for successes/n; (0.0, 1.0) when n == 0 (nothing is known)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = z_critical(confidence)
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denominator
    half_width = (z / denominator) * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    return (max(0.0, centre - half_width), min(1.0, centre + half_width))


@dataclass(frozen=True)
class ProportionTest:
    """Result of a two-proportion z-test of group 2 (challenger) against group 1 (champion)."""

    p1: float
    p2: float
    diff: float  # p2 - p1
    z: float
    p_value: float
    n1: int
    n2: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def two_proportion_ztest(x1: int, n1: int, x2: int, n2: int) -> ProportionTest:
    """Pooled two-sided z-test of H0: p1 == p2, with z = (p2 - p1) / SE_pooled.

    A positive z means group 2 (the challenger) has the higher rate. When the pooled rate is 0 or
    1 the variance is zero and the groups are indistinguishable: z = 0, p = 1.
    """
    for x, n, label in ((x1, n1, "1"), (x2, n2, "2")):
        if n <= 0 or x < 0 or x > n:
            raise ValueError(f"group {label}: need n > 0 and 0 <= x <= n, got x={x}, n={n}")
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return ProportionTest(p1=p1, p2=p2, diff=p2 - p1, z=0.0, p_value=1.0, n1=n1, n2=n2)
    z = (p2 - p1) / math.sqrt(variance)
    return ProportionTest(
        p1=p1, p2=p2, diff=p2 - p1, z=z, p_value=normal_two_sided_p(z), n1=n1, n2=n2
    )


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial p-value of `wins` of wins+losses at p = 0.5 (ties dropped)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0, got {wins}, {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = min(wins, losses)
    # Under p = 0.5 the distribution is symmetric: two-sided p = 2 * P(X <= min(k, n - k)).
    cumulative = sum(math.comb(n, i) for i in range(tail + 1)) / 2.0**n
    return min(1.0, 2.0 * cumulative)
