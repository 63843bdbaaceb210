"""The per-batch plan: every row's interventions turned into per-row tensors and layer hooks.

The engine consults one `BatchPlan` per batch (never global state). The batch holds the requests
in order, followed by "twin" rows: the same prompt with the image removed, for methods that need
an image-removed branch (VHR's head divergence at prefill, PAI's logit contrast at every step).
The plan tracks, for the current batch layout, which request each row serves (`rows`) and
whether it is a twin; components keep their per-request state keyed by request, and build
per-row tensors for the current layout when asked, with neutral values for rows that did not
ask for them. A mixed batch therefore gives each row exactly what it would get alone.

Model facts reach this package as data (`facts`: layer and head counts, image token id), never
as an import of `lvlm/`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import torch

from kernels.edits import KEY_VISUAL, AttentionEdits


class Component:
    """One method's hooks inside a batch plan; every default is neutral."""

    name = ""

    def before_layer(self, plan: "BatchPlan", engine, layer: int, state) -> None:
        pass

    def contribute(self, plan: "BatchPlan", layer: int, state, fields: dict) -> None:
        pass

    def key_mask(self, plan: "BatchPlan", layer: int, state) -> torch.Tensor | None:
        return None

    def after_attention(self, plan: "BatchPlan", layer: int, state, out, readout):
        return out

    def adjust_logits(self, plan: "BatchPlan", logits: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        return main

    def finish(self, plan: "BatchPlan") -> None:
        """Write this method's part of each request's intervention report."""


class BatchPlan:
    def __init__(self, facts: Any, requests: Sequence[Any]):
        self.facts = facts
        self.requests = list(requests)
        self.rows: list[int] = list(range(len(self.requests)))  # request served by each batch row
        self.twin: list[bool] = [False] * len(self.requests)
        self.twins_needed: dict[int, bool] = {}  # request -> keep its twin for decoding
        self.components: list[Component] = []
        self.reports_: list[dict[str, Any]] = [{} for _ in self.requests]
        self.visual: torch.Tensor | None = None  # (B, T) bool: image tokens of the prefill layout
        self._memo: dict[Any, Any] = {}  # per-layout tensors, cleared when rows leave the batch

    def layout_changed(self) -> None:
        """Rows left the batch or were re-packed: per-layout tensors must be rebuilt."""
        self._memo.clear()

    def memo(self, key: Any, build):
        """`build()` once per batch layout: per-row parameter tensors are the same for every
        layer and step until rows leave, and building them (with a host-to-device copy) on every
        layer of every decode step would cost more than the edits themselves."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # -- building -----------------------------------------------------------------------------
    def configs(self, name: str) -> dict[int, Any]:
        """{request: config} of the requests that asked for method `name`."""
        return {
            i: config
            for i, request in enumerate(self.requests)
            for config in request.interventions
            if config.name == name
        }

    def need_twin(self, request: int, *, for_decode: bool = False) -> None:
        self.twins_needed[request] = self.twins_needed.get(request, False) or for_decode

    def twin_requests(self) -> list[Any]:
        """Image-removed copies of the requests that need one; they follow the main rows."""
        order = sorted(self.twins_needed)
        self.rows += order
        self.twin += [True] * len(order)
        return [replace(self.requests[i], image=None, interventions=()) for i in order]

    def twin_row(self, request: int) -> int | None:
        for b, (r, is_twin) in enumerate(zip(self.rows, self.twin)):
            if is_twin and r == request:
                return b
        return None

    def main_row(self, request: int) -> int | None:
        for b, (r, is_twin) in enumerate(zip(self.rows, self.twin)):
            if not is_twin and r == request:
                return b
        return None

    def bind(self, batch: dict[str, torch.Tensor]) -> None:
        self.visual = batch["input_ids"] == self.facts.image_token_id  # (B, T)

    def values(self, per_request: dict[int, float], *, heads: int | None = None, device=None,
               twins: bool = False) -> torch.Tensor:
        """(B,) or (B, H) fp32: each batch row's request value, 0 for others (and twins unless asked)."""
        shape = (len(self.rows),) if heads is None else (len(self.rows), heads)
        out = torch.zeros(shape, dtype=torch.float32)
        for b, (r, is_twin) in enumerate(zip(self.rows, self.twin)):
            if r in per_request and (twins or not is_twin):
                out[b] = per_request[r]
        return out.to(device)

    def report(self, request: int, **fields: Any) -> None:
        self.reports_[request].update(fields)

    def add_ms(self, request: int, ms: float) -> None:
        self.reports_[request]["added_ms"] = self.reports_[request].get("added_ms", 0.0) + ms

    def reports(self) -> list[dict[str, Any]]:
        for component in self.components:
            component.finish(self)
        return self.reports_

    # -- key classes per layer ------------------------------------------------------------------
    def key_class(self, layer: int, state) -> torch.Tensor:
        """(B, Tk) uint8 key classes of a layer, kept in the cache and grown at each decode step."""
        extras = state.cache.extras[layer]
        k_len = state.key_length(layer)
        cls = extras.get("key_class")
        if cls is None:  # prefill: visual bits of the layer's input layout
            cls = self.visual.to(torch.uint8) * KEY_VISUAL
        if cls.shape[1] < k_len:  # decode: generated tokens are plain text keys
            pad = torch.zeros(cls.shape[0], k_len - cls.shape[1], dtype=torch.uint8, device=cls.device)
            cls = torch.cat([cls, pad], dim=1)
        extras["key_class"] = cls
        return cls

    # -- engine hooks ---------------------------------------------------------------------------
    def before_layer(self, engine, layer: int, state) -> None:
        for component in self.components:
            component.before_layer(self, engine, layer, state)

    def key_mask(self, layer: int, state) -> torch.Tensor | None:
        """(B, Tk) bool of keys a component hides in this layer (VTE's masked emulation), or None."""
        mask = None
        for component in self.components:
            m = component.key_mask(self, layer, state)
            if m is not None:
                mask = m if mask is None else mask & m
        return mask

    def edits(self, layer: int, state) -> AttentionEdits | None:
        fields: dict[str, Any] = {}
        for component in self.components:
            component.contribute(self, layer, state, fields)
        if not fields:
            return None
        if any(fields.get(k) is not None for k in ("boost_alpha", "sink_p")) or fields.get("readout") or fields.get("key_drop"):
            fields.setdefault("key_class", self.key_class(layer, state))
        return AttentionEdits(**fields)

    def after_attention(self, layer: int, state, out: torch.Tensor, readout) -> torch.Tensor:
        for component in self.components:
            out = component.after_attention(self, layer, state, out, readout)
        return out

    def after_prefill(self, engine, state) -> torch.Tensor | None:
        """Drop the twin rows no method needs for decoding; returns the kept rows or None."""
        keep = [b for b, (r, t) in enumerate(zip(self.rows, self.twin)) if not t or self.twins_needed.get(r)]
        if len(keep) == len(self.rows):
            return None
        return self._select(state, keep)

    def _select(self, state, keep: list[int]) -> torch.Tensor:
        index = state.keep_rows(keep)
        self.rows = [self.rows[b] for b in keep]
        self.twin = [self.twin[b] for b in keep]
        self.layout_changed()
        return index

    # -- the pipeline's view: main rows only ---------------------------------------------------------
    def adjust_logits(self, state, logits: torch.Tensor) -> torch.Tensor:
        """(B_batch, V) -> (B_main, V): the main rows come first in the layout."""
        main = logits[: self.twin.count(False)]
        for component in self.components:
            main = component.adjust_logits(self, logits, main)
        return main

    def expand_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens of the main rows -> tokens of every batch row (a twin copies its request's)."""
        n_main = self.twin.count(False)
        extra = [tokens[self.main_row(r)] for r, t in zip(self.rows[n_main:], self.twin[n_main:])]
        return torch.cat([tokens, torch.stack(extra)]) if extra else tokens

    def select_main(self, state, keep_main: list[int]) -> None:
        """Keep the main rows at these positions, with their twins; drop the others."""
        kept_requests = {self.rows[b] for b in keep_main}
        n_main = self.twin.count(False)
        keep = list(keep_main) + [b for b in range(n_main, len(self.rows)) if self.rows[b] in kept_requests]
        self._select(state, keep)


class Stopwatch:
    """Adds the wall time of a block to each listed request's `added_ms` report."""

    def __init__(self, plan: BatchPlan, requests):
        self.plan, self.requests = plan, list(requests)

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        ms = 1000.0 * (time.perf_counter() - self.t0)
        for r in self.requests:
            self.plan.add_ms(r, ms)
        return False


def build_plan(facts: Any, requests: Sequence[Any], *, profile: dict | None = None) -> BatchPlan:
    """A plan for a batch: one component per method that at least one request asked for."""
    from interventions.registry import component_factories

    plan = BatchPlan(facts, requests)
    for name, factory in component_factories().items():
        rows = plan.configs(name)
        if rows:
            plan.components.append(factory(plan, rows, profile or {}))
    return plan
