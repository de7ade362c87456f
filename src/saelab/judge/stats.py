"""The statistics of a judgement study, in numpy and the standard library (scipy is the tests'
reference, not a dependency); intervals are the comparisons' `Interval`.

- `wilcoxon_pratt`: the one-sided paired signed-rank test the Gated SAE paper used (section
  4.3), zeros ranked and then dropped (Pratt), ties given their mean rank, the normal
  approximation with the variance corrected for both (Cureton 1967); ratings of 0 / 1 / 2
  tie so often that an exact null is not what anyone computes.
- `bca_interval`: the bias-corrected and accelerated bootstrap interval of a statistic of
  paired rows (Efron 1987), the acceleration from the jackknife.
- `binomial_interval`: the exact (Clopper-Pearson) interval of a share, from the beta
  quantiles, found by bisection on the binomial tail.
- `krippendorff_alpha`: agreement between raters on the units more than one answered, any
  number of raters and missing answers, for nominal, ordinal or interval answers.
- `answers_needed`: the power line: how many answers a test of the given size needs to
  detect an effect with the given power.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from saelab.evals import Interval

_NORMAL = NormalDist()


@dataclass(frozen=True)
class SignedRank:
    """A signed-rank test's statistic (the sum of the positive differences' ranks), its z and
    one-sided p-value (the alternative: the differences tend to be positive), and how many
    differences were non-zero."""

    statistic: float
    z: float
    p_value: float
    nonzero: int


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values))
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):  # one pass over groups of ties
        ranks[order[start:end]] = (start + 1 + end) / 2
    return ranks


def wilcoxon_pratt(differences: np.ndarray) -> SignedRank:
    """The paired signed-rank test of `differences` (A - B per pair) against 'A is no
    better', Pratt's treatment of zeros, normal approximation without continuity correction."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    ranks = average_ranks(np.abs(d))
    r_plus = float(ranks[d > 0].sum())
    zeros = int((d == 0).sum())
    mean = (n * (n + 1) - zeros * (zeros + 1)) / 4
    variance = n * (n + 1) * (2 * n + 1) - zeros * (zeros + 1) * (2 * zeros + 1)
    _, ties = np.unique(np.abs(d[d != 0]), return_counts=True)
    variance = (variance - float((ties ** 3 - ties).sum()) / 2) / 24
    if variance <= 0:
        return SignedRank(r_plus, math.nan, math.nan, n - zeros)
    z = (r_plus - mean) / math.sqrt(variance)
    return SignedRank(r_plus, z, 1 - _NORMAL.cdf(z), n - zeros)


def bca_interval(rows: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], *,
                 level: float = 0.9, resamples: int = 10_000, seed: int = 0) -> Interval:
    """The BCa bootstrap interval of `statistic` over `rows` [n, ...] (pairs stay together).
    `statistic` maps [..., n, ...] rows to values over the leading axes, so one call scores
    every resample: e.g. `lambda r: r.mean(axis=-1)` for a mean of differences [n]."""
    x = np.asarray(rows, dtype=np.float64)
    n = len(x)
    value = float(statistic(x))
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = np.asarray(statistic(x[draws]), dtype=np.float64)
    below = (boot < value).mean() + (boot == value).mean() / 2
    if below in (0.0, 1.0):  # every resample on one side: no interval to correct
        return Interval(value, value, value)
    z0 = _NORMAL.inv_cdf(float(below))
    keep = np.ones((n, n), dtype=bool)
    np.fill_diagonal(keep, False)
    jack = np.asarray(statistic(np.stack([x[keep[i]] for i in range(n)])), dtype=np.float64)
    spread = jack.mean() - jack
    denominator = 6 * float((spread ** 2).sum()) ** 1.5
    a = float((spread ** 3).sum()) / denominator if denominator > 0 else 0.0
    bounds = []
    for alpha in ((1 - level) / 2, (1 + level) / 2):
        z = _NORMAL.inv_cdf(alpha)
        bounds.append(_NORMAL.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))
    low, high = np.percentile(boot, [100 * b for b in bounds])
    return Interval(value, float(low), float(high))


