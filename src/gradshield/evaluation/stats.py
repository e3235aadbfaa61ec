"""Uncertainty of the rates a report prints: Wilson intervals for a rate, McNemar's exact test and
a confidence interval for the difference of two rates measured on the same examples.

Pure functions of counts (no numpy needed); ``z = 1.959964`` is the two-sided 95 % normal quantile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its Wilson score interval (``low``, ``high``); NaN for n = 0."""

    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def to_dict(self) -> dict:
        return {"k": self.k, "n": self.n, "value": self.value, "low": self.low, "high": self.high}


def wilson(k: int, n: int, z: float = Z95) -> Rate:
    """The Wilson score interval of a binomial proportion ``k / n`` (Wilson 1927): accurate at
    small n and near 0 or 1, where the normal ``p +- z sqrt(p(1-p)/n)`` interval is not."""
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Rate(0, 0, float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)      # exact ends: no rounding past p
    high = 1.0 if k == n else min(1.0, centre + half)
    return Rate(k, n, low, high)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (twice the smaller tail,
    capped at 1)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """Two rates on the same ``n`` examples: ``only_a`` examples count for a and not for b,
    ``only_b`` the reverse. ``difference`` = rate(a) - rate(b) with its 95 % interval, and the
    exact McNemar p-value of "a and b have the same rate"."""

    n: int
    only_a: int
    only_b: int
    difference: float
    low: float
    high: float
    p_value: float

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha

    def to_dict(self) -> dict:
        return {"n": self.n, "only_a": self.only_a, "only_b": self.only_b,
                "difference": self.difference, "low": self.low, "high": self.high,
                "p_value": self.p_value}


def paired(only_a: int, only_b: int, n: int, z: float = Z95) -> Paired:
    """McNemar's exact test on the discordant pairs and the Wald interval of the paired difference
    ``(only_a - only_b) / n`` with variance ``(only_a + only_b - (only_a - only_b)^2 / n) / n^2``."""
    only_a, only_b, n = int(only_a), int(only_b), int(n)
    if n <= 0 or only_a < 0 or only_b < 0 or only_a + only_b > n:
        raise ValueError(f"need 0 <= only_a + only_b <= n > 0, got {only_a}, {only_b}, {n}")
    d = (only_a - only_b) / n
    variance = max(0.0, (only_a + only_b - (only_a - only_b) ** 2 / n)) / (n * n)
    half = z * math.sqrt(variance)
    return Paired(n, only_a, only_b, d, d - half, d + half,
                  binomial_two_sided(only_a, only_a + only_b))


def paired_masks(a, b) -> Paired:
    """:func:`paired` from two boolean sequences over the same examples (e.g. robust per example)."""
    a, b = [bool(v) for v in a], [bool(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"paired masks need the same examples, got {len(a)} and {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    return paired(only_a, only_b, len(a))
