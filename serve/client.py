"""Typed SDK for the service: a sync `Client` and an async `AsyncClient` over httpx.

    with Client("http://127.0.0.1:8000") as client:
        reply = client.chat("cat.png", "Describe this image.", interventions="vhr+var")
        print(reply.text, reply.intervention_report.details)
        for delta in client.stream(image, "What is in the image?"):
            print(delta, end="")
        job = client.wait(client.submit_eval("pope", limit=60).id, timeout=600)

Images may be PIL images, paths, raw bytes, or URLs (data: or http(s)); they travel as data URLs
in OpenAI's `image_url` content parts; anything else raises `InvalidImageError`. Every non-2xx
answer raises a subclass of `APIError` carrying the server's OpenAI-style error object; a
request that never got an answer raises `APIConnectionError`, or `APITimeoutError` when it ran
out of time. The base URL may end in `/v1` (the form OpenAI clients use).

Retries (`Retry`, on by default: 2 retries, exponential backoff from 0.5 s, honouring
Retry-After): failed connections, 429s and 503 `overloaded` are retried for every request, since
the server never started on them; any other 503 (`replica_unavailable`: the replica died, maybe
after creating the job) and a connection lost after the request was sent are retried only for
idempotent calls (reads, chat) — never a job submission, never a stream after its first byte.
A read or write timeout is not retried unless `Retry(retry_timeouts=True)`: the server may still
be generating the answer, and sending it again would run it twice. A 503 that names a state no
retry changes (`eval_jobs_disabled`) is final, and is a `ServiceUnavailableError`, not a rate limit.

Every answer the SDK cannot read (a body that is not JSON, an event that is not an object, a
shape that does not validate) raises an `APIError` (`ResponseFormatError`), and a stream that
ends without `data: [DONE]` raises `IncompleteStreamError`: a cut stream is never returned as
a complete answer.
Imports only httpx, pydantic and serve.schema (PIL lazily, only when handed a PIL image) so it
works in a process without torch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import httpx

from lvlm_hallu.serve.schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ErrorBody,
    EvalJob,
    EvalJobList,
    InterventionInfo,
    InterventionList,
    ModelCard,
    ModelList,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


# -- errors -----------------------------------------------------------------------------------
class APIError(Exception):
    """The service answered with an error (or could not be reached: `status_code` is None)."""

    def __init__(self, message: str, *, status_code: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message if status_code is None else f"{status_code}: {message}")
        self.message, self.status_code, self.type, self.param, self.code = message, status_code, type, param, code


class BadRequestError(APIError):
    """400: malformed body, bad image, unknown intervention, out-of-range parameter, prompt too long."""


class AuthenticationError(APIError):
    """401: missing or wrong API key."""


class NotFoundError(APIError):
    """404: unknown route or job id."""


class PayloadTooLargeError(APIError):
    """413: body or image over the server's limits (decompression bombs included)."""


class ConflictError(APIError):
    """409: the request conflicts with the resource's state (resuming a job that is not failed)."""


class RateLimitError(APIError):
    """429: the replica is saturated (or too many uploads are arriving); retry later."""


class ServiceUnavailableError(APIError):
    """503: the service cannot answer this now (`code` says why: eval_jobs_disabled is final)."""


class OverloadedError(RateLimitError, ServiceUnavailableError):
    """503 that a retry may cure: overloaded, a replica restarting, or a proxy's plain-text 503."""


class APIConnectionError(APIError):
    """The request never got an HTTP answer (refused connection, connection lost)."""


class APITimeoutError(APIConnectionError):
    """The request ran out of time (connect, read or write timeout)."""


class IncompleteStreamError(APIConnectionError):
    """A stream ended without `data: [DONE]`: the answer is cut, not complete."""


class ResponseFormatError(APIError):
    """The server's answer could not be read (not JSON, or not the documented shape)."""


class RequestTimeoutError(APIError):
    """408: the request body did not reach the server in time."""


