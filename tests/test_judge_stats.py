"""The judgement study's statistics against scipy, the krippendorff package, Krippendorff's
own worked example, and a simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from saelab.judge.stats import (
    answers_needed,
    average_ranks,
    bca_interval,
    binomial_interval,
    krippendorff_alpha,
    share_answers_needed,
    wilcoxon_pratt,
)


def rating_differences(n=150, seed=0):
    """Paired differences of 0/1/2 ratings: many zeros and ties, a small positive shift."""
    rng = np.random.default_rng(seed)
    a = rng.choice(3, size=n, p=[0.2, 0.3, 0.5])
    b = rng.choice(3, size=n, p=[0.3, 0.35, 0.35])
    return (a - b).astype(float)


def test_ranks_equal_scipys():
    x = np.random.default_rng(1).integers(0, 6, size=300).astype(float)
    np.testing.assert_array_equal(average_ranks(x), stats.rankdata(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wilcoxon_pratt_equals_scipys_normal_approximation(seed):
    d = rating_differences(seed=seed)
    assert (d == 0).sum() > 20  # Pratt's zeros matter here
    ours = wilcoxon_pratt(d)
    ref = stats.wilcoxon(d, zero_method="pratt", alternative="greater", method="asymptotic",
                         correction=False)
    assert ours.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.z == pytest.approx(ref.zstatistic, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_bca_interval_matches_scipys_and_not_the_percentile_one():
    """On a skewed sample BCa moves the interval away from the plain percentiles; ours
    lands where scipy's BCa does (both 40,000 resamples; the tolerance is a tenth of the
    distance between BCa and percentile)."""
    x = np.random.default_rng(3).exponential(size=60) ** 2
    ours = bca_interval(x, lambda r: r.mean(axis=-1), level=0.9, resamples=40_000)
    ref = stats.bootstrap((x,), np.mean, confidence_level=0.9, method="BCa",
                          n_resamples=40_000, random_state=1).confidence_interval
    pct = stats.bootstrap((x,), np.mean, confidence_level=0.9, method="percentile",
                          n_resamples=40_000, random_state=1).confidence_interval
    gap = abs(ref.high - pct.high)
    assert gap > 0.05  # the correction is not small here
    assert ours.value == pytest.approx(x.mean())
    assert abs(ours.low - ref.low) < gap / 10 and abs(ours.high - ref.high) < gap / 10


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 120), (1, 300)])
def test_clopper_pearson_equals_scipys(k, n):
    ours = binomial_interval(k, n, 0.95)
    ref = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    assert ours.low == pytest.approx(ref.low, abs=1e-10)
    assert ours.high == pytest.approx(ref.high, abs=1e-10)


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the example with four
# observers, twelve units and missing values; his alphas: nominal 0.743, ordinal 0.815,
# interval 0.849.
NAN = math.nan
RELIABILITY = np.array([
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
])


@pytest.mark.parametrize("metric,published", [("nominal", 0.743), ("ordinal", 0.815),
                                              ("interval", 0.849)])
def test_krippendorff_alpha_on_his_example_and_against_the_package(metric, published):
    krippendorff = pytest.importorskip("krippendorff")
    ours = krippendorff_alpha(RELIABILITY, metric)
    assert round(ours, 3) == published
    ref = krippendorff.alpha(reliability_data=RELIABILITY, level_of_measurement=metric)
    assert ours == pytest.approx(ref, rel=1e-12)
    ratings = np.random.default_rng(0).integers(0, 3, size=(5, 40)).astype(float)
    ratings[np.random.default_rng(1).random(ratings.shape) < 0.3] = NAN
    assert krippendorff_alpha(ratings, metric) == pytest.approx(
        krippendorff.alpha(reliability_data=ratings, level_of_measurement=metric), rel=1e-10)


def test_the_power_line_gives_the_power_it_promises():
    """With the n answers_needed says, a one-sided z-test on simulated differences rejects
    in 80 % of studies (the shares' formula likewise, with binomial answers)."""
    rng = np.random.default_rng(0)
    n = int(answers_needed(0.3, 1.0))
    d = rng.normal(0.3, 1.0, size=(20_000, n))
    z = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    assert (z > stats.norm.ppf(0.95)).mean() == pytest.approx(0.8, abs=0.015)
    m = int(share_answers_needed(0.65))
    wins = rng.binomial(m, 0.65, size=20_000)
    z = (wins / m - 0.5) / math.sqrt(0.25 / m)
    assert (z > stats.norm.ppf(0.95)).mean() == pytest.approx(0.8, abs=0.03)
    assert answers_needed(0.0, 1.0) == math.inf
