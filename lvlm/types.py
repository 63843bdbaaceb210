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
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely (lvlm/logprobs.py)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the distribution it was chosen from (the
    intervention-adjusted logits, before temperature and top-p; see lvlm/logprobs.py), with the
    `top` most likely tokens at that position as TokenLogprobs of their own (their `top` empty)."""

    token_id: int
    token: str  # the token's text
    bytes: tuple[int, ...]  # its UTF-8 bytes (a byte token's raw byte, even when not valid UTF-8 alone)
    logprob: float
    top: tuple["TokenLogprob", ...] = ()


class TextDelta(str):
    """A streamed text delta that also carries the log-probabilities of the tokens it completes.

    It is a `str`, so every `on_token(row, delta)` consumer keeps working; a request without
    `logprobs` streams plain strings. Tokens whose text is held back (a possible stop string, an
    incomplete character) arrive with the delta that releases it; `Result.logprobs` has them all.
    """

    logprobs: tuple[TokenLogprob, ...] = ()

    def __new__(cls, text: str, logprobs: tuple[TokenLogprob, ...] = ()) -> "TextDelta":
        delta = super().__new__(cls, text)
        delta.logprobs = logprobs
        return delta


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
    logprobs: list[TokenLogprob] | None = None  # per answer token (EOS excluded) when the request asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