class InvalidImageError(APIError, ValueError):
    """The image argument is not a PIL image, an existing file, bytes or a data:/http(s) URL."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
    408: RequestTimeoutError, 409: ConflictError, 413: PayloadTooLargeError, 422: BadRequestError,
    429: RateLimitError, 503: OverloadedError,
}
# 503 codes that say the service is configured so: no retry changes them (serve/app.py)
FINAL_503_CODES = frozenset({"eval_jobs_disabled"})


# error.type -> HTTP status, for errors that arrive inside a stream (its headers said 200)
_STATUS_OF_TYPE = {"invalid_request_error": 400, "authentication_error": 401, "not_found_error": 404,
                   "rate_limit_error": 429, "service_unavailable": 503}


def _error_from(status: int, payload: Any, fallback_text: str) -> APIError:
    body = payload.get("error") if isinstance(payload, dict) else None
    try:
        err = ErrorBody.model_validate(body) if isinstance(body, dict) and "message" in body else None
    except ValueError:  # pydantic's ValidationError: an error object of the wrong shape
        err = None
    if err is None:  # not our error object (a proxy in between, Ray's own 500/503 ...): keep its text
        err = ErrorBody(message=fallback_text.strip()[:500] or f"HTTP {status}", type="api_error")
    cls = _BY_STATUS.get(status, APIError)
    if status == 503 and err.code in FINAL_503_CODES:
        cls = ServiceUnavailableError
    return cls(err.message, status_code=status, type=err.type, param=err.param, code=err.code)


def _transport_error(err: httpx.HTTPError) -> APIConnectionError:
    cls = APITimeoutError if isinstance(err, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        payload = response.json()
    except ValueError:
        payload = None
    raise _error_from(response.status_code, payload, response.text)


def _json(response: httpx.Response) -> Any:
    """The JSON body of a successful answer; an unreadable one is a `ResponseFormatError`."""
    try:
        return response.json()
    except ValueError as err:
        raise ResponseFormatError(f"the server's answer is not JSON ({err}): {response.text[:200]!r}",
                                  status_code=response.status_code) from None


def _validate(model: Any, payload: Any) -> Any:
    """`model.model_validate(payload)`, with a failure as a `ResponseFormatError`."""
    from pydantic import ValidationError

    try:
        return model.model_validate(payload)
    except ValidationError as err:
        raise ResponseFormatError(f"the server's answer is not a valid {model.__name__}: "
                                  f"{err.errors()[0]['msg'] if err.errors() else err}") from None


# -- request building (shared by both clients) ------------------------------------------------
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"))


def image_data_url(image: Any) -> str:
    """A data URL for a PIL image, a path, raw bytes, or a URL string (returned unchanged)."""
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            data = Path(image).read_bytes()
        except OSError as err:
            raise InvalidImageError(f"cannot read image file {str(image)[:200]!r}: {err.strerror or err}") from err
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif hasattr(image, "save"):  # a PIL image; encoded losslessly
        import io

        buf = io.BytesIO()
        try:
            image.save(buf, format="PNG")
        except Exception as err:  # noqa: BLE001 - whatever PIL says, the argument was not usable
            raise InvalidImageError(f"cannot encode the image as PNG: {err}") from err
        data = buf.getvalue()
    else:
        raise InvalidImageError(f"image must be a PIL image, a path, bytes or a URL, not {type(image).__name__}")
    if not data:
        raise InvalidImageError("image is empty (0 bytes)")
    mime = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if mime is None:
        mime = "image/webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chat_body(image: Any, prompt: str, *, interventions: Any = None, max_tokens: int = 64,
              temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
              stop: str | list[str] | None = None, model: str | None = None,
              stream: bool = False, system: str | None = None, logprobs: int | None = None) -> dict[str, Any]:
    """The JSON body of one chat-completions request with at most one image. `logprobs=k` asks
    for each answer token's log-probability and its k most likely alternatives (0..20)."""
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    content.append({"type": "text", "text": prompt})
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                            "top_p": top_p, "stream": stream}
    for key, value in (("model", model), ("seed", seed), ("stop", stop), ("interventions", interventions)):
        if value is not None:
            body[key] = value
    if logprobs is not None:
        body["logprobs"], body["top_logprobs"] = True, logprobs
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def eval_body(kind: str, *, limit: int = 50, interventions: Any = None, max_tokens: int | None = None,
              seed: int = 0, batch_size: int = 8, options: dict[str, Any] | None = None,
              **more_options: Any) -> dict[str, Any]:
    """The body of POST /v1/eval/jobs; kind-specific options as `options={...}` or keywords."""
    return {"kind": kind, "limit": limit, "interventions": interventions, "max_tokens": max_tokens,
            "seed": seed, "batch_size": batch_size, "options": {**(options or {}), **more_options}}


