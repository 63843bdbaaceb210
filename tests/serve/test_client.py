"""The SDK (serve/client.py) on its own: light imports, image encoding, error mapping."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from lvlm_hallu.serve.client import (APIConnectionError, APIError, APITimeoutError, AsyncClient, Client, InvalidImageError,
                          OverloadedError, PayloadTooLargeError, RateLimitError, Retry, image_data_url, service_root)


def test_sdk_imports_without_torch_ray_or_fastapi():
    code = ("import sys, lvlm_hallu.serve.client, lvlm_hallu.serve.schema; "
            "print(sorted(m for m in ('torch', 'ray', 'fastapi', 'PIL', 'lvlm_hallu.lvlm', 'lvlm_hallu.interventions') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_image_data_url_from_pil_path_bytes_and_urls(tmp_path):
    image = Image.new("RGB", (5, 3), "red")
    pil_url = image_data_url(image)
    assert pil_url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(pil_url.split(",", 1)[1]))).size == (5, 3)
    image.save(tmp_path / "a.jpg", format="JPEG")
    assert image_data_url(tmp_path / "a.jpg").startswith("data:image/jpeg;base64,")
    assert image_data_url(str(tmp_path / "a.jpg")) == image_data_url(tmp_path / "a.jpg")
    assert image_data_url(b"GIF89a...").startswith("data:image/gif;base64,")
    assert image_data_url(b"whatever").startswith("data:application/octet-stream;base64,")
    assert image_data_url("https://example.com/cat.png") == "https://example.com/cat.png"
    for bad in (42, None, [b"x"], tmp_path / "missing.png", str(tmp_path), b""):
        with pytest.raises(InvalidImageError):
            image_data_url(bad)


def client_answering(status, body, headers=None):
    def handler(request):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers or {})

    return Client(http_client=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://svc"),
                  retry=Retry(max_retries=0))


def test_errors_carry_the_server_message_and_fields():
    error = {"error": {"message": "image too large", "type": "invalid_request_error", "param": "messages",
                       "code": "image_too_large"}}
    with pytest.raises(PayloadTooLargeError) as info:
        client_answering(413, error).chat(b"\x89PNG", "x")
    assert (info.value.message, info.value.param, info.value.code, info.value.status_code) == (
        "image too large", "messages", "image_too_large", 413)
    with pytest.raises(RateLimitError):
        client_answering(429, {"error": {"message": "busy", "type": "rate_limit_error"}}).list_models()
    # Ray Serve's own backpressure answer is plain text, not our error object
    with pytest.raises(OverloadedError) as info:
        client_answering(503, b"Request dropped due to backpressure").list_models()
    assert isinstance(info.value, RateLimitError) and "backpressure" in info.value.message


def test_stream_error_after_headers_is_raised():
    sse = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
           b'[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
           b'data: {"error":{"message":"engine failed","type":"internal_error"}}\n\ndata: [DONE]\n\n')
    client = client_answering(200, sse, {"content-type": "text/event-stream"})
    stream = client.stream(b"\x89PNG", "x")
    assert next(stream) == "Hi"
    with pytest.raises(Exception, match="engine failed"):
        next(stream)


def test_connection_errors_are_typed():
    client = Client("http://127.0.0.1:9", timeout=2, retry=Retry(max_retries=1, backoff_s=0.01))
    with pytest.raises(APIConnectionError) as info:
        client.health()
    assert not isinstance(info.value, APITimeoutError)


MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}


class Script:
    """A mock transport answering from a list: (status, body, headers) tuples or exceptions."""

    def __init__(self, *answers):
        self.answers, self.seen = list(answers), []

    def __call__(self, request):
        self.seen.append((request.method, request.url.path))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, body, headers = answer
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers)


def scripted(*answers, retry=Retry(backoff_s=0.001)):
    script = Script(*answers)
    return Client(http_client=httpx.Client(transport=httpx.MockTransport(script), base_url="http://svc"),
                  retry=retry), script


def test_base_url_may_end_in_v1():
    assert service_root("http://h:8000/v1") == service_root("http://h:8000/v1/") == "http://h:8000"
    assert service_root("http://h:8000") == "http://h:8000"
    assert Client("http://h:8000/v1")._http.base_url == httpx.URL("http://h:8000")


def test_retries_429_503_and_refused_connections_then_succeeds():
    busy = (429, {"error": {"message": "busy", "type": "rate_limit_error"}}, {"retry-after": "0"})
    client, script = scripted(busy, (503, b"Request dropped due to backpressure", {}), (200, MODELS, {}),
                              retry=Retry(max_retries=2, backoff_s=0.001))
    assert [m.id for m in client.list_models()] == ["m"] and len(script.seen) == 3
    refused = httpx.ConnectError("refused")
    client, script = scripted(refused, (200, MODELS, {}))
    assert client.list_models()[0].id == "m" and len(script.seen) == 2


def test_retries_stop_after_max_retries_and_are_configurable():
    busy = (503, {"error": {"message": "down", "type": "service_unavailable"}}, {})
    client, script = scripted(busy, busy, busy, retry=Retry(max_retries=2, backoff_s=0.001))
    with pytest.raises(OverloadedError, match="down"):
        client.list_models()
    assert len(script.seen) == 3
    client, script = scripted(busy, retry=Retry(max_retries=0))
    with pytest.raises(OverloadedError):
        client.list_models()
    assert len(script.seen) == 1
    client, script = scripted((400, {"error": {"message": "bad", "type": "invalid_request_error"}}, {}))
    with pytest.raises(Exception, match="bad"):
        client.list_models()
    assert len(script.seen) == 1  # a 400 is final


def test_retry_wait_honours_retry_after_and_backs_off():
    retry = Retry(backoff_s=0.5, max_backoff_s=3)
    assert [retry.wait_s(i) for i in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert retry.wait_s(0, httpx.Response(429, headers={"retry-after": "2"})) == 2.0
    assert retry.wait_s(0, httpx.Response(429, headers={"retry-after": "60"})) == 3.0


def test_lost_connection_is_not_retried_for_a_job_submission():
    lost = httpx.RemoteProtocolError("server disconnected")
    client, script = scripted(lost, (200, MODELS, {}))
    with pytest.raises(APIConnectionError):
        client.submit_eval("pope", limit=2)  # the job may exist already: never submit twice
    assert script.seen == [("POST", "/v1/eval/jobs")]
    client, script = scripted(lost, (200, MODELS, {}))
    assert client.list_models()[0].id == "m"  # a read is retried


def unavailable(code: str) -> tuple:
    """The gateway's 503 answer for `code` (serve/gateway.py unavailable_for), as the Script plays it."""
    from lvlm_hallu.serve.errors import Unavailable

    error = Unavailable("replica trouble", code=code, retry_after_s=1.0)
    return 503, error.body(), {"retry-after": "0"}


