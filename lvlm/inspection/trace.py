"""Collect what the engine computes for one request, run without and with its interventions.

Nothing here computes attention a second time. A `Tracer` component joins the request's batch
plan and asks every layer's attention call at prefill for the kernels' READOUT: the head-mean
post-softmax weights of the last query row (the last prompt position) over all keys, after
PAI's logit boost and before VAR's sink redistribution (kernels/edits.py). The same component
reads the layer's key classes, where VAR marked its sink set. VHR reports its per-head divergence
when asked (`report_vhd`) next to its selected heads; CARVE hands its contrast map,
regions and refined image over through `refine_requests(collect=)`. Each run's patch grid comes
from the model family (grids.py).

The read-out routes every layer of the traced prefill through the edited-attention path (the
Triton kernel on CUDA, the PyTorch reference elsewhere); the answers are those of these runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lvlm_hallu.interventions.plan import BatchPlan, Component, build_plan
from lvlm_hallu.kernels.edits import KEY_SINK, KEY_VISUAL
from lvlm_hallu.lvlm.inspection.grids import PatchGrid, patch_grid
from lvlm_hallu.lvlm.types import Request


class Tracer(Component):
    """Keeps, per layer at prefill, the read-out over image tokens and the sink set of request 0."""

    name = "inspect"
    per_request_fields = ()  # keyed by layer, not by request: nothing to renumber or drop

    def __init__(self):
        self.attention: dict[int, np.ndarray] = {}  # layer -> (n_image_tokens,) fp32, empty after an exit
        self.sinks: dict[int, np.ndarray] = {}  # layer -> (n_image_tokens,) bool, visual sinks
        self.text_sinks: dict[int, list[int]] = {}  # layer -> key positions of text sinks
        self.keys: dict[int, int] = {}  # layer -> number of keys of request 0's row

    def contribute(self, plan, layer, state, fields):
        if state.phase == "prefill":
            fields["readout"] = True

    def after_attention(self, plan, layer, state, out, readout):
        if state.phase != "prefill" or readout is None:
            return out
        b = plan.main_row(0)
        cls = plan.key_class(layer, state)[b].cpu()  # (Tk,) uint8
        start = int(state.cache.start[layer][b])
        visual = (cls & KEY_VISUAL) != 0
        sink = (cls & KEY_SINK) != 0
        self.attention[layer] = readout[b].float().cpu()[visual].numpy()
        self.sinks[layer] = sink[visual].numpy()
        self.text_sinks[layer] = [int(j) - start for j in (sink & ~visual).nonzero().flatten()]
        self.keys[layer] = int(cls.shape[0]) - start
        return out


@dataclass
class Trace:
    """One run of the request: its answer, report, patch grid and per-layer read-outs."""

    text: str
    token_ids: list[int]
    tokens: list[str]
    report: dict[str, Any]
    grid: PatchGrid
    attention: dict[int, np.ndarray]  # layer -> (n_image_tokens,) or (0,) after a token exit
    sinks: dict[int, np.ndarray]
    text_sinks: dict[int, list[int]]

    def visual_mass(self, num_layers: int) -> np.ndarray:
        """(L,) the last prompt row's head-mean attention on image tokens, per layer."""
        return np.array([float(self.attention[l].sum()) if l in self.attention else 0.0 for l in range(num_layers)])

    def heat(self, layer: int) -> list[np.ndarray] | None:
        """Per panel (rows, cols) attention of `layer`, or None when the image left the layer."""
        a = self.attention.get(layer)
        if a is None or a.size != self.grid.n_tokens:
            return None
        return self.grid.maps(a)


