"""Request limits of the service: its configuration, the API-key check, the bounded body reader
and the per-replica admission limit that answers 429 instead of queueing without bound.

Why an admission limit inside the replica when Ray Serve already caps `max_ongoing_requests`:
requests over Ray's cap wait in the proxy's queue, and past `max_queued_requests` Ray answers a
plain-text 503. Our limit sits below Ray's cap, so a saturated replica answers at once with an
OpenAI-style 429 (and `Retry-After`) while cheap routes (/health, /metrics) still get through.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from lvlm_hallu.serve.errors import Overloaded, PayloadTooLarge, Unauthorized, UnsupportedMediaType

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


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Bearer-token check; a no-op when the service runs without a key."""
    if not api_key:
        return
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest: the time taken must not reveal how much of the key matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")


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

    Only touched from the replica's event loop, so a plain counter is safe without a lock.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise Overloaded(f"server is at its limit of {self.limit} concurrent requests; retry shortly",
                             retry_after_s=1.0)
        self.active += 1

    def release(self) -> None:
        self.active = max(0, self.active - 1)
