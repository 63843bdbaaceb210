"""Requests in, results out: chat template, processor, batched generation, streaming, stops.

`Pipeline.generate` runs a list of `Request`s as one left-padded batch through the `Engine`:
one prefill, then one decode step per token; rows leave the batch when they hit EOS, a stop
string or their token limit. `on_token(row, text_delta)` streams text as it is decoded; the
last few characters are held back while they could still be the start of a stop string.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from lvlm.adapters import Adapter, ModelFacts
from lvlm.engine import Engine, NoPlan, Sampler, timed
from lvlm.errors import ImageError, PromptError
from lvlm.types import Request, Result, Timings

OnToken = Callable[[int, str], None]


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open an image from a path, bytes or PIL image as RGB; ImageError if it cannot be read."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
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
                raise PromptError(
                    f"prompt of {length} tokens plus max_new_tokens={request.max_new_tokens} exceeds "
                    f"the model context of {self.max_context} tokens"
                )
        return {k: v.to(self.device) for k, v in batch.items()}

    def vision_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vision = {k: batch[k] for k in self.adapter.vision_inputs if k in batch}
        if "pixel_values" in vision:
            vision["pixel_values"] = vision["pixel_values"].to(self.model.dtype)
        return vision

    def build_plan(self, requests: Sequence[Request], plan_factory=None):
        if plan_factory is not None:
            return plan_factory(self.facts, requests)
        if not any(r.interventions for r in requests):
            return NoPlan()
        from interventions.plan import build_plan

        return build_plan(self.facts, requests, profile=self.profile())

    def profile(self) -> dict[str, Any]:
        """Cached per-model constants (sink dimensions, ...) for the interventions."""
        if self._profile is None:
            from lvlm.profile import load_or_compute

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
        for r in requests:
            if r.max_new_tokens < 1:
                raise PromptError("max_new_tokens must be at least 1")
        requests, pre_reports = self.refine(requests)
        plan = self.build_plan(requests, plan_factory)
        batch = self.prepare(requests + plan.twin_requests())
        plan.bind(batch)
        engine = self.engine

        def prefill():
            logits, state = engine.prefill(batch["input_ids"], batch["attention_mask"], self.vision_inputs(batch), plan)
            return plan.adjust_logits(state, logits), state

        (logits, state), prefill_ms = timed(prefill, self.device)
        rows = [_RowState(self, r, i) for i, r in enumerate(requests)]
        active = list(range(len(rows)))  # request index of each main batch row
        t_decode = time.perf_counter()
        while True:
            tokens = [rows[i].push(logits[b]) for b, i in enumerate(active)]
            for i in active:
                delta = rows[i].take_delta()
                if delta and on_token is not None:
                    on_token(i, delta)
                if rows[i].finished:
                    rows[i].decode_ms = 1000.0 * (time.perf_counter() - t_decode)
            keep = [b for b, i in enumerate(active) if not rows[i].finished]
            if not keep:
                break
            if len(keep) < len(active):
                plan.select_main(state, keep)
                active = [active[b] for b in keep]
                tokens = [tokens[b] for b in keep]
            fed = plan.expand_tokens(torch.tensor(tokens, device=self.device))
            logits = plan.adjust_logits(state, engine.decode_one_token(fed, state))
        prompt_lengths = batch["attention_mask"].sum(-1).tolist()
        reports = plan.reports() or [{} for _ in requests]
        results = []
        for i, row in enumerate(rows):
            report = {"attention_backend": engine.attention_backend, **pre_reports[i], **reports[i]}
            timings = Timings(prefill_ms=prefill_ms, decode_ms=row.decode_ms, decode_tokens=len(row.ids) - 1)
            results.append(Result(row.text, row.ids, row.finish_reason, int(prompt_lengths[i]), timings, report))
        return results

    def refine(self, requests: list[Request]) -> tuple[list[Request], list[dict[str, Any]]]:
        """Multi-pass methods that rewrite a request before the batch runs (CARVE)."""
        reports: list[dict[str, Any]] = [{} for _ in requests]
        if not any(c.name == "carve" for r in requests for c in r.interventions):
            return requests, reports
        from interventions.carve import refine_requests

        return refine_requests(self, requests)


def _images(request: Request) -> list:
    """A request's images: none, one, or several (CARVE's code mode passes two)."""
    if request.image is None:
        return []
    return list(request.image) if isinstance(request.image, (list, tuple)) else [request.image]


class _RowState:
    """Tokens, text, stop checks and streaming bookkeeping of one request."""

    def __init__(self, pipe: Pipeline, request: Request, index: int):
        self.pipe, self.request = pipe, request
        generator = None
        if request.temperature > 0:
            generator = torch.Generator().manual_seed(request.seed if request.seed is not None else index + int(time.time_ns()))
        self.sampler = Sampler(request.temperature, request.top_p, generator)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finished = False
        self.finish_reason = "length"
        self.decode_ms = 0.0
        self.holdback = max((len(s) for s in request.stop), default=1) - 1

    def push(self, logits: torch.Tensor) -> int:
        token = self.sampler(logits.cpu())
        self.ids.append(token)
        if token in self.pipe.eos_ids and not self.request.ignore_eos:
            self.finished, self.finish_reason = True, "stop"
            visible = self.ids[:-1]
        else:
            visible = self.ids
        self.text = self.pipe.tokenizer.decode(visible, skip_special_tokens=True)
        for stop in self.request.stop:
            cut = self.text.find(stop)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finished, self.finish_reason = True, "stop"
        if not self.finished and len(self.ids) >= self.request.max_new_tokens:
            self.finished = True
        return token

    def take_delta(self) -> str:
        # Hold back a possible stop-string prefix, and a trailing replacement character of an
        # incomplete multi-byte sequence, until the row finishes.
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - self.holdback)
        if not self.finished and self.text[self.sent : end].endswith("\ufffd"):
            end -= 1
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta

