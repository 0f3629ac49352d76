"""Uncertainty of the numbers a run reports: intervals, paired tests, summaries over repeats.

Written here rather than taken from scipy/statsmodels: the core install stays torch, torchvision,
lightning, torchmetrics, tensorboard and omegaconf, and each formula is a few lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # standard normal 97.5% quantile
# Student t 97.5% quantiles by degrees of freedom (1..30), for the interval of a mean over repeats.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / total``: unlike the normal
    approximation it stays inside [0, 1] and is not empty at 100% accuracy."""
    if total <= 0:
        raise ValueError("an interval needs at least one observation")
    if not 0 <= correct <= total:
        raise ValueError(f"correct={correct} must be between 0 and total={total}")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, float | int]:
    """Exact (binomial) McNemar test of two classifiers on the same images.

    ``a_only``: images A gets right and B wrong; ``b_only``: the reverse. Under the null
    hypothesis (equal accuracy) each discordant image is a fair coin, so the two-sided p-value
    is ``2 * P(Binomial(a_only + b_only, 1/2) <= min(a_only, b_only))``, capped at 1. The exact
    form is right also for the few discordant images a good pair of models leaves."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"McNemar needs the same images: {len(a_correct)} vs {len(b_correct)} predictions")
    a_only = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    b_only = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "n": len(a_correct), "p_value": min(1.0, 2 * tail)}


def t_quantile_975(df: int) -> float:
    """Student t 97.5% quantile (two-sided 95%); the normal one beyond 30 degrees of freedom
    (the table's last entry, 2.042, is within 4% of it)."""
    if df < 1:
        raise ValueError("a t interval needs at least two repeats")
    return _T975[df - 1] if df <= len(_T975) else Z95


def mean_sd_interval(values: Sequence[float]) -> dict[str, float | int | list[float] | None]:
    """Mean, sample standard deviation and the 95% t interval of the mean of repeated runs
    (sd and interval are None for a single run: one seed says nothing about the spread)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}
