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

from serve.client import (APIConnectionError, Client, OverloadedError, PayloadTooLargeError, RateLimitError,
                          image_data_url)


def test_sdk_imports_without_torch_ray_or_fastapi():
    code = ("import sys, serve, serve.client, serve.schema; "
            "print(sorted(m for m in ('torch', 'ray', 'fastapi', 'PIL', 'lvlm', 'interventions') if m in sys.modules))")
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
    with pytest.raises(TypeError):
        image_data_url(42)


def client_answering(status, body, headers=None):
    def handler(request):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers or {})

    return Client(http_client=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://svc"))


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
    client = Client("http://127.0.0.1:9", timeout=2)
    with pytest.raises(APIConnectionError):
        client.health()
