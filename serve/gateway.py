"""The gateway: a light ingress in front of the model replicas that survives their death.

Ray Serve's HTTP proxy answers a request whose replica died with a plain-text 500, and a full
queue with a plain-text 503: not OpenAI's error object, so OpenAI clients cannot read them. The
gateway is the application's ingress instead: a tiny deployment (no model, no CPU reserved) that
forwards each HTTP request to an `LVLMServer` replica through a streaming deployment handle and
relays the answer. When the replica fails or vanishes it answers in OpenAI's shape:
- a request not yet answered gets a 503 `{"error": {"type": "service_unavailable", ...}}`, after
  ONE retry on another replica when the request is idempotent (reads, cancels and non-stream
  chat completions, which have no side effects; never a job submission);
- a stream that already sent its headers gets an error event and `data: [DONE]`, unless its
  `data: [DONE]` was relayed already (the answer is complete and nothing may follow it);
- Ray's back-pressure (queue full) becomes a 503 with Retry-After.
The gateway also counts requests and these failures with `ray.util.metrics`, which Ray exports on
its Prometheus endpoint summed over replicas and kept across replica restarts.

It is also where a hostile or broken client is stopped before it costs anything (`GatewayLimits`):
- the API key is checked from the headers, before the body is read or forwarded (401), so an
  unauthenticated upload never travels to a replica and never holds memory;
- a body over the limit is refused from its Content-Length, or as soon as it passes the limit (413);
- a body must arrive within `body_timeout_s` (408); one still arriving after `upload_grace_s`
  needs one of `max_uploads` slots (429 `too_many_uploads` when they are taken): half-sent
  uploads cannot take every slot, and bodies that arrive at once never wait for one, so
  /health, /ready and authenticated traffic still answer;
- /ready answers 503 within `ready_timeout_s` when no replica answers (restarting, dead, stuck)
  and /health within `health_timeout_s`, in place of waiting for a replica to come back.
The HTTP stack's own limits sit in front (Ray Serve's proxy runs uvicorn with h11): headers are
capped by h11 (16 KiB) and idle keep-alive connections are closed after Serve's
`keep_alive_timeout_s` (serve/app.py `run`).

On the replica side, `asgi_stream` runs one request through the replica's own FastAPI app and
yields the response head, then its body chunks as the app produces them; `asgi_answer` collects
them into one answer. A request that cannot produce a stream (its body never mentions
"stream") takes a plain handle call to `LVLMServer.respond`: a streaming handle call costs the
gateway and the replica several milliseconds of CPU more per request than a unary one
(docs/benchmarks.md, "Gateway hop"), and on a CPU replica that time is taken from the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request  # module level: the route's string annotations resolve here

from lvlm_hallu.serve.errors import Overloaded, PayloadTooLarge, ServiceError, Unavailable
from lvlm_hallu.serve.limits import check_api_key

log = logging.getLogger("serve")
PUBLIC_PATHS = ("/health", "/ready")  # answered without a key (they show no internals without one)


@dataclass(frozen=True)
class GatewayLimits:
    """What the gateway enforces before a request reaches a replica (module docstring)."""

    max_body_bytes: int = 20 * 1024 * 1024
    keys: tuple[str, ...] = ()  # accepted API keys; empty: no authentication
    body_timeout_s: float = 30.0  # the whole body must arrive within this
    max_uploads: int = 16  # slow request bodies arriving at once, over all clients
    upload_grace_s: float = 1.0  # a body that arrives within this takes no upload slot
    ready_timeout_s: float = 0.75  # /ready's answer, 503 included, within a second
    health_timeout_s: float = 5.0


class RequestTimeout(ServiceError):
    status, type, default_code = 408, "invalid_request_error", "request_timeout"

FORWARDED_HEADERS = ("authorization", "content-type", "content-length", "accept", "x-request-id")
REQUEST_ID = "x-request-id"


# -- replica side -----------------------------------------------------------------------------
async def asgi_stream(app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[Any]:
    """Run one HTTP request through an ASGI app: yields {"status", "headers"}, then body chunks."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("gateway", 0), "server": ("replica", 0)}
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()  # the consumer stopped listening: the app sees a disconnect
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _t: messages.put_nowait(None))
    try:
        while True:
            message = await messages.get()
            if message is None:
                task.result()  # the app raised before finishing its answer
                return
            if message["type"] == "http.response.start":
                yield {"status": message["status"],
                       "headers": [(k.decode(), v.decode()) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
    finally:
        gone.set()
        if not task.done():
            task.cancel()


async def asgi_answer(app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> dict:
    """The whole answer of one request through an ASGI app: {"status", "headers", "body"}."""
    items = [item async for item in asgi_stream(app, method, path, query, headers, body)]
    head = items[0] if items else {"status": 500, "headers": []}
    return {**head, "body": b"".join(items[1:])}


def may_stream(body: bytes) -> bool:
    """Whether a request could be answered with a stream: only a JSON body that names "stream",
    or one with a string escape (`"\\u0073tream"` is the same key to a JSON parser). False
    positives only cost the streaming path, which relays any answer."""
    return b'"stream"' in body or b"\\" in body


# -- gateway side -----------------------------------------------------------------------------
def idempotent(method: str, path: str) -> bool:
    """Safe to send twice: no side effect on the server (a job submission creates a job)."""
    return method in ("GET", "HEAD", "DELETE", "OPTIONS") or path == "/v1/chat/completions"


def replica_gone(err: BaseException) -> bool:
    """The replica died or could not be reached (as opposed to answering with an error)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return isinstance(err, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError))


def unavailable_for(err: BaseException) -> ServiceError:
    from ray.serve.exceptions import BackPressureError

    if isinstance(err, BackPressureError):
        return Unavailable("the service is at capacity; retry shortly", code="overloaded", retry_after_s=1.0)
    if replica_gone(err):
        return Unavailable("the model replica serving this request stopped; retry shortly",
                           code="replica_unavailable", retry_after_s=1.0)
    return ServiceError(f"internal error ({type(err).__name__}); the request was not completed", code="internal_error")


DONE = b"data: [DONE]\n\n"


def error_event(err: ServiceError) -> bytes:
    return f"data: {json.dumps(err.body())}\n\n".encode() + DONE


class GatewayMetrics:
    """Counters exported through Ray's metrics agent (summed over gateways, kept across restarts)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("lvlm_gateway_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.failures = Counter("lvlm_gateway_replica_failures",
                                description="Requests whose replica died, was unreachable or was saturated",
                                tag_keys=("kind",))
        self.retries = Counter("lvlm_gateway_retries", description="Idempotent requests retried on another replica")
        self.latency = Histogram("lvlm_gateway_latency_seconds", description="Gateway latency by route",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64], tag_keys=("route",))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def failure(self, kind: str) -> None:
        self.failures.inc(tags={"kind": kind})

    def retry(self) -> None:
        self.retries.inc()


def route_label(path: str) -> str:
    """A bounded label: known routes by name, job ids collapsed, everything else "unmatched"."""
    if path.startswith("/v1/eval/jobs/"):
        return "/v1/eval/jobs/{id}"
    known = ("/v1/chat/completions", "/v1/models", "/v1/interventions", "/v1/eval/jobs", "/health", "/ready",
             "/metrics", "/docs", "/openapi.json")
    return path if path in known else "unmatched"


class Forwarder:
    """The gateway's logic as a plain class (unit-tested with a fake handle): relay one request
    to a replica through `server.forward.remote(...)` (a streaming handle call) and turn replica
    failures into OpenAI-shaped answers."""

    def __init__(self, server: Any, max_body_bytes: int | GatewayLimits, metrics: Any = None, unary: Any = None):
        # server: the streaming handle (`forward`); unary: the plain one (`respond`), if any
        limits = max_body_bytes if isinstance(max_body_bytes, GatewayLimits) else GatewayLimits(max_body_bytes)
        self.server, self.limits, self.metrics, self.unary = server, limits, metrics, unary
        self.max_body_bytes = limits.max_body_bytes
        self.uploads = 0  # bodies arriving now (this gateway's event loop only: no lock)

    async def _body(self, http: Any) -> bytes:
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of "
                                  f"{self.max_body_bytes} bytes")
        if declared == "0" or (declared is None and "transfer-encoding" not in http.headers):
            return b""  # no body to wait for
        started = time.monotonic()
        read = asyncio.ensure_future(self._read(http))
        try:
            # A body that arrives within the grace period (nearly all of them) takes no upload
            # slot; a slower one needs one of the max_uploads slots, or it is refused.
            done, _ = await asyncio.wait({read}, timeout=min(self.limits.upload_grace_s, self.limits.body_timeout_s))
            if done:
                return read.result()
            if self.uploads >= self.limits.max_uploads:
                raise Overloaded(f"{self.uploads} slow request bodies are arriving already; retry shortly",
                                 code="too_many_uploads", retry_after_s=1.0)
            self.uploads += 1
            try:
                left = self.limits.body_timeout_s - (time.monotonic() - started)
                return await asyncio.wait_for(asyncio.shield(read), timeout=max(0.0, left))
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.limits.body_timeout_s:g} s") from None
            finally:
                self.uploads -= 1
        finally:
            if not read.done():
                read.cancel()

    async def _read(self, http: Any) -> bytes:
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _count(self, what: str, **tags: Any) -> None:
        if self.metrics is not None:
            getattr(self.metrics, what)(**tags)

    async def forward(self, http: Any) -> Any:
        started, path, method = time.perf_counter(), http.url.path, http.method
        serve_id = _serve_request_id()  # Ray's proxy adds it to the response (the client's own, if sent)
        request_id = serve_id or http.headers.get(REQUEST_ID) or uuid.uuid4().hex
        response = await self._forward(http, method, path, request_id)
        if serve_id is None:
            response.headers[REQUEST_ID] = request_id
        self._count("observe", route=route_label(path), status=response.status_code,
                    seconds=time.perf_counter() - started)
        return response

    async def _forward(self, http: Any, method: str, path: str, request_id: str) -> Any:
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        try:
            if path not in PUBLIC_PATHS:  # the key first: an unauthenticated body is never read
                check_api_key(http.headers.get("authorization"), self.limits.keys)
            body = await self._body(http)
        except ServiceError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers())
        headers = [(k, v) for k, v in http.headers.items() if k in FORWARDED_HEADERS and k != REQUEST_ID]
        headers.append((REQUEST_ID, request_id))
        if method == "GET" and path in PUBLIC_PATHS:
            return await self._probe(method, path, http.url.query, headers, body)
        attempts = 2 if idempotent(method, path) else 1
        unary = self.unary is not None and not may_stream(body)
        for attempt in range(attempts):
            try:
                if unary:
                    answer = await self.unary.respond.remote(method, path, http.url.query, headers, body)
                    return Response(answer["body"], status_code=answer["status"], headers=_plain(answer["headers"]))
                stream = self.server.forward.remote(method, path, http.url.query, headers, body)
                head = await stream.__anext__()
                content_type = dict(head["headers"]).get("content-type", "")
                if content_type.startswith("text/event-stream"):
                    return StreamingResponse(self._relay(stream, request_id), status_code=head["status"],
                                             headers=_plain(head["headers"]))
                content = b"".join([chunk async for chunk in stream])
                return Response(content, status_code=head["status"], headers=_plain(head["headers"]))
            except Exception as err:  # noqa: BLE001 - every failure gets OpenAI's shape
                error = unavailable_for(err)
                self._count("failure", kind=error.code or "internal_error")
                if replica_gone(err) and attempt + 1 < attempts:
                    self._count("retry")
                    log.warning("request %s: replica failed (%s); retrying once", request_id, type(err).__name__)
                    continue
                log.error("request %s failed in the replica: %r", request_id, err)
                return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    async def _probe(self, method: str, path: str, query: str, headers: list, body: bytes) -> Any:
        """/ready and /health with a deadline: 503 at once when no replica answers in time."""
        from fastapi.responses import JSONResponse, Response

        timeout = self.limits.ready_timeout_s if path == "/ready" else self.limits.health_timeout_s
        try:
            if self.unary is not None:
                call = self.unary.respond.remote(method, path, query, headers, body)
            else:
                call = asgi_answer_of(self.server.forward.remote(method, path, query, headers, body))
            answer = await asyncio.wait_for(_awaitable(call), timeout=timeout)
            return Response(answer["body"], status_code=answer["status"], headers=_plain(answer["headers"]))
        except Exception as err:  # noqa: BLE001 - a timeout or a dead replica: not ready
            if not isinstance(err, asyncio.TimeoutError):
                self._count("failure", kind=unavailable_for(err).code or "internal_error")
            error = Unavailable(f"no model replica answered within {timeout:g} s", code="replica_unavailable",
                                retry_after_s=1.0)
            key = "ready" if path == "/ready" else "status"
            return JSONResponse({key: False if path == "/ready" else "unavailable", **error.body()},
                                status_code=503, headers=error.headers())

    async def _relay(self, stream: Any, request_id: str) -> AsyncIterator[bytes]:
        tail = b""  # the last bytes relayed: a stream that already ended with [DONE] is complete
        try:
            async for chunk in stream:
                tail = (tail + chunk)[-len(DONE):]
                yield chunk
        except Exception as err:  # noqa: BLE001 - headers are sent: report in-band, OpenAI style
            if tail == DONE:  # the replica died after the answer: nothing may follow [DONE]
                log.warning("request %s: replica gone after the stream's end (%r)", request_id, err)
                return
            error = unavailable_for(err)
            self._count("failure", kind=error.code or "internal_error")
            log.error("request %s: stream broken by %r", request_id, err)
            yield error_event(error)