_DONE = object()


def _sse_event(line: str) -> Any:
    """One line of OpenAI-style server-sent events: a payload dict, `_DONE`, or None (no data).
    An event that is not a JSON object is a `ResponseFormatError`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    try:
        payload = json.loads(data)
    except ValueError as err:
        raise ResponseFormatError(f"stream event is not JSON ({err}): {data[:200]!r}") from None
    if not isinstance(payload, dict):
        raise ResponseFormatError(f"stream event is not a JSON object: {data[:200]!r}")
    if "error" in payload:  # an error after the stream started (headers were already 200)
        kind = payload["error"].get("type") if isinstance(payload["error"], dict) else None
        raise _error_from(_STATUS_OF_TYPE.get(kind, 500), payload, data)
    return payload


def _chunk(event: dict) -> ChatCompletionChunk:
    return _validate(ChatCompletionChunk, event)


def _cut_stream() -> IncompleteStreamError:
    return IncompleteStreamError("the stream ended without [DONE]: the answer is incomplete")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def service_root(base_url: str) -> str:
    """The service root for a base URL given either way: "http://h:8000" or "http://h:8000/v1"."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


# 503 codes (serve/gateway.py) that prove the request never reached a replica: Ray's queue was
# full. `replica_unavailable` proves nothing (the replica may have died after acting), nor does a
# 503 without our error object.
NOT_STARTED_503_CODES = frozenset({"overloaded"})


def _final_503(response: httpx.Response) -> bool:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("code") in FINAL_503_CODES


def _never_started(response: httpx.Response) -> bool:
    """The answer says the server did nothing with the request, so sending it again is safe even
    when it is not idempotent: a 429 (refused at admission) or a 503 with a not-started code."""
    if response.status_code == 429:
        return True
    if response.status_code != 503:
        return False
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        return False
    return isinstance(error, dict) and error.get("code") in NOT_STARTED_503_CODES


