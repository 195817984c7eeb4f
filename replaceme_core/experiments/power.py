"""Sample sizes for paired comparisons, written beside the document counts in the profiles.

A claim compares two models on the same documents, so what matters is the spread of the per-document
*difference*. For a two-sided test at level alpha with power 1 − beta to detect a mean difference `effect`:

    n = ((z_{1 − alpha/2} + z_{1 − beta}) · sd_diff / effect)²

(normal approximation; `paired_n`). Averaged over k tasks with n documents each, the mean difference has
standard deviation sd_diff / sqrt(k · n), so the per-task count is n / k (`per_task_n`). For 0/1 accuracy the
per-document difference takes values −1, 0, +1: its variance is the discordant share minus the squared effect
(`accuracy_diff_sd`).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def z(p: float) -> float:
    return NormalDist().inv_cdf(p)


def paired_n(sd_diff: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Documents needed to detect a mean paired difference `effect` given the per-document sd of the difference."""
    if effect <= 0 or sd_diff < 0:
        raise ValueError("effect must be positive and sd_diff non-negative")
    return max(2, math.ceil(((z(1 - alpha / 2) + z(power)) * sd_diff / effect) ** 2))


def per_task_n(sd_diff: float, effect: float, tasks: int, alpha: float = 0.05, power: float = 0.8) -> int:
    """Documents per task when the statistic is the mean over `tasks` tasks of per-task mean differences."""
    return max(2, math.ceil(paired_n(sd_diff, effect, alpha, power) / tasks))


def accuracy_diff_sd(discordant: float, effect: float = 0.0) -> float:
    """sd of a per-document difference of two 0/1 scores, from the share of documents where they disagree."""
    return math.sqrt(max(discordant - effect ** 2, 0.0))


def observed_sd(a, b) -> float:
    """Sample sd of the paired per-document difference a − b (from a pilot run)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.std(ddof=1)) if d.size > 1 else float("nan")


def data_factor(half_width: float, distance: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """How many times the documents a (1 − alpha) interval of half-width `half_width` needs, shrinking as 1/√n, to
    clear a bound `distance` away from its estimate with the given power, were the true effect the estimate:
    ((z_{1 − alpha/2} + z_{power}) · se / distance)² / n with se = half_width / z_{1 − alpha/2}. Infinite at distance 0."""
    if distance == 0:
        return float("inf")
    za = z(1 - alpha / 2)
    return ((za + z(power)) * half_width / (za * abs(distance))) ** 2


def detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean paired difference `n` documents detect with the given power (the inverse of paired_n)."""
    return (z(1 - alpha / 2) + z(power)) * sd_diff / math.sqrt(n)