async def asgi_answer_of(stream: Any) -> dict:
    """A streaming handle call's items collected into one answer, as `asgi_answer` does."""
    items = [item async for item in stream]
    head = items[0] if items else {"status": 500, "headers": []}
    return {**head, "body": b"".join(items[1:])}


async def _awaitable(call: Any) -> Any:
    return await call


def _gateway_class():
    from ray import serve

    @serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class Gateway:
        def __init__(self, server: Any, limits: GatewayLimits):
            self.forwarder = Forwarder(server.options(stream=True), limits, GatewayMetrics(), unary=server)

        def __serve_build_asgi_app__(self):
            app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
            from lvlm_hallu.serve.playground import mount_page

            mount_page(app, bool(self.forwarder.limits.keys))  # the page needs no key and no replica

            async def forward(http: Request, path: str):
                return await self.forwarder.forward(http)

            # The class travels to the replica by value (cloudpickle) without this module's
            # globals, so the string annotations would not resolve: give FastAPI the real types.
            forward.__annotations__ = {"http": Request, "path": str}
            app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])(forward)
            return app

    return Gateway


def bind_gateway(server: Any, config: Any) -> Any:
    """The gateway bound in front of the LVLMServer deployment `server`."""
    replicas = max(config.replicas, config.max_replicas or 0)
    limits = GatewayLimits(max_body_bytes=config.limits.max_body_bytes, keys=config.keys(),
                           body_timeout_s=config.body_timeout_s, max_uploads=config.max_uploads)
    # uploads in progress get slots of their own: they cannot starve the replicas' traffic
    capacity = config.max_ongoing_requests * replicas + limits.max_uploads
    return _gateway_class().options(
        max_ongoing_requests=capacity,  # the default of 5 would throttle every replica behind it
        max_queued_requests=config.max_queued_requests,
    ).bind(server, limits)


def _plain(headers: list[tuple[str, str]]) -> dict[str, str]:
    # content-length is recomputed by the gateway's response; hop-by-hop headers stay behind
    return {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding", "connection")}


def _serve_request_id() -> str | None:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - outside a Serve request (tests)
        return None


__all__ = ["GatewayLimits", "asgi_answer", "asgi_stream", "bind_gateway", "idempotent", "may_stream", "replica_gone",
           "route_label"]
