"""Evaluation reports: JSON with full provenance, a Markdown table, PNG charts, written atomically.

docs/eval.md ("Running evaluations"): results are only comparable on the same image list, ground
truth, prompt, decoding and metric flavour, so every report carries model id and revision, dtype,
processor settings, prompt, decoding parameters, interventions with their parameters, seed, image
ids hash, question-file hash, metric flavour, package version, attention backend and the run
fingerprint (eval/fingerprint.py). Comparisons carry, per configuration after the first, the paired
bootstrap interval (95% by default) of each metric's difference to the first
(eval/significance.py): the Markdown marks significant differences with "*" and borderline ones
(0 within two Monte-Carlo errors of a bound) with "~", and lists the intervals with each bound's
Monte-Carlo error, the PNG draws them as error bars (baseline value + interval) on each configuration's
bar. Every file is written to a temporary file in the same folder, fsynced, made world-readable
(0644) and renamed over the target, so a reader never sees a half-written report.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lvlm_hallu.eval.significance import level_label

PACKAGE = "lvlm-hallu"
REPORT_MODE = 0o644


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown (not installed)"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """Everything needed to say whether two reports are comparable. Unknown fields stay None."""

    benchmark: str = "unknown"  # compare() fills it from the task
    model_id: str | None = None
    model_revision: str | None = None
    dtype: str | None = None
    processor: Mapping[str, Any] | None = None
    prompt: str | None = None
    decoding: Mapping[str, Any] | None = None
    seed: int | None = None
    image_ids_hash: str | None = None
    n_images: int | None = None
    question_file_hash: Mapping[str, str] | str | None = None
    ground_truth: str | None = None
    metric_flavour: str | None = None
    options: Mapping[str, Any] | None = None  # e.g. short_caption, answer parser
    attention_backend: str | None = None
    fingerprint: Mapping[str, Any] | None = None  # {"digest", "fields"} of eval/fingerprint.py
    package_version: str = field(default_factory=package_version)
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    extra: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ConfigResult:
    """One intervention configuration's metrics (x100 where papers print x100)."""

    name: str
    interventions: Any  # the spec as passed (string or list of {name, **params}), opaque here
    metrics: Mapping[str, float]
    details: Mapping[str, Any] | None = None  # e.g. resolved configs, per-split metrics, file paths
    counts: Mapping[str, int] | None = None  # shown, never charted: e.g. unparseable POPE answers
    # metric -> {"diff", "low", "high", "significant", "low_mc_error", "high_mc_error", "verdict"}:
    # this configuration minus the first one
    intervals: Mapping[str, Mapping[str, Any]] | None = None

    def significant(self, metric: str) -> bool:
        """The verdict is significant (beyond the bounds' Monte-Carlo error; older reports: excludes 0)."""
        return verdict((self.intervals or {}).get(metric, {})) == "significant"


@dataclass(frozen=True)
class Report:
    provenance: Provenance
    results: tuple[ConfigResult, ...]
    significance: Mapping[str, Any] | None = None  # baseline, method, level, resamples, seed, unit

    def to_dict(self) -> dict:
        out = {"provenance": asdict(self.provenance), "results": [asdict(r) for r in self.results]}
        if self.significance is not None:
            out["significance"] = dict(self.significance)
        return out


@dataclass(frozen=True)
class ReportPaths:
    json: Path
    markdown: Path
    png: Path | None


