"""The pictures of an inspection, as matplotlib figures with the numbers they draw.

Each builder takes an `Inspection` and returns a `Picture` (figure + data) or None when the
picture does not apply (no such intervention). The data is exactly what is drawn, so tests can
check it against independently computed quantities:

- heatmaps: per chosen layer, the last prompt row's head-mean attention on each image patch,
  without and with the interventions (PAI's boosted weights; arXiv 2407.21771 Fig. 1 style);
  the patches of a layer plus its "other" image tokens (CLS, NeXT newlines) sum to that layer's
  visual attention mass;
- mass: the visual attention mass per layer of both runs, with VTE's exit layer
  (arXiv 2411.19628) and the dynamic policy's threshold;
- sinks: VAR's visual sink tokens (arXiv 2503.03321) marked on the image, one row per range of
  consecutive layers that share a sink set;
- vhd: layers x heads map of VHR's head divergence (arXiv 2412.13949), target layers only, with
  the selected (reinforced) heads outlined;
- carve: CARVE's fused contrast map S, the top-p mask, the connected regions (kept ones
  coloured) and the refined image (arXiv 2509.06461).

Figures are built with `matplotlib.figure.Figure` (no pyplot state, no GUI backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lvlm_hallu.lvlm.inspection.grids import Panel
from lvlm_hallu.lvlm.inspection.trace import Inspection, Trace

CMAP = "inferno"


@dataclass
class Picture:
    name: str
    title: str
    figure: Figure
    data: dict[str, Any]


def _show(ax, panel: Panel, values: np.ndarray | None, *, vmax: float | None = None, alpha: float = 0.6):
    """The panel's picture in patch coordinates, with an optional per-patch heat map on top."""
    rows, cols = panel.shape
    ax.imshow(panel.picture, extent=(0, cols, rows, 0), interpolation="bilinear")
    im = None
    if values is not None:
        im = ax.imshow(values, extent=(0, cols, rows, 0), cmap=CMAP, alpha=alpha, vmin=0.0,
                       vmax=vmax if vmax and vmax > 0 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def heatmaps(insp: Inspection) -> Picture | None:
    runs = (("before", insp.baseline), ("after", insp.intervened))
    panels = max(len(insp.baseline.grid.panels), len(insp.intervened.grid.panels))
    if panels == 0:  # a text-only prompt
        return None
    fig = Figure(figsize=(2.2 * 2 * panels, 2.2 * len(insp.layers) + 0.4), layout="constrained")
    axes = fig.subplots(len(insp.layers), 2 * panels, squeeze=False)
    data: dict[str, Any] = {"layers": list(insp.layers)}
    for label, run in runs:
        data[label] = {}
        data[f"{label}_other"] = {}
        data[f"{label}_mass"] = {}
    for i, layer in enumerate(insp.layers):
        maps = {label: run.heat(layer) for label, run in runs}
        vmax = max((float(m.max()) for ms in maps.values() if ms for m in ms), default=0.0)
        bar = None  # one colour scale per layer, shared by both runs
        for j, (label, run) in enumerate(runs):
            ms = maps[label]
            data[label][layer] = [m.tolist() for m in ms] if ms else None
            attention = run.attention.get(layer, np.zeros(0))
            other = run.grid.other
            data[f"{label}_other"][layer] = float(attention[other].sum()) if ms else 0.0
            data[f"{label}_mass"][layer] = float(attention.sum())
            for p in range(panels):
                ax = axes[i, j * panels + p]
                if p >= len(run.grid.panels):
                    ax.axis("off")
                    continue
                panel = run.grid.panels[p]
                im = _show(ax, panel, ms[p] if ms else None, vmax=vmax)
                bar = im if im is not None else bar
                total = data[f"{label}_mass"][layer]
                note = "image tokens gone" if not ms else (
                    f"mass {total:.3f}" if len(ms) == 1 else f"{ms[p].sum():.3f} of mass {total:.3f}")
                ax.set_title(f"L{layer} {label} · {panel.name}\n{note}", fontsize=7)
        if bar is not None:
            fig.colorbar(bar, ax=axes[i, :].tolist(), shrink=0.8, label="attention")
    fig.suptitle("last prompt row, head-mean attention on image patches", fontsize=9)
    return Picture("heatmaps", "Attention on the image before and after the interventions", fig, data)


def mass(insp: Inspection) -> Picture:
    L = insp.num_layers
    base, after = insp.baseline.visual_mass(L), insp.intervened.visual_mass(L)
    vte = insp.intervened.report.get("vte") or {}
    exit_layer = vte.get("exit_layer")
    threshold = None
    fig = Figure(figsize=(5.0, 2.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(L)
    ax.plot(x, base, "o-", label="without", color="tab:blue")
    ax.plot(x, after, "s--", label=f"with {insp.interventions}", color="tab:orange")
    if exit_layer is not None:
        ax.axvline(exit_layer + 0.5, color="tab:red", lw=1, ls=":")
        ax.text(exit_layer + 0.55, ax.get_ylim()[1] * 0.95, f"VTE exit after layer {exit_layer}", color="tab:red",
                fontsize=7, va="top")
    if vte.get("policy") == "dynamic":
        threshold = next(c.threshold for c in insp.configs if c.name == "vte")
        ax.axhline(threshold, color="gray", lw=0.8, ls="--", label=f"threshold {threshold}")
    ax.set_xlabel("layer")
    ax.set_ylabel("visual attention mass")
    ax.set_xticks(x)
    ax.legend(fontsize=7)
    data = {"baseline": base.tolist(), "intervened": after.tolist(), "exit_layer": exit_layer, "threshold": threshold}
    return Picture("mass", "Visual attention mass per layer", fig, data)


def sink_ranges(run: Trace, layers: list[int]) -> list[tuple[int, int, np.ndarray]]:
    """(first layer, last layer, (n_image_tokens,) bool) for runs of consecutive `layers` with one
    sink set (layers whose image tokens left, after a VTE exit, are skipped)."""
    out: list[tuple[int, int, np.ndarray]] = []
    for layer in sorted(layers):
        s = run.sinks.get(layer)
        if s is None or s.size != run.grid.n_tokens or s.size == 0:
            continue
        if out and out[-1][1] == layer - 1 and np.array_equal(out[-1][2], s):
            out[-1] = (out[-1][0], layer, s)
        else:
            out.append((layer, layer, s))
    return out


def sinks(insp: Inspection) -> Picture | None:
    var = insp.intervened.report.get("var")
    if var is None:
        return None
    run = insp.intervened
    counted = sorted(int(l) for l in var.get("sinks", {}))  # the layers VAR tested
    ranges = sink_ranges(run, counted)
    if not any(marks.any() for _, _, marks in ranges):
        ranges = []
    panels = run.grid.panels
    rows = max(len(ranges), 1)
    fig = Figure(figsize=(3.0 * max(len(panels), 1), 3.0 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, max(len(panels), 1), squeeze=False)
    for i in range(rows):
        for p, panel in enumerate(panels):
            ax = axes[i, p]
            _show(ax, panel, None)
            if not ranges:
                ax.set_title(f"{panel.name}: no visual sinks\n(tau {var.get('tau')}, dims {var.get('sink_dims')})", fontsize=7)
                continue
            lo, hi, marks = ranges[i]
            for r, c in zip(*np.nonzero(marks[panel.tokens])):
                ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="red", lw=1.5))
            span = f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"
            ax.set_title(f"{span} · {panel.name}\n{int(marks[panel.tokens].sum())} sink patches", fontsize=7)
    fig.suptitle("VAR visual sink tokens", fontsize=9)
    data = {
        "per_layer": {l: np.flatnonzero(run.sinks[l]).tolist() for l in counted if l in run.sinks},
        "ranges": [{"layers": [lo, hi], "tokens": np.flatnonzero(s).tolist()} for lo, hi, s in ranges],
        "text_sinks": {l: run.text_sinks[l] for l in counted if l in run.text_sinks},
    }
    return Picture("sinks", "Visual sink tokens (VAR)", fig, data)


def vhd(insp: Inspection) -> Picture | None:
    if "vhr" not in insp.intervened.report:
        return None
    L, H = insp.num_layers, insp.num_heads
    matrix = np.full((L, H), np.nan)
    for layer, values in insp.vhd.items():
        matrix[layer] = values
    selected = insp.vhr_selected()
    fig = Figure(figsize=(max(3.6, 1.6 + 0.3 * H), max(2.6, 1.0 + 0.25 * L)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_facecolor("#dddddd")
    for layer, heads in selected.items():
        for h in heads:
            ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer (* = target)")
    ax.set_yticks(range(L), [f"{l}*" if l in insp.vhr_targets else str(l) for l in range(L)], fontsize=7)
    ax.set_xticks(range(H), [str(h) for h in range(H)], fontsize=7)
    fig.colorbar(im, ax=ax, label="VHD")
    ax.set_title("VHR divergence; reinforced heads outlined", fontsize=8)
    data = {"matrix": [[None if np.isnan(v) else float(v) for v in row] for row in matrix],
            "outlined": {l: list(h) for l, h in selected.items()}, "targets": list(insp.vhr_targets)}
    return Picture("vhd", "Vision-aware head divergence (VHR)", fig, data)


def carve(insp: Inspection) -> Picture | None:
    c = insp.carve
    if c is None:
        return None
    score, regions, kept = c["score"], c["regions"], np.asarray(c["kept"])
    mask = regions > 0
    keep = np.isin(regions, kept)
    # kept regions in distinct colours, dropped regions grey, background white
    palette = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)])
    shown = np.full(regions.shape + (3,), 255, dtype=np.uint8)
    shown[mask & ~keep] = 170
    for n, label in enumerate(kept):
        shown[regions == label] = palette[n % len(palette)]
    fig = Figure(figsize=(11.0, 2.6), layout="constrained")
    axes = fig.subplots(1, 5)
    axes[0].imshow(c["image"])
    box = insp.intervened.report.get("carve", {}).get("box")
    if box:
        axes[0].add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, edgecolor="red", lw=1.5))
    axes[0].set_title("image and crop box", fontsize=8)
    im = axes[1].imshow(score, cmap=CMAP)
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    axes[1].set_title("contrast S = sum w_t A^Q/(A^G+lam)", fontsize=8)
    axes[2].imshow(mask, cmap="gray")
    axes[2].set_title(f"top {mask.mean():.0%} of pixels", fontsize=8)
    axes[3].imshow(shown, interpolation="nearest")
    axes[3].set_title(f"regions: {len(kept)} of {int(regions.max())} kept", fontsize=8)
    axes[4].imshow(c["refined"])
    axes[4].set_title("refined image", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    keep_rows, keep_cols = np.nonzero(keep)
    data = {
        "regions": int(regions.max()), "kept": kept.tolist(), "mask_fraction": float(keep.mean()),
        "box": [int(keep_cols.min()), int(keep_rows.min()), int(keep_cols.max()) + 1, int(keep_rows.max()) + 1] if keep.any() else None,
        "score_shape": list(score.shape),
    }
    return Picture("carve", "Contrastive attention refinement (CARVE)", fig, data)


# name -> builder, in page order
PICTURES: dict[str, Callable[[Inspection], Picture | None]] = {
    "heatmaps": heatmaps,
    "mass": mass,
    "sinks": sinks,
    "vhd": vhd,
    "carve": carve,
}


def pictures(insp: Inspection) -> list[Picture]:
    """Every picture that applies to the inspection."""
    return [p for p in (build(insp) for build in PICTURES.values()) if p is not None]
