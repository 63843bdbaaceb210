"""Paired bootstrap confidence intervals for the difference of a metric between two configurations.

Two configurations answered the same units (images, for CHAIR and for POPE). The paired
bootstrap (Efron & Tibshirani 1993; Koehn 2004 for the paired form used in MT evaluation) draws R
resamples of the units with replacement (seeded), recomputes every metric of BOTH configurations
on the same resample, and takes the percentiles of the differences:

    d_r = metric(other, resample r) - metric(base, resample r),   r = 1..R
    95% interval = [percentile_2.5(d), percentile_97.5(d)]; significant when it excludes 0.

Metrics are recomputed from resampled sums of per-unit statistics (CHAIR_i = Σ hallucinated
mentions / Σ mentions, Precision = Σ TP / Σ (TP + FP) ...), exactly as the scorers compute them on
the whole set, never as means of per-unit ratios. A POPE image's statistics are its questions'
sums in every split, side by side, so one resample draws the same images in all three splits (they
share each image's positive questions) and keeps an image's six questions together. Units in several
groups are resampled within each group. A configuration against itself gives d_r = 0 for every r, so the
interval is exactly [0, 0].

How many resamples a level needs. A bound of a level-L interval is the resample with (1 - L)/2 of
the R differences beyond it; it is only an estimate when enough resamples lie out there. The rule:

    refused unless R (1 - L) / 2 >= MIN_TAIL (10) resamples lie beyond each bound
    (95%: R >= 400; 98.75%: R >= 1,600; 99.9%: R >= 20,000),

and the default R is max(1,000, 2 * TAIL / (1 - L)) with TAIL = 25 beyond each bound (95%: 1,000;
98.75%: 4,000; 99.9%: 50,000), so a higher level without --resamples gets enough resamples.

Monte-Carlo error of a bound. Each bound is an order statistic of R draws: the number of resamples
below the true q-quantile is Binomial(R, q), with standard deviation k = sqrt(R q (1 - q)). The
bound's Monte-Carlo standard error is half the distance between the percentiles q - k/R and q + k/R
of the resampled differences. The verdict accounts for it (z = 2 standard errors):

    significant      the interval excludes 0 by more than 2 errors of the bound nearest 0,
    not significant  0 lies inside the interval by at least 2 errors of each bound,
    borderline       otherwise: another bootstrap seed may give the other answer; more resamples decide.

`Interval.significant` keeps its meaning (the interval excludes 0); `verdict` adds the above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# group -> (R, C) summed statistics  ->  metric name -> (R,) values
MetricFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]

RESAMPLES = 1000  # the default at 95% and below; higher levels get more (default_resamples)
LEVEL = 0.95
MIN_TAIL = 10  # resamples that must lie beyond each bound, or the level is refused
TAIL = 25  # resamples beyond each bound that the default number of resamples gives
BORDERLINE_Z = 2.0  # a verdict within this many Monte-Carlo standard errors of 0 is borderline
CHUNK_CELLS = 1 << 25  # resample-by-unit counts built at once (256 MiB of float64)


def check_level(level: float) -> float:
    """The two-sided confidence level, refused outside (0, 1) (e.g. a percentage given as 95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    return level


def _per_tail(resamples: int, level: float) -> float:
    return resamples * (1.0 - level) / 2.0


def min_resamples(level: float) -> int:
    """The fewest resamples that put MIN_TAIL beyond each bound of a `level` interval."""
    return math.ceil(2 * MIN_TAIL / (1.0 - check_level(level)) - 1e-9)


def default_resamples(level: float) -> int:
    """RESAMPLES, or more at high levels: TAIL resamples beyond each bound (99.9% -> 50,000)."""
    return max(RESAMPLES, math.ceil(2 * TAIL / (1.0 - check_level(level)) - 1e-9))


def check_resamples(resamples: int | None, level: float) -> int:
    """The resamples to use at `level`: the default for None; refused when fewer than MIN_TAIL
    would lie beyond each bound (ValueError naming the minimum)."""
    check_level(level)
    if resamples is None:
        return default_resamples(level)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if _per_tail(resamples, level) < MIN_TAIL - 1e-9:
        raise ValueError(
            f"{resamples} resamples leave {_per_tail(resamples, level):.3g} beyond each bound of a "
            f"{level_label(level)} interval; at least {MIN_TAIL} per tail are needed: use "
            f"{min_resamples(level)} or more (without --resamples: {default_resamples(level)} at this level)"
        )
    return resamples


def level_label(level: float) -> str:
    """0.95 -> '95%', 0.9875 -> '98.75%' (a Bonferroni level for four comparisons)."""
    return f"{100 * level:.4g}%"


@dataclass(frozen=True, eq=False)
class UnitStats:
    """Additive per-unit statistics of one configuration, by group, and how metrics follow from sums."""

    columns: tuple[str, ...]
    groups: Mapping[str, np.ndarray]  # group -> (n_units, len(columns))
    keys: Mapping[str, tuple[str, ...]]  # group -> unit keys, same order as the rows (pairing check)
    metrics: MetricFn

    def point(self) -> dict[str, float]:
        """The metrics on the whole set (one resample with every unit once)."""
        sums = {g: rows.sum(axis=0, keepdims=True) for g, rows in self.groups.items()}  # (1, C)
        return {k: float(v[0]) for k, v in self.metrics(sums).items()}


@dataclass(frozen=True)
class Interval:
    """Point difference (other - base), its bootstrap interval and each bound's Monte-Carlo error."""

    diff: float
    low: float
    high: float
    low_error: float = 0.0  # Monte-Carlo standard error of `low` (module docstring)
    high_error: float = 0.0

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (whatever the Monte-Carlo error; see `verdict`)."""
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str:
        """"significant", "not significant" or "borderline" (0 within BORDERLINE_Z errors of a bound)."""
        z = BORDERLINE_Z
        if self.low - z * self.low_error > 0 or self.high + z * self.high_error < 0:
            return "significant"
        if self.low + z * self.low_error <= 0 <= self.high - z * self.high_error:
            return "not significant"
        return "borderline"

    def to_dict(self) -> dict[str, float | bool | str]:
        return {"diff": self.diff, "low": self.low, "high": self.high, "significant": self.significant,
                "low_mc_error": self.low_error, "high_mc_error": self.high_error, "verdict": self.verdict}


def ratio(num: np.ndarray, den: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """scale * num / den elementwise, 0 where den == 0 (the scorers' zero-denominator rule)."""
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(scale * num, den, out=out, where=den != 0)
    return out


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(R, n) multiplicities of each unit in R bootstrap resamples of n units."""
    if n == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def bound_error(d: np.ndarray, q: float) -> float:
    """Monte-Carlo standard error of the q-quantile of the R draws `d` (order-statistic rule)."""
    r = len(d)
    k = math.sqrt(r * q * (1 - q)) / r
    lo, hi = np.percentile(d, [100 * max(0.0, q - k), 100 * min(1.0, q + k)])
    return float(hi - lo) / 2


def _resampled_sums(stats: Sequence[UnitStats], group: str, resamples: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """(R, C) resampled sums of `group` for each configuration, drawn in chunks of rows (the same
    draws as one call: the generator fills the rows in order) so R x n counts never sit in memory."""
    n = len(stats[0].keys[group])
    step = max(1, CHUNK_CELLS // max(n, 1))
    parts: list[list[np.ndarray]] = [[] for _ in stats]
    for start in range(0, resamples, step):
        counts = resample_counts(n, min(step, resamples - start), rng)  # (r, n)
        for part, st in zip(parts, stats, strict=True):
            part.append(counts @ st.groups[group])  # (r, C)
    return [np.concatenate(p) for p in parts]


def paired_bootstrap(
    base: UnitStats,
    other: UnitStats,
    *,
    resamples: int | None = None,
    seed: int = 0,
    level: float = LEVEL,
    names: Sequence[str] | None = None,
) -> dict[str, Interval]:
    """metric -> Interval of metric(other) - metric(base), for the metrics both configurations have.

    `resamples` defaults to `default_resamples(level)`; too few for the level are refused
    (`check_resamples`).
    """
    if set(base.groups) != set(other.groups):
        raise ValueError(f"unpaired groups: {sorted(base.groups)} vs {sorted(other.groups)}")
    for g in base.groups:
        if tuple(base.keys[g]) != tuple(other.keys[g]):
            raise ValueError(f"group {g!r}: the two configurations answered different units")
    resamples = check_resamples(resamples, level)
    rng = np.random.default_rng(seed)
    sums_a: dict[str, np.ndarray] = {}
    sums_b: dict[str, np.ndarray] = {}
    for g in sorted(base.groups):  # fixed order: the same seed gives the same resamples
        sums_a[g], sums_b[g] = _resampled_sums((base, other), g, resamples, rng)
    boot_a, boot_b = base.metrics(sums_a), other.metrics(sums_b)
    point_a, point_b = base.point(), other.point()
    q = (1 - level) / 2
    out = {}
    for name in names or [k for k in boot_a if k in boot_b]:
        d = boot_b[name] - boot_a[name]  # (R,)
        low, high = np.percentile(d, [100 * q, 100 * (1 - q)])
        out[name] = Interval(point_b[name] - point_a[name], float(low), float(high),
                             bound_error(d, q), bound_error(d, 1 - q))
    return out
