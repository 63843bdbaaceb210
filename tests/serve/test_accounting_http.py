"""Admission accounting through the HTTP app, as properties (issue 40, item 2), both schedulers.

A generated mix of chat requests runs concurrently through the replica's ASGI relay
(`gateway.asgi_stream`, what `LVLMServer.forward` runs) on the real tiny model: answers, streams
read to the end, streams dropped after their first chunk, non-stream clients that leave
mid-generation (their task cancelled, as Ray cancels the replica call), requests refused as bad
input (400) and requests the engine refuses (a prompt over the context). After every mix the
admission counter is back to 0 (every slot released exactly once: a leak counts up, a double
release would hide another request's slot and is clamped, so the limit test below checks that a
full server says 429 and then admits again), and every request that was answered got the text it
gets alone. The scheduler-level invariants (rows, KV cache, tokens in flight, futures) are in
test_accounting_properties.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lvlm_hallu.serve.app import build_app
from lvlm_hallu.serve.gateway import asgi_answer
from tests.serve.test_disconnects import HEADERS, chat_body, drop_after_first_chunk, make_service

SCHEDULERS = ("continuous", "static")
PROPERTY = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported at once
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

call = st.fixed_dictionaries({
    "kind": st.sampled_from(["answer", "stream", "drop", "leave", "bad", "too_long"]),
    "image": st.integers(0, 2),
    "tokens": st.sampled_from([2, 6, 20]),
    "delay": st.sampled_from([0.0, 0.05, 0.2]),  # when it starts; "leave": when its client leaves
})


@pytest.fixture(scope="module")
def tiny():
    from lvlm_hallu import lvlm

    return lvlm.load("tiny-llava")


async def chat(app, body: bytes) -> dict:
    return await asgi_answer(app, "POST", "/v1/chat/completions", "", HEADERS, body)


def streamed_text(body: bytes) -> str:
    events = [line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


async def run_call(app, spec: dict):
    await asyncio.sleep(spec["delay"] if spec["kind"] != "leave" else 0)
    i, tokens, kind = spec["image"], spec["tokens"], spec["kind"]
    if kind == "answer":
        answer = await chat(app, chat_body(i, max_tokens=tokens))
        assert answer["status"] == 200, answer["body"][:300]
        return json.loads(answer["body"])["choices"][0]["message"]["content"]
    if kind == "stream":
        answer = await chat(app, chat_body(i, stream=True, max_tokens=tokens))
        assert answer["status"] == 200, answer["body"][:300]
        return streamed_text(answer["body"])
    if kind == "drop":
        await drop_after_first_chunk(app, chat_body(i, stream=True, max_tokens=tokens))
        return None
    if kind == "leave":
        task = asyncio.ensure_future(chat(app, chat_body(i, max_tokens=tokens)))
        await asyncio.sleep(spec["delay"])
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    if kind == "bad":
        answer = await chat(app, chat_body(i, max_tokens=tokens, temperature="hot"))
        assert answer["status"] == 400, answer
        return None
    body = json.loads(chat_body(i, max_tokens=tokens))
    body["messages"][0]["content"][1]["text"] = "word " * 2000  # over the tiny model's context
    answer = await chat(app, json.dumps(body).encode())
    assert answer["status"] == 400, answer["body"][:300]
    return None


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.timeout(300)
def test_admission_slots_return_to_zero_after_any_mix_and_answers_are_the_solo_ones(tiny, scheduler):
    service = make_service(tiny, scheduler, max_concurrent=16)
    app = build_app(service)
    alone: dict[tuple[int, int], str] = {}

    async def solo(i: int, tokens: int) -> str:
        if (i, tokens) not in alone:
            answer = await chat(app, chat_body(i, max_tokens=tokens))
            alone[(i, tokens)] = json.loads(answer["body"])["choices"][0]["message"]["content"]
        return alone[(i, tokens)]

    @PROPERTY
    @given(st.lists(call, min_size=1, max_size=6))
    def check(calls):
        async def scenario():
            texts = await asyncio.gather(*[run_call(app, spec) for spec in calls])
            for _ in range(400):  # dropped and left generations are retired at their next step
                if service.admission.active == 0:
                    break
                await asyncio.sleep(0.01)
            return texts, service.admission.active, [await solo(s["image"], s["tokens"]) for s in calls]

        texts, active, solos = asyncio.run(scenario())
        assert active == 0, f"{active} admission slots never released"
        for spec, text, expected in zip(calls, texts, solos):
            if spec["kind"] in ("answer", "stream"):
                assert text == expected, spec

    try:
        check()
        runner = service.runner
        if scheduler == "continuous":
            assert (runner.running, runner.waiting, len(runner._jobs), runner._in_flight_tokens()) == (0, 0, 0, 0)
            assert runner._batch.state is None
    finally:
        close = getattr(service.runner, "close", None)
        if close:
            close()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.timeout(120)
def test_a_full_server_refuses_with_429_and_admits_again_once_real_streams_end(tiny, scheduler):
    """The counter is filled by real requests (two streams, their decoding held at a gate), not
    by hand: the next request is a 429; once the streams end the server admits again, at 0."""
    import threading

    from lvlm_hallu.serve.gateway import asgi_stream

    from lvlm_hallu.serve.app import Service
    from lvlm_hallu.serve.config import ServeConfig
    from lvlm_hallu.serve.limits import Limits

    # the limit is max(limits.max_concurrent, 2 x max_batch_size) (serve/config.py): 2 here
    config = ServeConfig(model="tiny-llava", scheduler=scheduler, max_batch_size=1, admit_after_steps=0,
                         warmup=False, eval_jobs=False, limits=Limits(max_tokens=64, max_concurrent=2))
    service = Service(tiny, config)
    assert service.admission.limit == 2
    app = build_app(service)
    gate = threading.Event()
    step = type(tiny.engine).decode_one_token

    def held(self, *args, **kwargs):
        gate.wait(timeout=10)
        return step(self, *args, **kwargs)

    async def scenario():
        relays = [asgi_stream(app, "POST", "/v1/chat/completions", "", HEADERS,
                              chat_body(i, stream=True, max_tokens=8)) for i in range(2)]
        heads = [asyncio.ensure_future(relay.__anext__()) for relay in relays]  # one decodes, one waits
        for _ in range(500):
            if service.admission.active == 2:
                break
            await asyncio.sleep(0.01)
        full = service.admission.active
        refused = await chat(app, chat_body(2))
        gate.set()
        assert [(await head)["status"] for head in heads] == [200, 200]
        for relay in relays:
            async for _ in relay:  # each stream to its end
                pass
        return full, refused, await chat(app, chat_body(2)), service.admission.active

    type(tiny.engine).decode_one_token = held
    try:
        full, refused, admitted, after = asyncio.run(scenario())
    finally:
        type(tiny.engine).decode_one_token = step
        gate.set()
        close = getattr(service.runner, "close", None)
        if close:
            close()
    assert full == 2
    assert refused["status"] == 429 and dict(refused["headers"]).get("retry-after") == "1", refused
    assert json.loads(refused["body"])["error"]["type"] == "rate_limit_error"
    assert admitted["status"] == 200 and after == 0
