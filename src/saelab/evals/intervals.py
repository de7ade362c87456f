"""Confidence intervals by bootstrap over windows, for metrics that are ratios of sums.

Tokens of one window share a context, so they are not independent draws; windows (separate
stretches of text) nearly are. So every metric is kept as per-window sums (`WindowSums`),
and an interval resamples whole windows with replacement: each of `resamples` draws is a
vector of counts over the windows, the metric is recomputed from the count-weighted sums,
and the interval is the draws' 2.5 and 97.5 percentiles (the percentile bootstrap). The
counts are one matrix [resamples, windows], so a metric's every draw is one matrix product.

A paired difference (coder A minus coder B on the same windows) uses the same counts for
both, which is what makes it paired: the windows that are hard for one are hard for the
other, and that shared part cancels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95

Columns = dict[str, np.ndarray]  # name -> per-window sums [windows] or [windows, d]
Metric = Callable[[Columns], np.ndarray]  # summed columns (leading axes kept) -> values


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_json(self) -> dict[str, float | bool]:
        return {"value": self.value, "low": self.low, "high": self.high}


def resample_counts(n_windows: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, n_windows] counts: how often each window is drawn in each resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_windows, size=(resamples, n_windows))
    offsets = np.arange(resamples)[:, None] * n_windows
    return np.bincount((draws + offsets).ravel(),
                       minlength=resamples * n_windows).reshape(resamples, n_windows)


def weighted(columns: Columns, counts: np.ndarray) -> Columns:
    """Each column summed over windows with weights `counts` [..., windows]."""
    return {name: np.tensordot(counts, col.astype(np.float64), axes=(-1, 0))
            for name, col in columns.items()}


def interval(metric: Metric, columns: Columns, counts: np.ndarray, level: float = LEVEL
             ) -> Interval:
    """`metric` on all windows, with its percentile-bootstrap interval over `counts`."""
    value = metric(weighted(columns, np.ones(_windows(columns))))
    draws = metric(weighted(columns, counts))
    low, high = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(value), float(low), float(high))


def paired_difference(metric: Metric, a: Columns, b: Columns, counts: np.ndarray,
                      level: float = LEVEL) -> Interval:
    """metric(a) - metric(b) on the same windows, resampled together."""
    ones = np.ones(_windows(a))
    value = metric(weighted(a, ones)) - metric(weighted(b, ones))
    draws = metric(weighted(a, counts)) - metric(weighted(b, counts))
    low, high = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(value), float(low), float(high))


def _windows(columns: Columns) -> int:
    sizes = {len(col) for col in columns.values()}
    if len(sizes) != 1:
        raise ValueError(f"every column needs one value per window, got lengths {sorted(sizes)}")
    return sizes.pop()
