"""Requests in, results out: chat template, processor, batched generation, streaming, stops.

`Pipeline.generate` runs a list of `Request`s as one left-padded batch through the `Engine`:
one prefill, then one decode step per token; rows leave the batch when they hit EOS, a stop
string or their token limit. `RunningBatch` is the machinery underneath, and it also lets rows
join between decode steps (continuous batching, serve/scheduler.py). Each step moves the chosen
tokens of the whole batch to the host once. Text is detokenized incrementally
(lvlm/detokenize.py, amortized O(1) per token; the final text is the full decode). `on_token(row,
text_delta)` streams text as it is decoded; the last few characters are held back while they
could still be the start of a stop string. A request with `logprobs` also gets each answer
token's log-probability (lvlm/logprobs.py) in `Result.logprobs` and on its streamed deltas.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lvlm_hallu.lvlm.adapters import Adapter, ModelFacts
from lvlm_hallu.lvlm.detokenize import IncrementalDetokenizer
from lvlm_hallu.lvlm.engine import Engine, NoPlan, Sampler, timed
from lvlm_hallu.lvlm.errors import ContextLengthError, ImageError, PromptError
from lvlm_hallu.lvlm.logprobs import pieces_for, step_logprobs
from lvlm_hallu.lvlm.types import Request, Result, TextDelta, Timings, TokenLogprob

OnToken = Callable[[int, str], None]


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open an image from a path, bytes or PIL image as RGB; ImageError if it cannot be read."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as err:  # its text names the in-memory buffer, not the file
        raise ImageError(f"cannot read image {str(source)[:80]!r}: not a picture PIL can decode") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {str(source)[:80]!r}: {err}") from err
    return image.convert("RGB")


class Pipeline:
    """A loaded model with its processor, ready to serve `Request`s."""

    def __init__(self, model, processor, adapter: Adapter, model_id: str):
        self.model, self.processor, self.adapter, self.model_id = model, processor, adapter, model_id
        self.tokenizer = processor.tokenizer
        self.facts = ModelFacts.from_config(model.config)
        self.engine = Engine(model, adapter, self.facts)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self._profile: dict[str, Any] | None = None
        self.snapshot: Path | None = None  # a hub checkpoint's cache snapshot (its commit), set by lvlm.load

    @property
    def max_context(self) -> int:
        return self.facts.max_context

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "family": self.adapter.family,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.device),
            "attention_backend": self.engine.attention_backend,
            "layers": self.facts.num_layers,
            "heads": self.facts.num_heads,
            "max_context": self.max_context,
        }

    # -- inputs ---------------------------------------------------------------------------
    def render_prompt(self, request: Request) -> str:
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise PromptError("the prompt is empty")
        for name in ("image_token", "video_token"):  # the processor would expand it into vision tokens
            token = getattr(self.processor, name, None)
            if isinstance(token, str) and token and token in request.prompt:
                raise PromptError(f"the prompt text contains the model's {name.split('_')[0]} placeholder "
                                  f"{token!r}; attach images as image parts, not as text")
        content: list[dict[str, str]] = [{"type": "image"} for _ in _images(request)]
        content.append({"type": "text", "text": request.prompt})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def prepare(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Processor outputs for a left-padded batch (input_ids, attention_mask, vision inputs)."""
        texts = [self.render_prompt(r) for r in requests]
        images = [load_image(image) for r in requests for image in _images(r)]
        self.tokenizer.padding_side = "left"
        batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        lengths = batch["attention_mask"].sum(-1).tolist()
        for request, length in zip(requests, lengths):
            if length + request.max_new_tokens > self.max_context:
                raise ContextLengthError(
                    f"prompt of {length} tokens plus max_new_tokens={request.max_new_tokens} exceeds "
                    f"the model context of {self.max_context} tokens"
                )
        return {k: v.to(self.device) for k, v in batch.items()}

    def vision_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor outputs the image features and the position rule read (lvlm/adapters.py)."""
        vision = {k: batch[k] for k in (*self.adapter.vision_inputs, *self.adapter.position_inputs) if k in batch}
        if "pixel_values" in vision:
            vision["pixel_values"] = vision["pixel_values"].to(self.model.dtype)
        return vision

    def image_grid(self, request: Request):
        """(rows, cols) int array: the index, among the prompt's image tokens, of each patch of the
        request's first image on its real grid (the family's layout, lvlm/inspection/grids.py):
        CARVE maps its read-out through it. Of an image's panels, the last is its finest view of
        the whole image: the any-resolution tiles (LLaVA-NeXT, OneVision: unpadded to the image's
        aspect ratio, after the square base tile), else the one grid (LLaVA-1.5, Qwen2-VL)."""
        from dataclasses import replace

        from lvlm_hallu.lvlm.inspection.grids import GRIDS, patch_grid

        if self.adapter.family not in GRIDS:  # a family without a layout: one square base grid
            side = self.facts.vision_grid
            return np.arange(side * side).reshape(side, side)
        first = replace(request, image=_images(request)[0])  # the first image's tokens come first
        return patch_grid(self, self.prepare([first])).panels[-1].tokens

    def image_input_size(self) -> tuple[int, int] | None:
        """(width, height) of the vision tower's square input (LLaVA-1.5: 336 x 336; LLaVA-NeXT:
        its base tile), or None for a dynamic-resolution tower (Qwen2-VL), which takes an image
        at its own size. CARVE upscales its crop to it."""
        side = getattr(getattr(self.model.config, "vision_config", None), "image_size", None)
        if self.facts.vision_grid is None or not isinstance(side, int):
            return None
        return side, side

    def build_plan(self, requests: Sequence[Request], plan_factory=None):
        if plan_factory is not None:
            return plan_factory(self.facts, requests)
        if not any(r.interventions for r in requests):
            return NoPlan()
        from lvlm_hallu.interventions.plan import build_plan

        return build_plan(self.facts, requests, profile=self.profile())

    def profile(self) -> dict[str, Any]:
        """Cached per-model constants (sink dimensions, ...) for the interventions."""
        if self._profile is None:
            from lvlm_hallu.lvlm.profile import load_or_compute

            self._profile = load_or_compute(self)
        return self._profile

    # -- generation -------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], on_token: OnToken | None = None, *,
                 plan_factory: Callable | None = None) -> list[Result]:
        """Run the requests as one batch. `plan_factory(facts, requests)` overrides the plan built
        from the requests' interventions (multi-pass methods use it for their probe passes)."""
        requests = list(requests)
        if not requests:
            return []
        batch = RunningBatch(self)
        rows = batch.admit(requests, on_token, plan_factory=plan_factory)
        while batch:
            batch.step()
        return [row.result for row in rows]

    def refine(self, requests: list[Request]) -> tuple[list[Request], list[dict[str, Any]]]:
        """Multi-pass methods that rewrite a request before the batch runs (CARVE)."""
        reports: list[dict[str, Any]] = [{} for _ in requests]
        if not any(c.name == "carve" for r in requests for c in r.interventions):
            return requests, reports
        from lvlm_hallu.interventions.carve import refine_requests

        return refine_requests(self, requests)