def binomial_tail(successes: int, n: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p), summed in log space."""
    if successes <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    ks = np.arange(successes, n + 1)
    logs = (np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                      for k in ks]) + ks * math.log(p) + (n - ks) * math.log1p(-p))
    top = logs.max()
    return float(math.exp(top) * np.exp(logs - top).sum())


def binomial_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """The exact (Clopper-Pearson) interval of the share successes / n."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    tail = (1 - level) / 2

    def solve(f: Callable[[float], float]) -> float:  # f rises from < 0 to > 0 on [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if successes == 0 else solve(lambda p: binomial_tail(successes, n, p) - tail)
    high = 1.0 if successes == n else solve(
        lambda p: tail - (1 - binomial_tail(successes + 1, n, p)))
    return Interval(successes / n, low, high)


Metric = Literal["nominal", "ordinal", "interval"]


def krippendorff_alpha(answers: np.ndarray, metric: Metric = "nominal") -> float:
    """Krippendorff's alpha of `answers` [raters, units] (NaN where a rater did not answer a
    unit): 1 - observed / expected disagreement, over the pairable values (units answered at
    least twice), from the coincidence matrix (Krippendorff 2011)."""
    data = np.asarray(answers, dtype=np.float64)
    values = np.unique(data[~np.isnan(data)])
    index = {v: i for i, v in enumerate(values)}
    m = len(values)
    coincidences = np.zeros((m, m))
    for unit in data.T:
        seen = unit[~np.isnan(unit)]
        if len(seen) < 2:
            continue
        counts = np.zeros(m)
        for v in seen:
            counts[index[v]] += 1
        coincidences += (np.outer(counts, counts) - np.diag(counts)) / (len(seen) - 1)
    totals = coincidences.sum(axis=1)
    n = totals.sum()
    if n == 0 or m < 2:
        return math.nan
    delta = _distances(values, totals, metric)
    observed = float((coincidences * delta).sum())
    expected = float((np.outer(totals, totals) * delta).sum()) / (n - 1)
    return 1 - observed / expected if expected > 0 else math.nan


def _distances(values: np.ndarray, totals: np.ndarray, metric: Metric) -> np.ndarray:
    """The squared difference function delta^2(c, k) between the answer values."""
    if metric == "nominal":
        return 1.0 - np.eye(len(values))
    if metric == "interval":
        return np.subtract.outer(values, values) ** 2
    # ordinal: the answers' mass from c to k, less half of c's and half of k's
    cumulative = np.cumsum(totals)
    ranks = np.arange(len(values))
    lower, upper = np.minimum.outer(ranks, ranks), np.maximum.outer(ranks, ranks)
    mass = cumulative[upper] - cumulative[lower] + totals[lower] \
        - (totals[lower] + totals[upper]) / 2
    return mass ** 2


def answers_needed(effect: float, spread: float, *, level: float = 0.05, power: float = 0.8
                   ) -> float:
    """Pairs a one-sided test of size `level` needs to detect a mean difference `effect`
    (> 0) with `power`, for differences of standard deviation `spread` (the normal
    approximation n = ((z_level + z_power) spread / effect)^2, rounded up; inf: no effect)."""
    if effect <= 0:
        return math.inf
    z = _NORMAL.inv_cdf(1 - level) + _NORMAL.inv_cdf(power)
    return float(math.ceil((z * spread / effect) ** 2))


def share_answers_needed(share: float, *, null: float = 0.5, level: float = 0.05,
                         power: float = 0.8) -> float:
    """Answers a one-sided test of a share against `null` needs to detect a true `share`
    with `power` (normal approximation; inf when the share is the null's)."""
    if share == null:
        return math.inf
    z_a, z_b = _NORMAL.inv_cdf(1 - level), _NORMAL.inv_cdf(power)
    n = ((z_a * math.sqrt(null * (1 - null)) + z_b * math.sqrt(share * (1 - share)))
         / (share - null)) ** 2
    return float(math.ceil(n))
