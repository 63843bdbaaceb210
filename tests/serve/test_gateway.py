"""The gateway (serve/gateway.py) without Ray: the replica-side ASGI relay against the real app,
and the forwarding logic against a fake deployment handle whose replica dies on command. The
same path under Ray, with a replica killed under load, is in test_replica_death.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from lvlm_hallu.serve.app import Service, build_app
from lvlm_hallu.serve.config import ServeConfig
from lvlm_hallu.serve.gateway import Forwarder, asgi_answer, asgi_stream, idempotent, may_stream, route_label
from tests.serve.conftest import FakePipeline
from tests.serve.test_app import AUTH, KEY, LIMITS, body


@pytest.fixture
def replica_app():
    return build_app(Service(FakePipeline(), ServeConfig(model="fake", api_key=KEY, limits=LIMITS)))


def relay(app, method, path, payload=None, headers=AUTH):
    data = json.dumps(payload).encode() if payload is not None else b""
    hdrs = [(k.lower(), v) for k, v in headers.items()] + [("content-type", "application/json")]

    async def collect():
        return [item async for item in asgi_stream(app, method, path, "", hdrs, data)]

    return asyncio.run(collect())


def test_asgi_relay_answers_like_the_app(replica_app):
    items = relay(replica_app, "POST", "/v1/chat/completions", body(prompt="Relay me", max_tokens=3))
    head, chunks = items[0], items[1:]
    assert head["status"] == 200 and dict(head["headers"])["content-type"] == "application/json"
    assert json.loads(b"".join(chunks))["choices"][0]["message"]["content"] == "Relay 20x10 none"
    items = relay(replica_app, "POST", "/v1/chat/completions", body(prompt="Stream me", max_tokens=3, stream=True))
    assert dict(items[0]["headers"])["content-type"].startswith("text/event-stream")
    text = b"".join(items[1:]).decode()
    assert len(items) > 3 and text.endswith("data: [DONE]\n\n")  # chunks arrive one by one
    error = relay(replica_app, "GET", "/v1/models", headers={})
    assert error[0]["status"] == 401 and json.loads(b"".join(error[1:]))["error"]["code"] == "invalid_api_key"


class DyingReplica:
    """A fake `handle.options(stream=True)`: `forward.remote` relays to the app, except that the
    calls listed in `die` fail: "before" (no answer at all), "after" (after the head and one chunk)
    or "end" (after the last chunk, i.e. after `data: [DONE]` for a stream)."""

    def __init__(self, app, die: dict[int, tuple[str, BaseException]]):
        self.app, self.die, self.calls = app, die, 0
        self.forward = self

    def remote(self, method, path, query, headers, body):
        self.calls += 1
        when, error = self.die.get(self.calls, (None, None))
        return self._answer(method, path, query, headers, body, when, error)

    async def _answer(self, method, path, query, headers, body, when, error):
        if when == "before":
            raise error
        sent = 0
        async for item in asgi_stream(self.app, method, path, query, headers, body):
            yield item
            sent += 1
            if when == "after" and sent == 2:
                raise error
        if when == "end":
            raise error


class Counts:
    def __init__(self):
        self.failures, self.retries, self.observed = [], 0, []

    def failure(self, kind):
        self.failures.append(kind)

    def retry(self):
        self.retries += 1

    def observe(self, route, status, seconds):
        self.observed.append((route, status))


def gateway(replica):
    counts = Counts()
    forwarder = Forwarder(replica, max_body_bytes=500_000, metrics=counts)
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def forward(http: Request, path: str):
        return await forwarder.forward(http)

    return TestClient(app), counts


def test_an_idempotent_request_is_retried_once_on_replica_death(replica_app):
    replica = DyingReplica(replica_app, {1: ("before", ActorDiedError())})
    client, counts = gateway(replica)
    r = client.post("/v1/chat/completions", headers=AUTH, json=body(prompt="Retry me", max_tokens=3))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Retry 20x10 none"
    assert replica.calls == 2 and counts.retries == 1 and counts.failures == ["replica_unavailable"]
    assert r.headers["x-request-id"] and counts.observed == [("/v1/chat/completions", 200)]


def test_a_second_death_is_an_openai_503(replica_app):
    replica = DyingReplica(replica_app, {1: ("before", ActorDiedError()),
                                         2: ("before", ActorUnavailableError("gone", None))})
    client, counts = gateway(replica)
    r = client.post("/v1/chat/completions", headers={**AUTH, "x-request-id": "abc"}, json=body())
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["x-request-id"] == "abc"
    assert r.json()["error"]["type"] == "service_unavailable" and r.json()["error"]["code"] == "replica_unavailable"
    assert replica.calls == 2


def test_a_job_submission_is_never_sent_twice(replica_app):
    replica = DyingReplica(replica_app, {1: ("before", ActorDiedError())})
    client, counts = gateway(replica)
    r = client.post("/v1/eval/jobs", headers=AUTH, json={"kind": "pope"})
    assert r.status_code == 503 and replica.calls == 1 and counts.retries == 0


def streamed_through_dying_replica(replica_app, when: str) -> tuple[list[str], DyingReplica, Counts]:
    """The non-empty lines of a streamed chat completion whose first replica call dies `when`."""
    replica = DyingReplica(replica_app, {1: (when, ActorDiedError())})
    client, counts = gateway(replica)
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json=body(stream=True, max_tokens=6)) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line], replica, counts


def test_a_broken_stream_ends_with_an_error_event_and_done(replica_app):
    lines, replica, _ = streamed_through_dying_replica(replica_app, "after")
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "replica_unavailable"
    assert json.loads(lines[0][len("data: "):])["object"] == "chat.completion.chunk"  # the part that arrived
    assert replica.calls == 1  # after the first byte a retry could repeat text


def test_a_replica_dying_after_the_streams_done_adds_nothing_after_it(replica_app):
    lines, replica, counts = streamed_through_dying_replica(replica_app, "end")
    assert lines.count("data: [DONE]") == 1 and lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert not [e for e in events if "error" in e] and events[-1]["choices"][0]["finish_reason"] == "length"
    assert replica.calls == 1 and counts.failures == []


def test_backpressure_and_unexpected_errors_keep_the_openai_shape(replica_app):
    client, counts = gateway(DyingReplica(replica_app, {1: ("before", BackPressureError(num_queued_requests=9,
                                                                                         max_queued_requests=8))}))
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "1"
    client, counts = gateway(DyingReplica(replica_app, {1: ("before", RuntimeError("bug"))}))
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error" and "bug" not in r.text


def test_oversized_bodies_stop_at_the_gateway(replica_app):
    replica = DyingReplica(replica_app, {})
    client, _ = gateway(replica)
    r = client.post("/v1/chat/completions", headers=AUTH, json=body(prompt="z" * 600_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large" and replica.calls == 0


def test_route_labels_are_bounded_and_idempotency_rules():
    assert route_label("/v1/eval/jobs/evaljob-123") == "/v1/eval/jobs/{id}"
    assert route_label("/wp-admin/setup.php") == route_label("/.env") == "unmatched"
    assert route_label("/v1/chat/completions") == "/v1/chat/completions"
    assert idempotent("POST", "/v1/chat/completions") and idempotent("GET", "/v1/eval/jobs/x")
    assert not idempotent("POST", "/v1/eval/jobs") and not idempotent("POST", "/v1/eval/jobs/x/resume")


class DyingUnary:
    """A fake plain handle: `respond.remote` answers in one reply (or fails, as listed in `die`)."""

    def __init__(self, app, die: dict[int, BaseException] | None = None):
        self.app, self.die, self.calls = app, die or {}, 0
        self.respond = self

    def remote(self, method, path, query, headers, body):
        self.calls += 1
        error = self.die.get(self.calls)

        async def answer():
            if error is not None:
                raise error
            return await asgi_answer(self.app, method, path, query, headers, body)

        return answer()


def unary_gateway(streaming, unary):
    forwarder = Forwarder(streaming, max_body_bytes=500_000, metrics=Counts(), unary=unary)
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def forward(http: Request, path: str):
        return await forwarder.forward(http)

    return TestClient(app)


def test_requests_that_cannot_stream_take_the_unary_call(replica_app):
    streaming, unary = DyingReplica(replica_app, {}), DyingUnary(replica_app, {1: ActorDiedError()})
    client = unary_gateway(streaming, unary)
    r = client.post("/v1/chat/completions", headers=AUTH, json=body(prompt="Unary me", max_tokens=3))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Unary 20x10 none"
    assert (unary.calls, streaming.calls) == (2, 0)  # the first replica died: retried once, unary again
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "fake-lvlm"
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")  # headers relayed
    assert (unary.calls, streaming.calls) == (4, 0)
    for payload in (body(stream=True, max_tokens=3), body(stream=False, max_tokens=3)):
        r = client.post("/v1/chat/completions", headers=AUTH, json=payload)
        assert r.status_code == 200
    assert r.json()["object"] == "chat.completion" and (unary.calls, streaming.calls) == (4, 2)
    assert may_stream(b'{"stream": true}') and not may_stream(json.dumps(body()).encode())


# -- limits the gateway enforces before a replica is involved (GatewayLimits) ---------------------

class SlowUpload:
    """A request as the gateway sees it, whose body arrives in `parts` chunks `delay_s` apart
    (`delay_s` None: the client never finishes sending); `read` counts the chunks taken."""

    def __init__(self, path="/v1/chat/completions", headers=None, parts=2, delay_s=None, method="POST"):
        from types import SimpleNamespace

        self.method, self.url = method, SimpleNamespace(path=path, query="")
        self.headers = {"content-type": "application/json", "content-length": "100", **(headers or {})}
        self.parts, self.delay_s, self.read = parts, delay_s, 0

    async def stream(self):
        for _ in range(self.parts):
            self.read += 1
            yield b"{" if self.read == 1 else b"}"
            await asyncio.sleep(3600 if self.delay_s is None else self.delay_s)


def limited(replica_app, **limits):
    from lvlm_hallu.serve.gateway import GatewayLimits

    replica = DyingReplica(replica_app, {})
    return Forwarder(replica, GatewayLimits(**{"max_body_bytes": 500_000, **limits}), metrics=Counts()), replica


def test_the_key_is_checked_before_the_body_is_read(replica_app):
    forwarder, replica = limited(replica_app, keys=(KEY, "second-key"))
    upload = SlowUpload(delay_s=None)  # a body that would never finish
    r = asyncio.run(asyncio.wait_for(forwarder.forward(upload), 2.0))
    assert r.status_code == 401 and json.loads(r.body)["error"]["code"] == "invalid_api_key"
    assert upload.read == 0 and replica.calls == 0
    r = asyncio.run(forwarder.forward(SlowUpload("/health", method="GET", headers={"content-length": "0"})))
    assert r.status_code == 200, "health needs no key"


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_uploads_are_capped(replica_app):
    forwarder, replica = limited(replica_app, body_timeout_s=0.5, upload_grace_s=0.1, max_uploads=2)

    async def scenario():
        stalled = [asyncio.ensure_future(forwarder.forward(SlowUpload(headers=AUTH))) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await forwarder.forward(SlowUpload(headers=AUTH))  # a third upload while two stall
        health = await forwarder.forward(SlowUpload("/health", method="GET", headers={"content-length": "0"}))
        return refused, health, await asyncio.gather(*stalled)

    refused, health, stalled = asyncio.run(scenario())
    assert refused.status_code == 429 and json.loads(refused.body)["error"]["code"] == "too_many_uploads"
    assert refused.headers["retry-after"] == "1" and health.status_code == 200
    assert [r.status_code for r in stalled] == [408, 408] and replica.calls == 1  # only /health reached it
    assert json.loads(stalled[0].body)["error"]["code"] == "request_timeout" and forwarder.uploads == 0


def test_ready_answers_503_within_its_deadline_when_no_replica_answers(replica_app):
    class Hanging:
        def __init__(self):
            self.respond = self

        def remote(self, *args):
            return asyncio.sleep(3600)

    from lvlm_hallu.serve.gateway import GatewayLimits

    forwarder = Forwarder(DyingReplica(replica_app, {}), GatewayLimits(ready_timeout_s=0.2), metrics=Counts(),
                          unary=Hanging())
    r = asyncio.run(asyncio.wait_for(forwarder.forward(SlowUpload("/ready", method="GET",
                                                                   headers={"content-length": "0"})), 2.0))
    payload = json.loads(r.body)
    assert r.status_code == 503 and payload["ready"] is False and payload["error"]["type"] == "service_unavailable"


def test_an_escaped_stream_key_takes_the_streaming_path():
    assert may_stream(rb'{"\u0073tream": true}') and may_stream(b'{"stream":true}')
    assert not may_stream(b'{"messages": [], "max_tokens": 3}')