def _images(request: Request) -> list:
    """A request's images: none, one, or several (CARVE's code mode passes two)."""
    if request.image is None:
        return []
    return list(request.image) if isinstance(request.image, (list, tuple)) else [request.image]


class RunningBatch:
    """Rows from one or more admissions decoding together (the engine side of batching).

    `admit` prefills a group of requests (with their plan and twin rows), samples their first
    token and merges them into the running rows; `step` runs one decode step for every row and
    retires the rows that finished (EOS, stop string, token limit, `cancel`). `Pipeline.generate`
    admits once and steps to the end (static batching); serve/scheduler.py admits between steps
    (continuous batching). A merge left-pads the shorter cache and concatenates the plans
    (`BatchPlan.merge`), so every row computes exactly what it would alone.
    """

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.state = None  # ForwardState of the running rows (None when empty)
        self.plan: Any = None
        self.rows: list[_RowState] = []  # main batch rows, in batch order

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, requests: Sequence[Request], on_token: OnToken | None = None, *,
              plan_factory: Callable | None = None, streams: Sequence[OnToken | None] | None = None) -> list["_RowState"]:
        """Prefill `requests` as one group and merge them into the batch; returns their rows, in
        order (each gets `result` when it finishes). `on_token(i, delta)` streams request i;
        `streams` gives each request its own `on_token(0, delta)` instead."""
        pipe, engine = self.pipe, self.pipe.engine
        requests = list(requests)
        for r in requests:
            if r.max_new_tokens < 1:
                raise PromptError("max_new_tokens must be at least 1")
        requests, pre_reports = pipe.refine(requests)
        plan = pipe.build_plan(requests, plan_factory)
        batch = pipe.prepare(requests + plan.twin_requests())
        plan.bind(batch)

        def prefill():
            logits, state = engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), plan)
            return plan.adjust_logits(state, logits), state

        (logits, state), prefill_ms = timed(prefill, pipe.device)
        lengths = batch["attention_mask"].sum(-1).tolist()
        rows = []
        for i, r in enumerate(requests):
            stream = streams[i] if streams is not None else (None if on_token is None else _indexed(on_token, i))
            rows.append(_RowState(pipe, r, i, stream, prompt_tokens=int(lengths[i]), prefill_ms=prefill_ms,
                                  pre_report=pre_reports[i]))
        for i, row in enumerate(rows):
            row.rid = i
        self._advance(rows, logits)
        keep = [b for b, row in enumerate(rows) if not row.finished]
        done = [row for row in rows if row.finished]
        if done:  # finished on their first token: retire before they join
            reports = plan.retire([row.rid for row in done])
            for row, report in zip(done, reports):
                row.complete(report)
            if not keep:
                return rows
            plan.select_main(state, keep)
        self._merge(plan, state, [rows[b] for b in keep])
        return rows

    def _merge(self, plan: Any, state: Any, rows: list["_RowState"]) -> None:
        if self.state is None:
            self.state, self.plan, self.rows = state, plan, list(rows)
            return
        if isinstance(self.plan, NoPlan) and isinstance(plan, NoPlan):
            self.state.merge(state)
        else:
            running = self.plan if not isinstance(self.plan, NoPlan) else self._plain_plan(self.rows)
            joining = plan if not isinstance(plan, NoPlan) else self._plain_plan(rows)
            offset = len(running.requests)
            order = running.merge(joining)
            self.state.merge(state)
            if order != sorted(order):
                self.state.permute_rows(order)
            for row in rows:
                row.rid += offset
            self.plan = self.state.plan = running
        self.rows += rows

    def _plain_plan(self, rows: list["_RowState"]):
        """A plan without components for rows that ran without one (so that plans can merge)."""
        from lvlm_hallu.interventions.plan import BatchPlan

        for i, row in enumerate(rows):
            row.rid = i
        return BatchPlan(self.pipe.facts, [row.request for row in rows])

    def step(self) -> list["_RowState"]:
        """One decode step for every running row; returns the rows that finished in it."""
        finished = self._retire()  # rows cancelled since the last step
        if not self.rows:
            return finished
        engine = self.pipe.engine
        tokens = torch.tensor([row.ids[-1] for row in self.rows], device=self.pipe.device)
        fed = self.plan.expand_tokens(tokens)
        logits = self.plan.adjust_logits(self.state, engine.decode_one_token(fed, self.state))
        self._advance(self.rows, logits)
        return finished + self._retire()

    def cancel(self, row: "_RowState") -> None:
        """Stop a row at the next step (client gone); it finishes with reason 'cancelled'."""
        if not row.finished:
            row.finished, row.finish_reason = True, "cancelled"

    def _advance(self, rows: list["_RowState"], logits: torch.Tensor) -> None:
        """Choose every row's next token with one device-to-host copy, then stream its text."""
        if all(row.sampler.temperature <= 0 for row in rows):
            tokens = logits.argmax(-1).tolist()  # the step's only device-to-host copy
        else:
            host = logits.cpu()
            tokens = [row.sampler(host[b]) for b, row in enumerate(rows)]
        scored = step_logprobs(logits, tokens, [row.request.logprobs for row in rows])  # None unless a row asks
        for b, (row, token) in enumerate(zip(rows, tokens)):
            if not row.finished:
                row.push(token, None if scored is None else scored[b])
                row.stream()

    def _retire(self) -> list["_RowState"]:
        done = [row for row in self.rows if row.finished]
        if not done:
            return []
        keep = [b for b, row in enumerate(self.rows) if not row.finished]
        reports = self.plan.retire([row.rid for row in done])
        for row, report in zip(done, reports):
            row.complete(report)
        if keep:
            self.plan.select_main(self.state, keep)
            self.rows = [self.rows[b] for b in keep]
        else:
            self.state, self.plan, self.rows = None, None, []
        return done


