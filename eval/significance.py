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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# group -> (R, C) summed statistics  ->  metric name -> (R,) values
MetricFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]

RESAMPLES = 1000
LEVEL = 0.95


def check_level(level: float) -> float:
    """The two-sided confidence level, refused outside (0, 1) (e.g. a percentage given as 95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    return level


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
    """Point difference (other - base) and its bootstrap interval."""

    diff: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | bool]:
        return {"diff": self.diff, "low": self.low, "high": self.high, "significant": self.significant}


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


def paired_bootstrap(
    base: UnitStats,
    other: UnitStats,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    names: Sequence[str] | None = None,
) -> dict[str, Interval]:
    """metric -> Interval of metric(other) - metric(base), for the metrics both configurations have."""
    if set(base.groups) != set(other.groups):
        raise ValueError(f"unpaired groups: {sorted(base.groups)} vs {sorted(other.groups)}")
    for g in base.groups:
        if tuple(base.keys[g]) != tuple(other.keys[g]):
            raise ValueError(f"group {g!r}: the two configurations answered different units")
    check_level(level)
    rng = np.random.default_rng(seed)
    sums_a: dict[str, np.ndarray] = {}
    sums_b: dict[str, np.ndarray] = {}
    for g in sorted(base.groups):  # fixed order: the same seed gives the same resamples
        counts = resample_counts(len(base.keys[g]), resamples, rng)  # (R, n)
        sums_a[g] = counts @ base.groups[g]  # (R, C)
        sums_b[g] = counts @ other.groups[g]
    boot_a, boot_b = base.metrics(sums_a), other.metrics(sums_b)
    point_a, point_b = base.point(), other.point()
    tail = 100 * (1 - level) / 2
    out = {}
    for name in names or [k for k in boot_a if k in boot_b]:
        d = boot_b[name] - boot_a[name]  # (R,)
        low, high = np.percentile(d, [tail, 100 - tail])
        out[name] = Interval(point_b[name] - point_a[name], float(low), float(high))
    return out
