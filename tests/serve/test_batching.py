"""EngineRunner and TokenStream (serve/batching.py) against the deterministic fake pipeline."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest
from PIL import Image

from lvlm_hallu.lvlm.errors import PromptError
from lvlm_hallu.lvlm.types import Request
from lvlm_hallu.serve.batching import EngineRunner, Outcome, StreamCancelled, TokenStream


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


def test_static_runner_batch_matches_each_request_alone_on_the_real_engine():
    """The fake above answers from one request whatever the batch; the tiny model does not: rows of
    different prompts, images and lengths share a left-padded cache, and each must still get the
    tokens it gets alone."""
    from lvlm_hallu import lvlm

    tiny = lvlm.load("tiny-llava")
    runner = EngineRunner(tiny.generate, pipeline=tiny)
    requests = [
        Request("Describe this image.", Image.new("RGB", (40, 40), "red"), max_new_tokens=9, ignore_eos=True),
        Request("What is in the picture? Answer in one long sentence.", Image.new("RGB", (24, 56), "blue"),
                max_new_tokens=4, ignore_eos=True),
        Request("Name the shapes.", Image.new("RGB", (40, 40), "green"), max_new_tokens=12, ignore_eos=True),
    ]
    together = runner.run_batch(requests)
    alone = [tiny.generate([r])[0] for r in requests]
    assert [o.error for o in together] == [None] * 3
    assert [o.result.token_ids for o in together] == [a.token_ids for a in alone]
    assert [len(o.result.token_ids) for o in together] == [9, 4, 12]


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


# -- continuous scheduler (serve/scheduler.py) on the real tiny model ------------------------------

@pytest.fixture(scope="module")
def tiny():
    from lvlm_hallu import lvlm

    return lvlm.load("tiny-llava")


def tiny_requests(n):
    colours = ["red", "blue", "green", "white", "black", "orange"]
    return [Request(["Describe this image.", "Hi", "What is in the picture?"][i % 3],
                    Image.new("RGB", (32 + 4 * i, 32), colours[i % 6]), max_new_tokens=4 + (i * 3) % 7)
            for i in range(n)]


def test_continuous_scheduler_matches_requests_alone_and_batches_them(tiny):
    from lvlm_hallu.serve.scheduler import ContinuousScheduler

    sizes = []
    scheduler = ContinuousScheduler(tiny, max_rows=4, max_prefill_tokens=120, on_batch=lambda n, _: sizes.append(n))
    try:
        requests = tiny_requests(6)
        futures = [scheduler.submit(r) for r in requests]  # all at once: they queue and join as rows free up
        outcomes = [f.result(timeout=300) for f in futures]
    finally:
        scheduler.close()
    alone = [tiny.generate([r])[0] for r in requests]
    assert [o.error for o in outcomes] == [None] * 6
    assert [o.result.token_ids for o in outcomes] == [a.token_ids for a in alone]
    assert [o.result.text for o in outcomes] == [a.text for a in alone]
    assert max(sizes) <= 4, "never more than max_rows rows"
    assert max(sizes) > 1 and sum(sizes) / len(sizes) > 1.5, "rows must share decode steps"


def test_continuous_scheduler_fails_only_the_bad_request(tiny):
    from lvlm_hallu.serve.scheduler import ContinuousScheduler

    scheduler = ContinuousScheduler(tiny, max_rows=4)
    try:
        good = tiny_requests(2)
        bad = Request("x " * (tiny.max_context + 10), Image.new("RGB", (32, 32)), max_new_tokens=3)
        outcomes = scheduler.run_batch([good[0], bad, good[1]])
    finally:
        scheduler.close()
    assert isinstance(outcomes[1].error, PromptError)
    assert [outcomes[0].result.token_ids, outcomes[2].result.token_ids] == [tiny.generate([r])[0].token_ids for r in good]


def test_continuous_streams_per_row_and_cancellation(tiny):
    from lvlm_hallu.serve.scheduler import ContinuousScheduler

    scheduler = ContinuousScheduler(tiny, max_rows=4)

    async def main():
        long = Request("Describe this image.", Image.new("RGB", (40, 40), "red"), max_new_tokens=40, ignore_eos=True)
        other = tiny_requests(1)[0]
        stream = TokenStream(scheduler, other)
        doomed = TokenStream(scheduler, long)
        pieces = [d async for d in stream]
        first = await doomed.next_delta()
        await doomed.close()  # the client goes away: the row leaves at the next step
        return pieces, stream.result, first

    try:
        pieces, result, first = asyncio.run(main())
        assert "".join(pieces) == result.text == tiny.generate([tiny_requests(1)[0]])[0].text
        assert first is not None
        deadline = time.time() + 60
        while scheduler.running and time.time() < deadline:
            time.sleep(0.05)
        assert scheduler.running == 0, "the cancelled row must leave the batch"
    finally:
        scheduler.close()


def test_continuous_scheduler_queue_limit_is_429(tiny):
    from lvlm_hallu.serve.errors import Overloaded
    from lvlm_hallu.serve.scheduler import ContinuousScheduler

    scheduler = ContinuousScheduler(tiny, max_rows=1, max_queue=1)
    try:
        block = Request("Hi", Image.new("RGB", (32, 32)), max_new_tokens=30, ignore_eos=True)
        first = scheduler.submit(block)
        deadline = time.time() + 120
        while scheduler.running == 0 and not first.done() and time.time() < deadline:  # let the loop admit it
            time.sleep(0.05)
        queued = scheduler.submit(block)
        with pytest.raises(Overloaded) as err:
            for _ in range(3):
                scheduler.submit(block)
        assert err.value.status == 429
        assert first.result(timeout=300).error is None and queued.result(timeout=300).error is None
    finally:
        scheduler.close()
