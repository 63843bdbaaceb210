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
        counted = {status: sum(float(line.split()[-1]) for line in service.metrics.render().decode().splitlines()
                               if line.startswith("lvlm_intervention_requests_total") and f'status="{status}"' in line)
                   for status in ("200", "499")}
        # a stream the tiny model ended (EOS) before its client left is a 200; every other is a 499
        assert counted["499"] >= 1 and counted["200"] + counted["499"] == 41, counted  # + the final chat
    finally:
        close = getattr(service.runner, "close", None)
        if close:
            close()


def answer_text(answer: dict) -> str:
    assert answer["status"] == 200, answer["body"][:300]
    return json.loads(answer["body"])["choices"][0]["message"]["content"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_neighbours_of_leaving_clients_get_the_tokens_they_get_alone(tiny, scheduler):
    """6 requests run beside 6 clients that leave (3 non-stream cancelled mid-generation, 3 streams
    closed after their first chunk): all 6 answer 200 with the text they get alone."""
    service = make_service(tiny, scheduler)
    app = build_app(service)
    logprobs = {"logprobs": True, "top_logprobs": 2}

    async def call(i: int) -> dict:
        return await asgi_answer(app, "POST", "/v1/chat/completions", "", HEADERS, chat_body(i, max_tokens=12, **logprobs))

    async def leave_non_stream(i: int) -> None:
        task = asyncio.ensure_future(asgi_answer(app, "POST", "/v1/chat/completions", "", HEADERS,
                                                 chat_body(100 + i, max_tokens=40)))
        await asyncio.sleep(0.2 + 0.1 * i)
        task.cancel()  # what Ray does to the replica call when the HTTP client disconnects

    async def scenario():
        alone = [json.loads((await call(i))["body"])["choices"][0] for i in range(6)]
        together = await asyncio.gather(*[call(i) for i in range(6)],
                                        *[leave_non_stream(i) for i in range(3)],
                                        *[drop_after_first_chunk(app, chat_body(200 + i, stream=True, max_tokens=40))
                                          for i in range(3)])
        for _ in range(200):
            if service.admission.active == 0:
                break
            await asyncio.sleep(0.05)
        return alone, together[:6]

    try:
        alone, together = asyncio.run(scenario())
        assert [a["status"] for a in together] == [200] * 6
        beside = [json.loads(a["body"])["choices"][0] for a in together]
        assert [c["message"]["content"] for c in beside] == [c["message"]["content"] for c in alone]
        token_ids = [[t["token"] for t in c["logprobs"]["content"]] for c in beside]
        assert token_ids == [[t["token"] for t in c["logprobs"]["content"]] for c in alone], "token by token"
        assert service.admission.active == 0
    finally:
        close = getattr(service.runner, "close", None)
        if close:
            close()


def long_request(color: str = "red"):
    from lvlm_hallu.lvlm.types import Request

    return Request("Describe this image.", Image.new("RGB", (40, 40), color), max_new_tokens=60, ignore_eos=True)


def test_continuous_scheduler_retires_a_cancelled_caller_at_the_next_step(tiny):
    from lvlm_hallu.serve.scheduler import ContinuousScheduler

    scheduler = ContinuousScheduler(tiny, max_rows=4, admit_after_steps=0)

    async def scenario():
        leaving = asyncio.ensure_future(scheduler.generate(long_request()))
        staying = asyncio.ensure_future(scheduler.generate(long_request("blue")))
        while scheduler.steps < 3:
            await asyncio.sleep(0.01)
        leaving.cancel()
        at_cancel = scheduler.steps
        while scheduler.running > 1 and scheduler.steps < at_cancel + 20:
            await asyncio.sleep(0.001)
        retired_after = scheduler.steps - at_cancel
        return retired_after, await staying

    try:
        retired_after, outcome = asyncio.run(scenario())
    finally:
        scheduler.close()
    assert retired_after <= 2, f"the leaving row decoded {retired_after} more steps"
    assert outcome.error is None and outcome.result.token_ids == tiny.generate([long_request("blue")])[0].token_ids


def test_static_runner_drops_a_ticket_whose_client_left_and_keeps_its_neighbour(tiny):
    from lvlm_hallu.serve.batching import EngineRunner, StreamCancelled, Ticket

    runner = EngineRunner(tiny.generate, pipeline=tiny)
    leaving, staying = Ticket(long_request()), Ticket(long_request("blue"))
    steps = []
    step = type(tiny.engine).decode_one_token

    def counted(self, tokens, *args, **kwargs):
        steps.append(tokens.shape[0])  # rows decoding in this step
        if len(steps) == 3:
            leaving.cancelled.set()
        return step(self, tokens, *args, **kwargs)

    type(tiny.engine).decode_one_token = counted
    try:
        outcomes = runner.run_batch([leaving, staying])
    finally:
        type(tiny.engine).decode_one_token = step
    assert isinstance(outcomes[0].error, StreamCancelled)
    assert outcomes[1].result.token_ids == tiny.generate([long_request("blue")])[0].token_ids
    assert steps[:3] == [2, 2, 2] and set(steps[4:]) == {1}, "the leaving row is gone from the next step on"
    assert len(steps) == 59, "the staying row decodes to its end"
