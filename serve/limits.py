"""Request limits of the service: its configuration, the API-key check, the bounded body reader,
the bounded cost of every request field, and the per-replica admission limit that answers 429
instead of queueing without bound.

Every field a client controls has a cost bounded before the request is queued (`check_costs`):
strings (the prompt, and the prompts an intervention carries, such as CARVE's, count against
one `max_prompt_chars` budget; every other string against `max_field_chars`), lists (at most the
served model's largest dimension: layers, heads or hidden size), the number of interventions,
and the body itself (`read_body`). A refusal is a 400 (413 for the body) in milliseconds.

API keys: several may be configured; `check_api_key` returns the caller's owner id (a hash of
the key, never the key), so each evaluation job belongs to the key that created it.

Why an admission limit inside the replica when Ray Serve already caps `max_ongoing_requests`:
requests over Ray's cap wait in the proxy's queue, and past `max_queued_requests` Ray answers a
plain-text 503. Our limit sits below Ray's cap, so a saturated replica answers at once with an
OpenAI-style 429 (and `Retry-After`) while cheap routes (/health, /metrics) still get through.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass
from typing import Any, Iterable

from lvlm_hallu.serve.errors import BadRequest, Overloaded, PayloadTooLarge, Unauthorized, UnsupportedMediaType

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * MiB  # a base64 image is 4/3 of its bytes
    max_image_bytes: int = 10 * MiB
    max_image_pixels: int = 4096 * 4096  # checked from the header, before decoding (bombs)
    max_image_side: int = 8192  # longest side, from the header
    max_aspect_ratio: float = 20.0  # long side / short side: preprocessing scales the short side up
    max_decoded_bytes: int = 4096 * 4096 * 8  # native pixels + RGB copy, from the header
    max_images: int = 1  # the engine takes at most one image per request
    max_tokens: int = 1024
    default_max_tokens: int = 128
    max_prompt_chars: int = 32_000  # cheap guard before tokenizing; the token check follows
    max_concurrent: int = 32  # generation requests in flight per replica before 429
    allow_remote_images: bool = False
    remote_timeout_s: float = 5.0
    remote_max_redirects: int = 3
    max_eval_limit: int = 5000
    max_field_chars: int = 256  # model, user, stop strings, intervention strings and names
    max_interventions: int = 8  # entries of the interventions list
    max_list_items: int = 4096  # a list parameter, when the model's dimensions are unknown
    max_nesting: int = 3  # lists inside lists inside an intervention parameter
    max_json_values: int = 131_072  # commas in a chat body: bounds the values the parser would build


def key_owner(key: str) -> str:
    """The owner id of an API key: a short hash, safe to store and log."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def check_api_key(authorization: str | None, keys: str | Iterable[str] | None) -> str | None:
    """Bearer-token check against every configured key; returns the caller's owner id, or None
    when the service runs without keys."""
    keys = [keys] if isinstance(keys, str) else [k for k in (keys or ()) if k]
    if not keys:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode()
    # compare_digest against every key: the time taken reveals neither which key nor how much matched
    matched = [k for k in keys if hmac.compare_digest(given, k.encode())]
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")
    return key_owner(matched[0])


def list_bound(facts: Any, limits: Limits) -> int:
    """Longest list an intervention parameter may hold: the model's largest dimension (a layer,
    head or hidden-dimension index list never needs more entries)."""
    dims = [getattr(facts, name, None) for name in ("num_layers", "num_heads", "hidden_size")]
    dims = [d for d in dims if isinstance(d, int) and d > 0]
    return max(dims) if dims else limits.max_list_items


def check_values(raw: bytes, limits: Limits) -> None:
    """400 before parsing when the body holds more JSON values than any request needs. Counting
    commas (C speed, milliseconds for the largest body) bounds what the parser would build: a
    list of 2 million numbers costs seconds of Python objects, its commas a few milliseconds. A
    real request has fewer: the prompt's own commas are within `max_prompt_chars`, base64 has
    none, and list parameters are at most a model dimension long."""
    commas = raw.count(b",")
    if commas > limits.max_json_values:
        raise BadRequest(f"request body holds over {limits.max_json_values} JSON values ({commas} commas); no request "
                         "needs that many", code="too_many_values")


def message_chars(body: Any) -> int:
    """Characters of text in a chat request's messages (what its prompt is made of)."""
    total = 0
    for message in getattr(body, "messages", None) or ():
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content:
            total += sum(len(getattr(part, "text", "") or "") for part in content)
    return total


def check_costs(body: Any, limits: Limits, facts: Any = None) -> None:
    """400 unless every field of a chat request (or an eval job's interventions) has a bounded
    cost; the messages' text and the interventions' prompts share `max_prompt_chars`."""
    prompt_chars = message_chars(body)
    for name in ("model", "user"):
        value = getattr(body, name, None)
        if isinstance(value, str) and len(value) > limits.max_field_chars:
            raise BadRequest(f"{name} of {len(value)} characters exceeds the limit of {limits.max_field_chars}",
                             param=name, code="invalid_value")
    stop = getattr(body, "stop", None)
    for i, text in enumerate([stop] if isinstance(stop, str) else stop or ()):
        if len(text) > limits.max_field_chars:
            raise BadRequest(f"stop sequence of {len(text)} characters exceeds the limit of {limits.max_field_chars}",
                             param="stop" if isinstance(stop, str) else f"stop.{i}", code="invalid_value")
    # the field as parsed, not `intervention_spec()`: dumping a 2-million-entry list costs more than refusing it
    spec = getattr(body, "interventions", None)
    _InterventionCost(limits, list_bound(facts, limits), limits.max_prompt_chars - prompt_chars).check(spec)