@dataclass
class Inspection:
    """Everything the pictures show, for one request, with and without its interventions."""

    model: str
    family: str
    prompt: str
    interventions: str  # the spec as given
    configs: tuple[Any, ...]  # the resolved intervention configs
    num_layers: int
    num_heads: int
    layers: tuple[int, ...]  # layers of the heat maps
    baseline: Trace
    intervened: Trace
    vhd: dict[int, list[float]] = field(default_factory=dict)  # VHR: layer -> per-head divergence
    vhr_targets: list[int] = field(default_factory=list)
    carve: dict[str, Any] | None = None  # score (H, W), regions (H, W), kept, refined, image

    def token_changes(self) -> list[dict[str, Any]]:
        """Opcodes of the answer tokens: equal / replace / delete / insert spans of both runs."""
        a, b = self.baseline.token_ids, self.intervened.token_ids
        out = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
            out.append({"op": tag, "baseline": self.baseline.tokens[i1:i2], "intervened": self.intervened.tokens[j1:j2]})
        return out

    def vhr_selected(self) -> dict[int, list[int]]:
        """VHR's selected heads per layer, as the intervention report states them."""
        heads = self.intervened.report.get("vhr", {}).get("heads", {})
        return {int(l): list(h) for l, h in heads.items()}


def default_layers(num_layers: int, n: int = 4) -> tuple[int, ...]:
    """Up to n layers spread from layer 1 to the last (layer 0 sees no edits)."""
    lo = min(1, num_layers - 1)
    return tuple(sorted({int(round(x)) for x in np.linspace(lo, num_layers - 1, n)}))


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds to the answer (prefix decodes, so that word-start markers such as
    SentencePiece's '▁' become the spaces they stand for); the pieces join to the full decode."""
    pieces, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        pieces.append(text[len(before):] if text.startswith(before) else text)
        before = text
    return pieces


def trace(pipe: Any, request: Request) -> Trace:
    """Generate `request` (CARVE already applied) with a Tracer in its plan."""
    tracer = Tracer()

    def factory(facts, requests):
        if any(r.interventions for r in requests):
            plan = build_plan(facts, requests, profile=pipe.profile())
        else:
            plan = BatchPlan(facts, requests)
        plan.components.append(tracer)
        return plan

    grid = patch_grid(pipe, pipe.prepare([request]))
    (result,) = pipe.generate([request], plan_factory=factory)
    tokens = token_pieces(pipe.tokenizer, result.token_ids)
    return Trace(result.text, list(result.token_ids), tokens, dict(result.report), grid,
                 tracer.attention, tracer.sinks, tracer.text_sinks)


def collect(pipe: Any, request: Request, spec: str, *, layers: tuple[int, ...] | None = None) -> Inspection:
    """Run `request` without interventions, then with them, and gather the data of the pictures."""
    from lvlm_hallu.interventions.carve import refine_requests

    num_layers = pipe.facts.num_layers
    layers = tuple(layers) if layers else default_layers(num_layers)
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"layers {bad} outside the model's 0..{num_layers - 1}")
    baseline = trace(pipe, replace(request, interventions=()))
    asked = tuple(replace(c, report_vhd=True) if c.name == "vhr" else c for c in request.interventions)
    carve: dict[int, dict] = {}
    (refined,), (pre,) = refine_requests(pipe, [replace(request, interventions=asked)], collect=carve)
    intervened = trace(pipe, refined)
    added = intervened.report.get("added_ms", 0.0) + pre.get("added_ms", 0.0)
    intervened.report = {**intervened.report, **pre}
    if added:
        intervened.report["added_ms"] = added
    vhr = intervened.report.get("vhr", {})
    return Inspection(
        model=pipe.model_id, family=pipe.adapter.family, prompt=request.prompt, interventions=spec,
        configs=tuple(request.interventions), num_layers=num_layers, num_heads=pipe.facts.num_heads,
        layers=layers, baseline=baseline, intervened=intervened,
        vhd={int(l): list(v) for l, v in vhr.get("vhd", {}).items()},
        vhr_targets=[int(l) for l in vhr.get("layers", [])],
        carve=carve.get(0),
    )