# ---------------------------------------------------------------------------------------------
# Writing


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temp file in the same folder + fsync + os.replace (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, REPORT_MODE)  # mkstemp creates 0600; reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _metric_names(results: Sequence[ConfigResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        names.extend(k for k in r.metrics if k not in names)
    return names


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def _count_names(results: Sequence[ConfigResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        names.extend(k for k in (r.counts or {}) if k not in names)
    return names


def verdict(iv: Mapping[str, Any]) -> str:
    """An interval's verdict; reports written before verdicts existed: whether it excludes 0."""
    if not iv:
        return ""
    return iv.get("verdict") or ("significant" if iv.get("significant") else "not significant")


MARKS = {"significant": " *", "borderline": " ~"}


def format_interval(iv: Mapping[str, Any]) -> str:
    """"+1.23 [+0.40, +2.05] * (MC ±0.03, ±0.05)": "*" significant, "~" borderline, then the
    bounds' Monte-Carlo standard errors where the interval has them."""
    text = f"{iv['diff']:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}]{MARKS.get(verdict(iv), '')}"
    if "low_mc_error" in iv:
        text += f" (MC ±{iv['low_mc_error']:.2f}, ±{iv['high_mc_error']:.2f})"
    return text


def markdown(report: Report) -> str:
    p = report.provenance
    names = _metric_names(report.results)
    counts = _count_names(report.results)
    lines = [f"# {p.benchmark} report", ""]
    lines.append("| configuration | " + " | ".join(names + counts) + " |")
    lines.append("|---|" + "---:|" * (len(names) + len(counts)))
    for r in report.results:
        cells = [_fmt(r.metrics.get(n, "")) + (" *" if r.significant(n) else "") for n in names]
        cells += [str((r.counts or {}).get(n, "")) for n in counts]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    sig = report.significance
    if sig and any(r.intervals for r in report.results):
        lines += [
            "",
            f"\\* the {level_label(sig['level'])} interval of the difference to **{sig['baseline']}** excludes 0 "
            f"({sig['method']}, per {sig['unit']}, {sig['resamples']} resamples, seed {sig['seed']}).",
            *([f"~ borderline: 0 lies within {sig['borderline_z']:g} Monte-Carlo standard errors (MC, after each "
               "interval) of a bound; another seed may decide otherwise, more resamples (--resamples) decide."]
              if "borderline_z" in sig else []),
            "",
            f"## Differences to {sig['baseline']} ({level_label(sig['level'])} interval)",
            "",
            "| configuration | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for r in report.results[1:]:
            iv = r.intervals or {}
            lines.append(f"| {r.name} | " + " | ".join(format_interval(iv[n]) if n in iv else "" for n in names) + " |")
    lines += ["", "## Provenance", ""]
    for key, value in asdict(p).items():
        if value is not None:
            shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
            lines.append(f"- **{key}**: `{shown}`" if "\n" not in shown else f"- **{key}**: {json.dumps(shown)}")
    return "\n".join(lines) + "\n"


def error_bars(results: Sequence[ConfigResult], metric: str) -> tuple[list[float], list[float]]:
    """(below, above) bar lengths: the baseline value plus the difference interval, around each value.

    A configuration's bar shows its value v = base + diff; its error bar spans base + [low, high],
    the interval of its difference to the baseline (95% by default), so a bar whose error bar does
    not reach the baseline's value differs significantly. The baseline and configurations without
    an interval get no bar (0, 0).
    """
    below, above = [], []
    base = float(results[0].metrics.get(metric, float("nan"))) if results else float("nan")
    for r in results:
        iv = (r.intervals or {}).get(metric)
        if iv is None or metric not in r.metrics:
            below.append(0.0)
            above.append(0.0)
            continue
        v = float(r.metrics[metric])
        below.append(max(0.0, v - (base + iv["low"])))
        above.append(max(0.0, base + iv["high"] - v))
    return below, above


def chart_png(report: Report) -> bytes:
    """One bar panel per metric, one bar per configuration (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless; never pick up a GUI backend in a worker
    import matplotlib.pyplot as plt

    names = _metric_names(report.results) or ["(no metrics)"]
    configs = [r.name for r in report.results]
    ncols = min(4, len(names))  # wrap POPE's many panels into rows
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, names):
        values = [float(r.metrics.get(metric, float("nan"))) for r in report.results]
        low, high = error_bars(report.results, metric)
        bars = ax.bar(
            range(len(configs)),
            values,
            color=[colors[i % len(colors)] for i in range(len(configs))],
            yerr=[low, high],
            capsize=3,
            error_kw={"elinewidth": 1},
        )
        small = all(abs(v) < 10 for v in values if v == v)  # per-caption counts: 0.85 vs 0.80, not 0.8 twice
        ax.bar_label(bars, fmt="%.2f" if small else "%.1f", fontsize=7)
        tops = [v + h for v, h in zip(values, high) if v == v]
        ax.set_ylim(0, max([1.0, *tops]) * 1.15)  # all-zero panels keep a sensible axis
        ax.set_title(metric)
        ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"{report.provenance.benchmark}: {report.provenance.model_id or ''}")
    sig = report.significance
    if sig and any(r.intervals for r in report.results):
        fig.text(0.5, 0.005, f"error bars: {sig['baseline']} + {level_label(sig['level'])} paired bootstrap interval "
                 f"of the difference (per {sig['unit']}, {sig['resamples']} resamples)", ha="center", fontsize=7)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
    else:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(report: Report, out_dir: str | Path, stem: str | None = None, *, charts: bool = True) -> ReportPaths:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    stem = stem or f"{report.provenance.benchmark}_report"
    json_path = atomic_write_text(out_dir / f"{stem}.json", json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    md_path = atomic_write_text(out_dir / f"{stem}.md", markdown(report))
    png_path = atomic_write_bytes(out_dir / f"{stem}.png", chart_png(report)) if charts and report.results else None
    return ReportPaths(json_path, md_path, png_path)
