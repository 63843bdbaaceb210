"""Requests and results of the generation engine (plain dataclasses; pydantic lives in serve/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Request:
    """One generation request: a user prompt with an image (or none, or a list of images).

    `prompt` is the user's text only; the engine applies the model's chat template and inserts
    the image placeholder. `interventions` is a list of intervention configs (see
    `interventions.resolve`); empty means plain decoding.
    """

    prompt: str
    image: Image.Image | list[Image.Image] | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks)
    interventions: tuple[Any, ...] = ()


@dataclass
class Timings:
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 * self.decode_tokens / self.decode_ms if self.decode_ms > 0 else 0.0


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings)
    report: dict[str, Any] = field(default_factory=dict)  # intervention report

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