JOB = {"id": "evaljob-1", "object": "eval.job", "kind": "pope", "state": "queued"}


def test_job_submission_is_not_retried_after_a_replica_died():
    # The replica may have created the job before it died: a second POST could make a duplicate.
    client, script = scripted(unavailable("replica_unavailable"), (200, JOB, {}))
    with pytest.raises(OverloadedError) as info:
        client.submit_eval("pope", limit=2)
    assert info.value.code == "replica_unavailable" and info.value.status_code == 503
    assert script.seen == [("POST", "/v1/eval/jobs")]
    # a 503 that is not our error object (a proxy's plain text) proves nothing either
    client, script = scripted((503, b"Service Unavailable", {}), (200, JOB, {}))
    with pytest.raises(OverloadedError):
        client.submit_eval("pope", limit=2)
    assert len(script.seen) == 1
    # an idempotent read after the same 503 is retried
    client, script = scripted(unavailable("replica_unavailable"), (200, JOB, {}))
    assert client.job("evaljob-1").id == "evaljob-1"
    assert script.seen == [("GET", "/v1/eval/jobs/evaljob-1")] * 2


def test_job_submission_is_retried_when_it_was_never_admitted():
    busy = (429, {"error": {"message": "busy", "type": "rate_limit_error", "code": "overloaded"}}, {})
    client, script = scripted(busy, unavailable("overloaded"), (200, JOB, {}))
    assert client.submit_eval("pope", limit=2).id == "evaljob-1"
    assert script.seen == [("POST", "/v1/eval/jobs")] * 3


def test_async_job_submission_is_not_retried_after_a_replica_died():
    import asyncio

    async def go():
        script = Script(unavailable("replica_unavailable"), (200, JOB, {}))
        transport = httpx.MockTransport(script)
        async with AsyncClient(http_client=httpx.AsyncClient(transport=transport, base_url="http://svc"),
                               retry=Retry(backoff_s=0.001)) as client:
            with pytest.raises(OverloadedError, match="replica trouble"):
                await client.submit_eval("pope", limit=2)
        return script.seen

    assert asyncio.run(go()) == [("POST", "/v1/eval/jobs")]


def test_timeouts_have_their_own_error():
    client, _ = scripted(httpx.ReadTimeout("slow"), retry=Retry(max_retries=0))
    with pytest.raises(APITimeoutError):
        client.list_models()


CHUNK = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
         b'[{"index":0,"delta":{"content":"Hi"}}]}\n\n')


