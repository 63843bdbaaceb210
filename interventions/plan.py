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

from lvlm_hallu.kernels.edits import KEY_VISUAL, AttentionEdits


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

    # -- continuous batching: requests join (with renumbering) and leave a running plan -----------
    per_request_fields: tuple[str, ...] | None = None  # None: every dict keyed within `configs`

    def _per_request(self) -> list[str]:
        if self.per_request_fields is not None:
            return list(self.per_request_fields)
        keys = set(getattr(self, "configs", {}))
        return [n for n, v in vars(self).items() if isinstance(v, dict) and set(v) <= keys]

    def shift(self, offset: int) -> None:
        """Renumber this component's requests by `offset` (its plan joins a running one)."""
        for name in self._per_request():
            setattr(self, name, {r + offset: v for r, v in getattr(self, name).items()})

    def absorb(self, other: "Component", offset: int) -> None:
        """Take over the requests of the same method from a joining plan, renumbered by offset."""
        for name in other._per_request():
            getattr(self, name).update({r + offset: v for r, v in getattr(other, name).items()})

    def drop(self, requests: set[int]) -> None:
        """Forget requests that left the batch."""
        for name in self._per_request():
            setattr(self, name, {r: v for r, v in getattr(self, name).items() if r not in requests})


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
        self._gone: set[int] = set()  # retired requests not forgotten yet (see `retire`)

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
        """Merge into a request's report; a method's dict keeps what was reported before (its
        preset and value sources, written when the plan was built) and merges "sources"."""
        out = self.reports_[request]
        for key, value in fields.items():
            prior = out.get(key)
            if isinstance(prior, dict) and isinstance(value, dict):
                sources = {**prior.get("sources", {}), **value.get("sources", {})}
                value = {**prior, **value, **({"sources": sources} if sources else {})}
            out[key] = value

    def add_ms(self, request: int, ms: float) -> None:
        self.reports_[request]["added_ms"] = self.reports_[request].get("added_ms", 0.0) + ms

    def reports(self) -> list[dict[str, Any]]:
        for component in self.components:
            component.finish(self)
        return self.reports_

    # -- key classes per layer ------------------------------------------------------------------
    def key_class(self, layer: int, state) -> torch.Tensor:
        """(B, Tk) uint8 key classes of a layer: a view of the cache's key-class buffer, written
        at prefill from the visual bits of the layer's input layout; generated tokens are plain
        text keys (the buffer's unused columns are 0). In-place updates (sink bits) persist."""
        cache = state.cache
        k_len = state.key_length(layer)
        if not cache.has_key_classes(layer):
            return cache.set_key_classes(layer, self.visual.to(torch.uint8) * KEY_VISUAL)[:, :k_len]
        return cache.key_classes(layer, k_len)

    # -- engine hooks ---------------------------------------------------------------------------
    def before_layer(self, engine, layer: int, state) -> None:
        for component in self.components:
            component.before_layer(self, engine, layer, state)
        if state.phase == "prefill":  # every layer gets its classes, even if no method reads them yet
            self.key_class(layer, state)

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


    # -- continuous batching ------------------------------------------------------------------------
    def merge(self, other: "BatchPlan") -> list[int]:
        """Take in the requests of a prefilled plan whose rows are appended after this plan's rows
        (`ForwardState.merge`). Returns the row order that restores the layout (main rows first,
        then twins): new row i is old concatenated row order[i]."""
        self._forget()
        offset = len(self.requests)
        self.requests += other.requests
        self.reports_ += other.reports_
        n_self, n_other = self.twin.count(False), other.twin.count(False)
        b_self = len(self.rows)
        order = (list(range(n_self)) + [b_self + b for b in range(n_other)]
                 + list(range(n_self, b_self)) + [b_self + b for b in range(n_other, len(other.rows))])
        rows = [r + offset for r in other.rows]
        self.rows = self.rows[:n_self] + rows[:n_other] + self.rows[n_self:] + rows[n_other:]
        self.twin = self.twin[:n_self] + other.twin[:n_other] + self.twin[n_self:] + other.twin[n_other:]
        self.twins_needed.update({r + offset: v for r, v in other.twins_needed.items()})
        self._gone.update(r + offset for r in other._gone)  # retired at admission: forgotten next merge
        mine = {type(c): c for c in self.components}
        for component in other.components:
            if type(component) in mine:
                mine[type(component)].absorb(component, offset)
            else:
                component.shift(offset)
                self.components.append(component)
        from lvlm_hallu.interventions.registry import component_factories

        hook_order = list(component_factories())
        self.components.sort(key=lambda c: hook_order.index(c.name) if c.name in hook_order else len(hook_order))
        self.visual = None  # prefill layouts are gone; key classes live in the cache
        self.layout_changed()
        return order

    def retire(self, requests: Sequence[int]) -> list[dict[str, Any]]:
        """Final reports of requests whose rows left the batch. Their component state stays
        readable (calibration reads it after `generate`) until the next `merge` forgets it."""
        for component in self.components:
            component.finish(self)
        self._gone.update(requests)
        return [dict(self.reports_[r]) for r in requests]

    def _forget(self) -> None:
        """Drop retired requests from the components (a long-running batch must not grow)."""
        if not self._gone:
            return
        for r in self._gone:
            self.reports_[r], self.requests[r] = {}, None
            self.twins_needed.pop(r, None)
        for component in self.components:
            component.drop(self._gone)
        self.components = [c for c in self.components if getattr(c, "configs", True)]
        self._gone = set()


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
    """A plan for a batch: one component per method that at least one request asked for.

    Model-aware parameters the requests left unset are filled first (interventions/defaults.py),
    from the profile's published, calibrated and tuned values; their sources go to the report.
    """
    from lvlm_hallu.interventions.defaults import resolve_requests
    from lvlm_hallu.interventions.registry import component_factories

    requests, provenance = resolve_requests(facts, requests, profile)
    plan = BatchPlan(facts, requests)
    for r, methods in enumerate(provenance):
        plan.report(r, **methods)
    for name, factory in component_factories().items():
        rows = plan.configs(name)
        if rows:
            plan.components.append(factory(plan, rows, profile or {}))
    return plan
