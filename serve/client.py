"""Typed SDK for the service: a sync `Client` and an async `AsyncClient` over httpx.

    with Client("http://127.0.0.1:8000") as client:
        reply = client.chat("cat.png", "Describe this image.", interventions="vhr+var")
        print(reply.text, reply.intervention_report.details)
        for delta in client.stream(image, "What is in the image?"):
            print(delta, end="")
        job = client.wait(client.submit_eval("pope", limit=60).id, timeout=600)

Images may be PIL images, paths, raw bytes, or URLs (data: or http(s)); they travel as data URLs
in OpenAI's `image_url` content parts. Every non-2xx answer raises a subclass of `APIError`
carrying the server's OpenAI-style error object. Imports only httpx, pydantic and serve.schema
(PIL lazily, only when handed a PIL image) so it works in a process without torch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx

from serve.schema import (
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


class RateLimitError(APIError):
    """429: the replica is saturated; retry later."""


class OverloadedError(RateLimitError):
    """503: the service (or Ray Serve's queue in front of it) is overloaded or unavailable."""


class APIConnectionError(APIError):
    """The request never got an HTTP answer (refused connection, timeout)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
    413: PayloadTooLargeError, 422: BadRequestError, 429: RateLimitError, 503: OverloadedError,
}


def _error_from(status: int, payload: Any, fallback_text: str) -> APIError:
    body = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(body, dict) and "message" in body:
        err = ErrorBody.model_validate(body)
    else:  # not our error object (a proxy in between, Ray's own 503 ...): keep its text
        err = ErrorBody(message=fallback_text.strip() or f"HTTP {status}", type="api_error")
    cls = _BY_STATUS.get(status, APIError)
    return cls(err.message, status_code=status, type=err.type, param=err.param, code=err.code)


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        payload = response.json()
    except ValueError:
        payload = None
    raise _error_from(response.status_code, payload, response.text)


# -- request building (shared by both clients) ------------------------------------------------
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"))


def image_data_url(image: Any) -> str:
    """A data URL for a PIL image, a path, raw bytes, or a URL string (returned unchanged)."""
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif hasattr(image, "save"):  # a PIL image; encoded losslessly
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"image must be a PIL image, a path, bytes or a URL, not {type(image).__name__}")
    mime = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if mime is None:
        mime = "image/webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chat_body(image: Any, prompt: str, *, interventions: Any = None, max_tokens: int = 64,
              temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
              stop: str | list[str] | None = None, model: str | None = None,
              stream: bool = False, system: str | None = None) -> dict[str, Any]:
    """The JSON body of one chat-completions request with at most one image."""
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
    """One line of OpenAI-style server-sent events: a payload dict, `_DONE`, or None (no data)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    payload = json.loads(data)
    if "error" in payload:  # an error after the stream started (headers were already 200)
        raise _error_from(500, payload, data)
    return payload


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# -- sync client ------------------------------------------------------------------------------
class Client:
    """Blocking client. `api_key` defaults to $LVLM_API_KEY; use as a context manager or close()."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 timeout: float = 120.0, http_client: httpx.Client | None = None):
        api_key = api_key if api_key is not None else os.environ.get("LVLM_API_KEY")
        self._http = http_client or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._http.headers.update(_headers(api_key))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise APIConnectionError(f"{type(err).__name__}: {err}") from err
        _raise_for_status(response)
        return response.json()

    def chat(self, image: Any, prompt: str, *, interventions: Any = None, max_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop: str | list[str] | None = None, model: str | None = None,
             system: str | None = None) -> ChatCompletion:
        body = chat_body(image, prompt, interventions=interventions, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, stop=stop, model=model, system=system)
        return ChatCompletion.model_validate(self._request("POST", "/v1/chat/completions", json=body))

    def stream_chunks(self, image: Any, prompt: str, **kwargs: Any) -> Iterator[ChatCompletionChunk]:
        """Every chunk of a streamed completion (the last ones carry usage and the report)."""
        body = chat_body(image, prompt, stream=True, **kwargs)
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if not response.is_success:
                    response.read()
                    _raise_for_status(response)
                for line in response.iter_lines():
                    event = _sse_event(line)
                    if event is _DONE:
                        return
                    if event is not None:
                        yield ChatCompletionChunk.model_validate(event)
        except httpx.HTTPError as err:
            raise APIConnectionError(f"{type(err).__name__}: {err}") from err

    def stream(self, image: Any, prompt: str, **kwargs: Any) -> Iterator[str]:
        """The text deltas of a streamed completion, as they are decoded."""
        for chunk in self.stream_chunks(image, prompt, **kwargs):
            for choice in chunk.choices:
                if choice.delta.content:
                    yield choice.delta.content

    def list_models(self) -> list[ModelCard]:
        return ModelList.model_validate(self._request("GET", "/v1/models")).data

    def list_interventions(self) -> list[InterventionInfo]:
        return InterventionList.model_validate(self._request("GET", "/v1/interventions")).data

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def submit_eval(self, kind: str, **kwargs: Any) -> EvalJob:
        """Start a CHAIR or POPE job; kwargs as `eval_body` (limit, interventions, options ...)."""
        return EvalJob.model_validate(self._request("POST", "/v1/eval/jobs", json=eval_body(kind, **kwargs)))

    def job(self, job_id: str) -> EvalJob:
        return EvalJob.model_validate(self._request("GET", f"/v1/eval/jobs/{job_id}"))

    def jobs(self) -> list[EvalJob]:
        return EvalJobList.model_validate(self._request("GET", "/v1/eval/jobs")).data

    def cancel(self, job_id: str) -> EvalJob:
        return EvalJob.model_validate(self._request("DELETE", f"/v1/eval/jobs/{job_id}"))

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
                 timeout: float = 120.0, http_client: httpx.AsyncClient | None = None):
        api_key = api_key if api_key is not None else os.environ.get("LVLM_API_KEY")
        self._http = http_client or httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)
        self._http.headers.update(_headers(api_key))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise APIConnectionError(f"{type(err).__name__}: {err}") from err
        _raise_for_status(response)
        return response.json()

    async def chat(self, image: Any, prompt: str, *, interventions: Any = None, max_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop: str | list[str] | None = None, model: str | None = None,
                   system: str | None = None) -> ChatCompletion:
        body = chat_body(image, prompt, interventions=interventions, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, stop=stop, model=model, system=system)
        return ChatCompletion.model_validate(await self._request("POST", "/v1/chat/completions", json=body))

    async def stream_chunks(self, image: Any, prompt: str, **kwargs: Any) -> AsyncIterator[ChatCompletionChunk]:
        body = chat_body(image, prompt, stream=True, **kwargs)
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if not response.is_success:
                    await response.aread()
                    _raise_for_status(response)
                async for line in response.aiter_lines():
                    event = _sse_event(line)
                    if event is _DONE:
                        return
                    if event is not None:
                        yield ChatCompletionChunk.model_validate(event)
        except httpx.HTTPError as err:
            raise APIConnectionError(f"{type(err).__name__}: {err}") from err

    async def stream(self, image: Any, prompt: str, **kwargs: Any) -> AsyncIterator[str]:
        async for chunk in self.stream_chunks(image, prompt, **kwargs):
            for choice in chunk.choices:
                if choice.delta.content:
                    yield choice.delta.content

    async def list_models(self) -> list[ModelCard]:
        return ModelList.model_validate(await self._request("GET", "/v1/models")).data

    async def list_interventions(self) -> list[InterventionInfo]:
        return InterventionList.model_validate(await self._request("GET", "/v1/interventions")).data

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/health")

    async def submit_eval(self, kind: str, **kwargs: Any) -> EvalJob:
        return EvalJob.model_validate(await self._request("POST", "/v1/eval/jobs", json=eval_body(kind, **kwargs)))

    async def job(self, job_id: str) -> EvalJob:
        return EvalJob.model_validate(await self._request("GET", f"/v1/eval/jobs/{job_id}"))

    async def jobs(self) -> list[EvalJob]:
        return EvalJobList.model_validate(await self._request("GET", "/v1/eval/jobs")).data

    async def cancel(self, job_id: str) -> EvalJob:
        return EvalJob.model_validate(await self._request("DELETE", f"/v1/eval/jobs/{job_id}"))

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
    "APIConnectionError", "APIError", "AsyncClient", "AuthenticationError", "BadRequestError", "Client",
    "NotFoundError", "OverloadedError", "PayloadTooLargeError", "RateLimitError", "image_data_url",
]