def test_stream_retries_before_the_first_byte_only():
    busy = (503, {"error": {"message": "down", "type": "service_unavailable"}}, {})
    ok = (200, CHUNK + b"data: [DONE]\n\n", {"content-type": "text/event-stream"})
    client, script = scripted(busy, ok)
    assert list(client.stream(b"\x89PNG", "x")) == ["Hi"] and len(script.seen) == 2
    # after the first byte an error is reported, not retried: a retry could repeat text
    failing = (200, CHUNK + b'data: {"error":{"message":"replica died","type":"service_unavailable"}}\n\n'
               b"data: [DONE]\n\n", {"content-type": "text/event-stream"})
    client, script = scripted(failing, ok)
    stream = client.stream(b"\x89PNG", "x")
    assert next(stream) == "Hi"
    with pytest.raises(OverloadedError, match="replica died"):
        next(stream)
    assert len(script.seen) == 1


def test_async_client_retries_and_strips_v1():
    import asyncio

    async def go():
        script = Script((429, {"error": {"message": "busy", "type": "rate_limit_error"}}, {}), (200, MODELS, {}))
        transport = httpx.MockTransport(script)
        async with AsyncClient(http_client=httpx.AsyncClient(transport=transport, base_url="http://svc"),
                               retry=Retry(backoff_s=0.001)) as client:
            models = await client.list_models()
        return models, script.seen

    models, seen = asyncio.run(go())
    assert models[0].id == "m" and len(seen) == 2
    with pytest.raises(InvalidImageError):
        asyncio.run(AsyncClient("http://svc/v1").chat(object(), "x"))


# -- issue #34: no silent re-sends, no cut stream taken for whole, every parse failure typed --------

def test_a_chat_is_not_sent_again_after_a_read_timeout_unless_asked():
    from lvlm_hallu.serve.client import APITimeoutError

    answer = (200, {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}, {})
    client, script = scripted(httpx.ReadTimeout("slow"), answer)
    with pytest.raises(APITimeoutError):
        client.chat(b"\x89PNG", "x")  # the server may still be generating the first one
    assert len(script.seen) == 1
    client, script = scripted(httpx.ReadTimeout("slow"), answer, retry=Retry(backoff_s=0.001, retry_timeouts=True))
    assert client.chat(b"\x89PNG", "x").text == "Hi" and len(script.seen) == 2
    client, script = scripted(httpx.ConnectTimeout("no route"), answer)  # never sent: always safe
    assert client.chat(b"\x89PNG", "x").text == "Hi" and len(script.seen) == 2


def test_a_stream_without_done_raises():
    from lvlm_hallu.serve.client import IncompleteStreamError

    client, _ = scripted((200, CHUNK, {"content-type": "text/event-stream"}))
    stream = client.stream(b"\x89PNG", "x")
    assert next(stream) == "Hi"
    with pytest.raises(IncompleteStreamError):
        next(stream)


@pytest.mark.parametrize("event", [b"data: {not json\n\n", b"data: [1, 2]\n\n", b"data: 7\n\n",
                                   b'data: {"object": "chat.completion.chunk"}\n\n',
                                   b'data: {"error": "plain words"}\n\n'])
def test_every_malformed_event_is_an_api_error(event):
    from lvlm_hallu.serve.client import APIError

    client, _ = scripted((200, CHUNK + event + b"data: [DONE]\n\n", {"content-type": "text/event-stream"}))
    stream = client.stream(b"\x89PNG", "x")
    assert next(stream) == "Hi"
    with pytest.raises(APIError):
        next(stream)


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"object": "list"}', b"[]"])
def test_an_unreadable_answer_is_an_api_error(body):
    from lvlm_hallu.serve.client import ResponseFormatError

    with pytest.raises(ResponseFormatError):
        client_answering(200, body).list_models()
    # a proxy's plain-text 500 (a gateway killed mid-request) keeps its text in an APIError
    with pytest.raises(APIError) as info:
        client_answering(500, b"Internal Server Error").list_models()
    assert info.value.status_code == 500 and "Internal Server Error" in info.value.message


def test_503_kinds_are_mapped_and_only_transient_ones_retried():
    from lvlm_hallu.serve.client import ServiceUnavailableError

    disabled = unavailable("eval_jobs_disabled")
    client, script = scripted(disabled, (200, JOB, {}))
    with pytest.raises(ServiceUnavailableError) as info:
        client.job("evaljob-1")
    assert not isinstance(info.value, RateLimitError) and info.value.code == "eval_jobs_disabled"
    assert len(script.seen) == 1, "a disabled feature is not retried"
    client, script = scripted(unavailable("overloaded"), (200, JOB, {}))
    assert client.job("evaljob-1").id == "evaljob-1" and len(script.seen) == 2


def test_resume_posts_once_and_maps_409():
    from lvlm_hallu.serve.client import ConflictError

    conflict = (409, {"error": {"message": "job is running", "type": "invalid_request_error",
                                "code": "job_not_resumable"}}, {})
    client, script = scripted(conflict)
    with pytest.raises(ConflictError):
        client.resume("evaljob-1")
    client, script = scripted((200, {**JOB, "state": "queued"}, {}))
    assert client.resume("evaljob-1").state == "queued"
    assert script.seen == [("POST", "/v1/eval/jobs/evaljob-1/resume")]
