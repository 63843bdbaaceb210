"""Clients that go away (serve/app.py, serve/scheduler.py, serve/batching.py), in process on the
tiny model through the replica's own relay (`gateway.asgi_stream`, what `LVLMServer.forward` runs):
every exit path gives its admission slot back exactly once, a row whose client left is retired at
the next decode step, and the neighbours' tokens are the ones they get alone. Both schedulers."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from PIL import Image

from lvlm_hallu.serve.app import Service, build_app
from lvlm_hallu.serve.config import ServeConfig
from lvlm_hallu.serve.gateway import asgi_answer, asgi_stream
from lvlm_hallu.serve.limits import Limits

SCHEDULERS = ("continuous", "static")


@pytest.fixture(scope="module")
def tiny():
    from lvlm_hallu import lvlm

    return lvlm.load("tiny-llava")


def image_url(color: str = "red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(i: int, *, stream: bool = False, max_tokens: int = 6, **extra) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": image_url(("red", "blue", "green")[i % 3])}},
               {"type": "text", "text": f"Describe image {i}."}]
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "stream": stream, **extra}).encode()


HEADERS = [("content-type", "application/json")]


def make_service(tiny, scheduler: str, **limits) -> Service:
    config = ServeConfig(model="tiny-llava", scheduler=scheduler, max_batch_size=8, admit_after_steps=0,
                         warmup=False, eval_jobs=False, limits=Limits(max_tokens=64, **limits))
    return Service(tiny, config)


async def drop_after_first_chunk(app, body: bytes) -> None:
    relay = asgi_stream(app, "POST", "/v1/chat/completions", "", HEADERS, body)
    head = await relay.__anext__()
    assert head["status"] == 200
    await relay.__anext__()  # the role chunk
    await relay.aclose()  # the client is gone


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_streams_dropped_after_their_first_chunk_give_their_slots_back(tiny, scheduler):
    service = make_service(tiny, scheduler, max_concurrent=16)
    app = build_app(service)

    async def scenario():
        for i in range(40):  # more than max_concurrent: one leaked slot each would end in 429s
            await drop_after_first_chunk(app, chat_body(i, stream=True, max_tokens=40))
        for _ in range(200):  # the generations end (or are retired) on their own time
            if service.admission.active == 0:
                break
            await asyncio.sleep(0.05)
        return await asgi_answer(app, "POST", "/v1/chat/completions", "", HEADERS, chat_body(0))

    try:
        answer = asyncio.run(scenario())
        assert service.admission.active == 0
        assert answer["status"] == 200, answer["body"][:300]
    finally:
        close = getattr(service.runner, "close", None)
        if close:
            close()