class _InterventionCost:
    """Walks an `interventions` value (plain JSON data) and refuses what would cost unbounded work."""

    def __init__(self, limits: Limits, max_items: int, prompt_budget: int):
        self.limits, self.max_items, self.prompt_budget = limits, max_items, prompt_budget

    def refuse(self, message: str, param: str, code: str = "invalid_value") -> None:
        raise BadRequest(message, param=param, code=code)

    def check(self, spec: Any) -> None:
        if spec is None:
            return
        if isinstance(spec, str):
            return self.string(spec, "interventions", prompt=False)
        items = [spec] if isinstance(spec, dict) else list(spec)
        if len(items) > self.limits.max_interventions:
            self.refuse(f"{len(items)} interventions given; at most {self.limits.max_interventions}", "interventions")
        for i, item in enumerate(items):
            where = f"interventions.{i}"
            if hasattr(item, "model_extra"):  # schema.InterventionSpec: its name and extra parameters
                item = {"name": item.name, **(item.model_extra or {})}
            if isinstance(item, dict):
                self.mapping(item, where, depth=0)
            else:
                self.value(item, where, depth=0, prompt=False)

    def mapping(self, item: dict, where: str, depth: int) -> None:
        if len(item) > 64:
            self.refuse(f"{where} has {len(item)} fields; at most 64", where)
        for key, value in item.items():
            self.string(str(key), where, prompt=False)
            self.value(value, f"{where}.{key}", depth, prompt="prompt" in str(key))

    def value(self, value: Any, where: str, depth: int, prompt: bool) -> None:
        if isinstance(value, str):
            self.string(value, where, prompt)
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            return
        elif isinstance(value, int):
            if abs(value) >= 2**63:
                self.refuse(f"{where}: integer out of range", where)
        elif isinstance(value, (list, tuple)):
            if depth >= self.limits.max_nesting:
                self.refuse(f"{where}: lists nested deeper than {self.limits.max_nesting}", where)
            if len(value) > self.max_items:
                self.refuse(f"{where} has {len(value)} entries; at most {self.max_items} (the model's largest "
                            "dimension)", where)
            for j, inner in enumerate(value):
                self.value(inner, f"{where}.{j}", depth + 1, prompt)
        elif isinstance(value, dict):
            if depth >= self.limits.max_nesting:
                self.refuse(f"{where}: objects nested deeper than {self.limits.max_nesting}", where)
            self.mapping(value, where, depth + 1)

    def string(self, text: str, where: str, prompt: bool) -> None:
        if prompt:  # an intervention's prompt (CARVE's) is read by the model like the chat prompt
            self.prompt_budget -= len(text)
            if self.prompt_budget < 0:
                self.refuse(f"{where}: the prompt and the interventions' prompts exceed the limit of "
                            f"{self.limits.max_prompt_chars} characters", where, code="context_length_exceeded")
        elif len(text) > self.limits.max_field_chars:
            self.refuse(f"{where}: string of {len(text)} characters exceeds the limit of {self.limits.max_field_chars}",
                        where)


def check_json(content_type: str | None) -> None:
    """415 unless the body is declared as JSON (application/json or a +json type, any charset)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(f"request body must be application/json, got {media or 'no Content-Type'}",
                                   param="content-type")


async def read_body(request, limit: int) -> bytes:
    """The JSON request body, refusing (413) as soon as it passes `limit` bytes.

    The media type is checked first (415), then the declared Content-Length so an honest oversized
    upload is refused without reading it; the running count covers chunked bodies and lying headers.
    """
    check_json(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Admission:
    """Counts generation requests in flight on this replica and refuses those over `limit`.

    `acquire` hands out a `Slot` whose `release` gives it back exactly once, whichever exit path
    (answer, error, stream closed, client gone, garbage collection) gets there first.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()  # a slot may be released by a finalizer on another thread

    def acquire(self) -> "Slot":
        with self._lock:
            if self.active >= self.limit:
                raise Overloaded(f"server is at its limit of {self.limit} concurrent requests; retry shortly",
                                 retry_after_s=1.0)
            self.active += 1
        return Slot(self)

    def release(self) -> None:
        with self._lock:
            self.active = max(0, self.active - 1)


class Slot:
    """One admitted request; `release()` is idempotent."""

    def __init__(self, admission: Admission):
        self._admission, self._held, self._lock = admission, True, threading.Lock()

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> bool:
        """Give the slot back; False when it was already given back."""
        with self._lock:
            if not self._held:
                return False
            self._held = False
        self._admission.release()
        return True