def _indexed(on_token: OnToken, i: int) -> OnToken:
    return lambda _row, delta: on_token(i, delta)


class _RowState:
    """Tokens, text, stop checks and streaming bookkeeping of one request."""

    def __init__(self, pipe: Pipeline, request: Request, index: int, on_token: OnToken | None = None, *,
                 prompt_tokens: int = 0, prefill_ms: float = 0.0, pre_report: dict | None = None):
        self.pipe, self.request, self.on_token = pipe, request, on_token
        generator = None
        if request.temperature > 0:
            generator = torch.Generator().manual_seed(request.seed if request.seed is not None else index + int(time.time_ns()))
        self.sampler = Sampler(request.temperature, request.top_p, generator)
        self.detok = IncrementalDetokenizer(pipe.tokenizer)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.checked = 0  # stop strings are searched from here on (minus their length)
        self.finished = False
        self.finish_reason = "length"
        self.rid = index  # request number in the batch plan
        self.prompt_tokens, self.prefill_ms, self.pre_report = prompt_tokens, prefill_ms, pre_report or {}
        self.t_start = time.perf_counter()
        self.decode_ms = 0.0
        self.result: Result | None = None
        self.holdback = max((len(s) for s in request.stop), default=1) - 1
        self.logprobs: list[TokenLogprob] | None = None if request.logprobs is None else []
        self.logprobs_sent = 0  # entries already attached to a streamed delta

    def push(self, token: int, scored: tuple[float, list[tuple[int, float]]] | None = None) -> int:
        self.ids.append(token)
        if token in self.pipe.eos_ids and not self.request.ignore_eos:
            self._finish("stop")  # EOS is not part of the answer: no logprobs entry
            return token
        if scored is not None and self.logprobs is not None:
            pieces = pieces_for(self.pipe.tokenizer)
            chosen, top = scored
            self.logprobs.append(pieces.entry(token, chosen, tuple(pieces.entry(t, lp) for t, lp in top)))
        self.detok.push(token)
        self.text = self.detok.text
        if self._stop_at(self.text, self.checked) is not None:
            self._finish("stop")
        elif len(self.ids) >= self.request.max_new_tokens:
            self._finish("length")
        self.checked = len(self.text)
        return token

    def _stop_at(self, text: str, checked: int) -> int | None:
        """Index of the earliest stop string in text (only matches ending after `checked`)."""
        cuts = []
        for stop in self.request.stop:
            cut = text.find(stop, max(0, checked - len(stop) + 1))
            if cut >= 0:
                cuts.append(cut)
        return min(cuts) if cuts else None

    def _finish(self, reason: str) -> None:
        """The final text is the full decode of the visible tokens (EOS excluded), cut at the first
        stop string."""
        self.detok.finish()  # an EOS token never entered the detokenizer
        text = self.detok.text
        cut = self._stop_at(text, 0)
        if cut is not None:
            text, reason = text[:cut], "stop"
        self.text, self.finished, self.finish_reason = text, True, reason

    def stream(self) -> None:
        delta = self.take_delta()
        if delta and self.on_token is not None:
            if self.logprobs is not None:  # the tokens so far go out with the text they released
                delta = TextDelta(delta, tuple(self.logprobs[self.logprobs_sent :]))
                self.logprobs_sent = len(self.logprobs)
            self.on_token(self.rid, delta)

    def take_delta(self) -> str:
        # Hold back a possible stop-string prefix until the row finishes (the detokenizer already
        # holds back incomplete multi-byte characters).
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - self.holdback)
        if not self.finished and self.text[self.sent : end].endswith("\ufffd"):
            end -= 1
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta

    def complete(self, report: dict) -> None:
        """Build the Result once the row has left the batch."""
        self.decode_ms = 1000.0 * (time.perf_counter() - self.t_start)
        if self.finish_reason == "cancelled":
            self.detok.finish()
            self.text = self.text or self.detok.text
        engine = self.pipe.engine
        full_report = {"attention_backend": engine.attention_backend, **self.pre_report, **(report or {})}
        timings = Timings(prefill_ms=self.prefill_ms, decode_ms=self.decode_ms, decode_tokens=max(0, len(self.ids) - 1))
        self.result = Result(self.text, list(self.ids), self.finish_reason, self.prompt_tokens, timings, full_report,
                             logprobs=None if self.logprobs is None else list(self.logprobs))
