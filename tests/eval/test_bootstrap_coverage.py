"""What the paired bootstrap interval means (issue 40, item 3): its coverage on simulated data.

Paired data with a known difference: n units, each with a base value a_i ~ N(0, 1) and another
configuration's value b_i = a_i + DELTA + N(0, 1). The metric is the mean over units, computed as
the scorers do (a sum of values over a sum of counts), so the true difference of the metric is DELTA.
Over SIMS simulated data sets the interval must contain DELTA about `level` of the time.

Tolerance. With n = 40 the percentile interval of a mean covers a little less than its level
(it uses the 1/n variance and normal instead of t quantiles: about 94% at 95%, 98.2% at 98.75%),
and the coverage over SIMS data sets has a binomial standard error sqrt(L (1 - L) / SIMS). The test
accepts level - UNDER <= coverage <= level + OVER, with UNDER = that known small-sample shortfall
plus about two binomial standard errors. A 90% interval labelled 95% (the percentile tail not halved)
covers about 89% and fails; so does a 97.5% interval labelled 98.75%.

A naive reference (index resampling with numpy, written here) must give the same bounds up to
Monte-Carlo error: the mean signed difference of each bound, in units of the bootstrap standard
error, is within 0.06 of zero (one bound's Monte-Carlo error is about 0.13 standard errors at 400
resamples, so the mean over the data sets is within a few hundredths; a tail not halved moves every
bound by about 0.3 standard errors).
"""

from __future__ import annotations

import numpy as np
import pytest

from lvlm_hallu.eval.significance import UnitStats, min_resamples, paired_bootstrap

DELTA = 0.3
N_UNITS = 40


def _mean(sums):
    g = sums["units"]
    return {"mean": g[:, 0] / g[:, 1]}


def _stats(values: np.ndarray) -> UnitStats:
    keys = {"units": tuple(str(i) for i in range(len(values)))}
    return UnitStats(("value", "count"), {"units": np.c_[values, np.ones(len(values))]}, keys, _mean)


def _naive(a: np.ndarray, b: np.ndarray, resamples: int, level: float, rng) -> tuple[float, float]:
    """Textbook paired percentile bootstrap: resample unit indices, difference of the two means."""
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    d = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(d, [tail, 100 - tail])
    return float(low), float(high)


@pytest.mark.parametrize(("level", "sims", "under", "over"), [
    (0.95, 1000, 0.03, 0.015),      # expected about 0.94; binomial SE 0.007
    (0.9875, 600, 0.0125, 0.0125),  # Bonferroni for 4 comparisons: expected about 0.982; SE 0.0045
])
def test_interval_covers_the_true_difference_at_its_level_and_agrees_with_a_naive_bootstrap(
        level, sims, under, over):
    resamples = min_resamples(level)  # the fewest the module accepts: the hardest case, and fast
    data = np.random.default_rng(12345)
    naive_rng = np.random.default_rng(777)
    covered = naive_covered = 0
    low_shift, high_shift = [], []
    for s in range(sims):
        a = data.normal(0.0, 1.0, N_UNITS)
        b = a + DELTA + data.normal(0.0, 1.0, N_UNITS)
        iv = paired_bootstrap(_stats(a), _stats(b), resamples=resamples, seed=s, level=level)["mean"]
        assert iv.diff == pytest.approx(b.mean() - a.mean())
        covered += iv.low <= DELTA <= iv.high
        low, high = _naive(a, b, resamples, level, naive_rng)
        naive_covered += low <= DELTA <= high
        se = (b - a).std() / np.sqrt(N_UNITS)  # the bootstrap's standard error of the difference
        low_shift.append((iv.low - low) / se)
        high_shift.append((iv.high - high) / se)
    coverage, naive_coverage = covered / sims, naive_covered / sims
    assert level - under <= coverage <= level + over, (coverage, level)
    assert level - under <= naive_coverage <= level + over, (naive_coverage, level)
    assert abs(np.mean(low_shift)) < 0.06 and abs(np.mean(high_shift)) < 0.06, (
        np.mean(low_shift), np.mean(high_shift))


def test_interval_half_width_is_the_normal_quantile_times_the_standard_error():
    """On one large data set the bootstrap distribution is nearly normal: the 95% interval spans
    +-1.96 standard errors (a 90% interval would span +-1.64) around the point difference."""
    data = np.random.default_rng(5)
    a = data.normal(0.0, 1.0, 2000)
    b = a + DELTA + data.normal(0.0, 1.0, 2000)
    iv = paired_bootstrap(_stats(a), _stats(b), resamples=4000, seed=1)["mean"]
    se = (b - a).std() / np.sqrt(len(a))
    assert (iv.high - iv.low) / 2 / se == pytest.approx(1.96, abs=0.06)
    assert (iv.low + iv.high) / 2 == pytest.approx(iv.diff, abs=0.1 * se)
