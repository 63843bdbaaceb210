"""EngineRunner and TokenStream (serve/batching.py) against the deterministic fake pipeline."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest
from PIL import Image

from lvlm.errors import PromptError
from lvlm.types import Request
from serve.batching import EngineRunner, Outcome, StreamCancelled, TokenStream


@dataclass(frozen=True)
class Scale:
    alpha: float = 1.0
    name = "scale"


@dataclass(frozen=True)
class Sink:
    tau: float = 20.0
    name = "sink"


def mixed_requests() -> list[Request]:
    red, blue = Image.new("RGB", (32, 16), "red"), Image.new("RGB", (8, 8), "blue")
    return [
        Request("cats on a mat", red, max_new_tokens=6),
        Request("dogs in a park", blue, max_new_tokens=5, interventions=(Scale(2.0),)),
        Request("birds over sea", red, max_new_tokens=7, interventions=(Sink(10.0), Scale(0.5))),
        Request("fish", None, max_new_tokens=3, interventions=(Sink(),)),
    ]


def test_mixed_interventions_in_one_batch_match_each_request_alone(fake_pipeline):
    batches = []
    runner = EngineRunner(fake_pipeline.generate, on_batch=lambda n, fell_back: batches.append((n, fell_back)))
    requests = mixed_requests()
    together = runner.run_batch(requests)
    alone = [runner.run_batch([r])[0] for r in requests]
    assert [o.error for o in together] == [None] * 4
    assert [o.result.text for o in together] == [o.result.text for o in alone]
    # The engine saw one batch of four rows, each row with its own interventions.
    assert fake_pipeline.batches[0] == [
        ("cats on a mat", ()),
        ("dogs in a park", ("scale(alpha=2.0)",)),
        ("birds over sea", ("sink(tau=10.0)", "scale(alpha=0.5)")),
        ("fish", ("sink(tau=20.0)",)),
    ]
    assert together[1].result.text.split()[:3] == ["dogs", "8x8", "scale(alpha=2.0)"]
    assert together[0].result.report["rows"] == 4 and alone[0].result.report["rows"] == 1
    assert batches[0] == (4, False)


def test_one_bad_request_fails_alone(fake_pipeline):
    fallbacks = []
    runner = EngineRunner(fake_pipeline.generate, on_batch=lambda n, fell_back: fallbacks.append(fell_back))
    requests = mixed_requests()
    requests.insert(2, Request("BOOM too long", None, max_new_tokens=4))
    outcomes = runner.run_batch(requests)
    assert isinstance(outcomes[2].error, PromptError)
    with pytest.raises(PromptError):
        outcomes[2].unwrap()
    good = [o for i, o in enumerate(outcomes) if i != 2]
    assert all(o.error is None for o in good)
    assert [o.result.text for o in good] == [fake_pipeline.answer(r) for i, r in enumerate(requests) if i != 2]
    # one failed batch of five, then five single-row retries
    assert [len(b) for b in fake_pipeline.batches] == [5, 1, 1, 1, 1, 1]
    assert fallbacks == [True]


def test_single_failing_request_is_not_retried(fake_pipeline):
    runner = EngineRunner(fake_pipeline.generate)
    [outcome] = runner.run_batch([Request("BOOM", None)])
    assert isinstance(outcome.error, PromptError) and len(fake_pipeline.batches) == 1


def test_engine_returning_wrong_number_of_results_fails_rows_not_the_runner():
    calls = []

    def broken(requests, on_token=None):
        calls.append(len(requests))
        return []

    outcomes = EngineRunner(broken).run_batch([Request("a"), Request("b")])
    assert all(isinstance(o.error, (RuntimeError, IndexError)) for o in outcomes) and calls == [2, 1, 1]


def test_engine_calls_never_overlap(fake_pipeline):
    active, peak = [0], [0]
    guard = threading.Lock()

    def generate(requests, on_token=None):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            fake_pipeline.delay_s = 0.005
            return fake_pipeline.generate(requests, on_token)
        finally:
            with guard:
                active[0] -= 1

    runner = EngineRunner(generate)
    threads = [threading.Thread(target=runner.run_batch, args=([Request(f"p{i}", max_new_tokens=3)],)) for i in range(6)]
    threads += [threading.Thread(target=runner.run_stream, args=(Request("s", max_new_tokens=3), lambda r, d: None))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1 and len(fake_pipeline.batches) == 7


def test_token_stream_yields_the_text_and_the_result(fake_pipeline):
    runner = EngineRunner(fake_pipeline.generate)
    request = Request("zebras grazing", Image.new("RGB", (4, 4)), max_new_tokens=6, interventions=(Scale(3.0),))

    async def consume():
        stream = TokenStream(runner, request).start()
        deltas = [d async for d in stream]
        await stream.close()
        return deltas, stream.result

    deltas, result = asyncio.run(consume())
    assert len(deltas) == 6 and "".join(deltas) == fake_pipeline.answer(request) == result.text


def test_token_stream_raises_the_engine_error(fake_pipeline):
    runner = EngineRunner(fake_pipeline.generate)

    async def consume():
        stream = TokenStream(runner, Request("BOOM")).start()
        try:
            return await stream.next_delta()
        finally:
            await stream.close()

    with pytest.raises(PromptError):
        asyncio.run(consume())


def test_closing_a_stream_stops_the_generation(fake_pipeline):
    fake_pipeline.delay_s = 0.01
    runner = EngineRunner(fake_pipeline.generate)
    seen: list[str] = []

    def generate(requests, on_token=None):
        def record(row, delta):
            on_token(row, delta)  # raises StreamCancelled once the consumer has gone
            seen.append(delta)

        return fake_pipeline.generate(requests, record)

    runner = EngineRunner(generate)

    async def consume():
        stream = TokenStream(runner, Request("long answer", max_new_tokens=200)).start()
        first = await stream.next_delta()
        await stream.close()
        return first

    assert asyncio.run(consume()) == "long"
    assert len(seen) < 20  # stopped long before the 200 tokens


def test_outcome_unwrap():
    assert Outcome(result=3).unwrap() == 3
    with pytest.raises(StreamCancelled):
        Outcome(error=StreamCancelled()).unwrap()