@dataclass(frozen=True)
class Retry:
    """When and how long to wait before trying a request again (`Retry(max_retries=0)`: never)."""

    max_retries: int = 2
    backoff_s: float = 0.5  # first wait; doubles each retry
    max_backoff_s: float = 8.0
    statuses: tuple[int, ...] = (429, 503)
    retry_timeouts: bool = False  # re-send after a read/write timeout (the first may still be running)

    def wait_s(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds before retry number `attempt` (0-based): Retry-After when the server sent one."""
        after = response.headers.get("retry-after", "") if response is not None else ""
        if after.replace(".", "", 1).isdigit():
            return min(float(after), self.max_backoff_s)
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)

    def decide(self, attempt: int, *, response: httpx.Response | None = None, error: httpx.HTTPError | None = None,
               idempotent: bool = True) -> float | None:
        """Seconds to wait before retrying, or None to give up and report. A request that is not
        idempotent is sent again only when it cannot have had an effect the first time."""
        if attempt >= self.max_retries:
            return None
        if response is not None:
            retryable = response.status_code in self.statuses and (idempotent or _never_started(response))
            if retryable and response.status_code == 503 and _final_503(response):
                return None
            return self.wait_s(attempt, response) if retryable else None
        # A connection that never opened means the server never saw the request: always safe.
        never_sent = isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
        if never_sent:
            return self.wait_s(attempt)
        if isinstance(error, (httpx.ReadTimeout, httpx.WriteTimeout)) and not self.retry_timeouts:
            return None  # the server may still be answering the first one
        if idempotent and isinstance(error, httpx.TransportError):
            return self.wait_s(attempt)
        return None


def _retrying(retry: Retry, send: Callable[[], httpx.Response], *, idempotent: bool) -> httpx.Response:
    attempt = 0
    while True:
        try:
            response = send()
        except httpx.HTTPError as err:
            wait = retry.decide(attempt, error=err, idempotent=idempotent)
            if wait is None:
                raise _transport_error(err) from err
        else:
            wait = retry.decide(attempt, response=response, idempotent=idempotent)
            if wait is None:
                return response
        time.sleep(wait)
        attempt += 1


async def _async_retrying(retry: Retry, send: Callable[[], Any], *, idempotent: bool) -> httpx.Response:
    attempt = 0
    while True:
        try:
            response = await send()
        except httpx.HTTPError as err:
            wait = retry.decide(attempt, error=err, idempotent=idempotent)
            if wait is None:
                raise _transport_error(err) from err
        else:
            wait = retry.decide(attempt, response=response, idempotent=idempotent)
            if wait is None:
                return response
        await asyncio.sleep(wait)
        attempt += 1


# -- sync client ------------------------------------------------------------------------------
class Client:
    """Blocking client. `api_key` defaults to $LVLM_API_KEY; use as a context manager or close()."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 timeout: float = 120.0, retry: Retry | None = None, http_client: httpx.Client | None = None):
        api_key = api_key if api_key is not None else os.environ.get("LVLM_API_KEY")
        self._http = http_client or httpx.Client(base_url=service_root(base_url), timeout=timeout)
        self._http.headers.update(_headers(api_key))
        self.retry = retry or Retry()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> Any:
        response = _retrying(self.retry, lambda: self._http.request(method, path, **kwargs), idempotent=idempotent)
        _raise_for_status(response)
        return _json(response)

    def chat(self, image: Any, prompt: str, *, interventions: Any = None, max_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop: str | list[str] | None = None, model: str | None = None,
             system: str | None = None, logprobs: int | None = None) -> ChatCompletion:
        body = chat_body(image, prompt, interventions=interventions, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, stop=stop, model=model, system=system, logprobs=logprobs)
        return _validate(ChatCompletion, self._request("POST", "/v1/chat/completions", json=body))

    def stream_chunks(self, image: Any, prompt: str, **kwargs: Any) -> Iterator[ChatCompletionChunk]:
        """Every chunk of a streamed completion (the last ones carry usage and the report)."""
        body = chat_body(image, prompt, stream=True, **kwargs)
        attempt, started = 0, False
        while True:
            try:
                with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                    if not response.is_success:
                        response.read()
                        wait = self.retry.decide(attempt, response=response)
                        if wait is None:
                            _raise_for_status(response)
                    else:
                        started = True  # from the first byte on, a retry could repeat text
                        for line in response.iter_lines():
                            event = _sse_event(line)
                            if event is _DONE:
                                return
                            if event is not None:
                                yield _chunk(event)
                        raise _cut_stream()
            except httpx.HTTPError as err:
                wait = None if started else self.retry.decide(attempt, error=err)
                if wait is None:
                    raise _transport_error(err) from err
            time.sleep(wait)
            attempt += 1

    def stream(self, image: Any, prompt: str, **kwargs: Any) -> Iterator[str]:
        """The text deltas of a streamed completion, as they are decoded."""
        for chunk in self.stream_chunks(image, prompt, **kwargs):
            for choice in chunk.choices:
                if choice.delta.content:
                    yield choice.delta.content

    def list_models(self) -> list[ModelCard]:
        return _validate(ModelList, self._request("GET", "/v1/models")).data

    def list_interventions(self) -> list[InterventionInfo]:
        return _validate(InterventionList, self._request("GET", "/v1/interventions")).data

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def submit_eval(self, kind: str, **kwargs: Any) -> EvalJob:
        """Start a CHAIR or POPE job; kwargs as `eval_body` (limit, interventions, options ...)."""
        return _validate(EvalJob, self._request("POST", "/v1/eval/jobs", idempotent=False,
                                                    json=eval_body(kind, **kwargs)))

    def job(self, job_id: str) -> EvalJob:
        return _validate(EvalJob, self._request("GET", f"/v1/eval/jobs/{job_id}"))

    def jobs(self) -> list[EvalJob]:
        return _validate(EvalJobList, self._request("GET", "/v1/eval/jobs")).data

    def cancel(self, job_id: str) -> EvalJob:
        return _validate(EvalJob, self._request("DELETE", f"/v1/eval/jobs/{job_id}"))

    def resume(self, job_id: str) -> EvalJob:
        """Continue a failed or cancelled job from its results file (409 `ConflictError` otherwise)."""
        return _validate(EvalJob, self._request("POST", f"/v1/eval/jobs/{job_id}/resume", idempotent=False))

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 1.0) -> EvalJob:
        """Poll until the job finishes; raises TimeoutError (the job keeps running) after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout:.0f}s "
                                   f"({job.progress.done}/{job.progress.total})")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


# -- async client -----------------------------------------------------------------------------
class AsyncClient:
    """The same API as `Client`, awaitable; `stream` is an async iterator."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 timeout: float = 120.0, retry: Retry | None = None, http_client: httpx.AsyncClient | None = None):
        api_key = api_key if api_key is not None else os.environ.get("LVLM_API_KEY")
        self._http = http_client or httpx.AsyncClient(base_url=service_root(base_url), timeout=timeout)
        self._http.headers.update(_headers(api_key))
        self.retry = retry or Retry()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> Any:
        response = await _async_retrying(self.retry, lambda: self._http.request(method, path, **kwargs),
                                         idempotent=idempotent)
        _raise_for_status(response)
        return _json(response)

    async def chat(self, image: Any, prompt: str, *, interventions: Any = None, max_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop: str | list[str] | None = None, model: str | None = None,
                   system: str | None = None, logprobs: int | None = None) -> ChatCompletion:
        body = chat_body(image, prompt, interventions=interventions, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, stop=stop, model=model, system=system, logprobs=logprobs)
        return _validate(ChatCompletion, await self._request("POST", "/v1/chat/completions", json=body))

    async def stream_chunks(self, image: Any, prompt: str, **kwargs: Any) -> AsyncIterator[ChatCompletionChunk]:
        body = chat_body(image, prompt, stream=True, **kwargs)
        attempt, started = 0, False
        while True:
            try:
                async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                    if not response.is_success:
                        await response.aread()
                        wait = self.retry.decide(attempt, response=response)
                        if wait is None:
                            _raise_for_status(response)
                    else:
                        started = True  # from the first byte on, a retry could repeat text
                        async for line in response.aiter_lines():
                            event = _sse_event(line)
                            if event is _DONE:
                                return
                            if event is not None:
                                yield _chunk(event)
                        raise _cut_stream()
            except httpx.HTTPError as err:
                wait = None if started else self.retry.decide(attempt, error=err)
                if wait is None:
                    raise _transport_error(err) from err
            await asyncio.sleep(wait)
            attempt += 1

    async def stream(self, image: Any, prompt: str, **kwargs: Any) -> AsyncIterator[str]:
        async for chunk in self.stream_chunks(image, prompt, **kwargs):
            for choice in chunk.choices:
                if choice.delta.content:
                    yield choice.delta.content

    async def list_models(self) -> list[ModelCard]:
        return _validate(ModelList, await self._request("GET", "/v1/models")).data

    async def list_interventions(self) -> list[InterventionInfo]:
        return _validate(InterventionList, await self._request("GET", "/v1/interventions")).data

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/health")

    async def submit_eval(self, kind: str, **kwargs: Any) -> EvalJob:
        return _validate(EvalJob, await self._request("POST", "/v1/eval/jobs", idempotent=False,
                                                          json=eval_body(kind, **kwargs)))

    async def job(self, job_id: str) -> EvalJob:
        return _validate(EvalJob, await self._request("GET", f"/v1/eval/jobs/{job_id}"))

    async def jobs(self) -> list[EvalJob]:
        return _validate(EvalJobList, await self._request("GET", "/v1/eval/jobs")).data

    async def cancel(self, job_id: str) -> EvalJob:
        return _validate(EvalJob, await self._request("DELETE", f"/v1/eval/jobs/{job_id}"))

    async def resume(self, job_id: str) -> EvalJob:
        return _validate(EvalJob, await self._request("POST", f"/v1/eval/jobs/{job_id}/resume", idempotent=False))

    async def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 1.0) -> EvalJob:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout:.0f}s "
                                   f"({job.progress.done}/{job.progress.total})")
            await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "AsyncClient", "AuthenticationError", "BadRequestError",
    "Client", "ConflictError", "IncompleteStreamError", "InvalidImageError", "NotFoundError", "OverloadedError",
    "PayloadTooLargeError", "RateLimitError", "RequestTimeoutError", "ResponseFormatError", "Retry",
    "ServiceUnavailableError", "image_data_url", "service_root",
]
