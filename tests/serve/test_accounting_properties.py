"""Accounting invariants as properties (issue 40, item 2), generated with Hypothesis.

The continuous scheduler (serve/scheduler.py) on the real tiny model runs a generated mix of
requests: plain submits, streams read to the end, streams whose client disconnects after k tokens
(the callback raises StreamCancelled), callers that cancel (their event, or the future itself)
at a given decode step, requests that fail at prefill (a prompt over the context) and, sometimes,
`close()` while work is waiting or running. After every sequence:

- every future is resolved exactly once (its done-callbacks run once, it is never left pending);
- no row, job, waiting request, KV cache (`RunningBatch.state`) or in-flight token is left;
- during the run the rows' prompt + max_new_tokens never exceed the scheduler's `max_tokens`
  (unless one row runs alone, which admission allows), nor the rows `max_rows`;
- every request that got a result got the tokens it gets alone, and a stream read to the end
  streamed exactly its result's text.

The service-level properties (admission slots through the HTTP app, both schedulers) are in
test_accounting_http.py. Examples are few and seeded (derandomize): each test takes seconds.
"""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from lvlm_hallu.serve.batching import StreamCancelled
from lvlm_hallu.serve.scheduler import ContinuousScheduler, prefill_shape

COLORS = ("red", "blue", "green")
NEW = (3, 8, 40)  # max_new_tokens choices (ignore_eos: every row runs to its limit)
MAX_ROWS = 4

PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported at once
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny():
    from lvlm_hallu import lvlm

    return lvlm.load("tiny-llava")


def request(color: str, new: int, *, too_long: bool = False):
    from lvlm_hallu.lvlm.types import Request

    prompt = "Describe this image. " + ("word " * 3000 if too_long else "")
    return Request(prompt, Image.new("RGB", (40, 40), color), max_new_tokens=new, ignore_eos=True)


def image_tokens(tiny) -> int:
    return tiny.facts.vision_grid ** 2  # what the scheduler counts per image


def room_for_two(tiny, new: int) -> int:
    """A token budget with room for two rows of `new` tokens in flight but not three; a count
    without max_new_tokens (3 prompts + one row's new tokens) would fit three (new >= prompt / 2)."""
    prompt = prefill_shape(tiny, request("red", new), image_tokens(tiny)).prompt_tokens
    assert new >= prompt // 2, "the budget would not tell the two counts apart"
    return 2 * (prompt + new) + prompt // 2


_SOLO: dict[tuple[str, int], list[int]] = {}


def solo(tiny, color: str, new: int) -> list[int]:
    if (color, new) not in _SOLO:
        _SOLO[(color, new)] = tiny.generate([request(color, new)])[0].token_ids
    return _SOLO[(color, new)]


job = st.fixed_dictionaries({
    "kind": st.sampled_from(["submit", "stream", "drop", "cancel", "cancel_future", "error"]),
    "color": st.sampled_from(COLORS),
    "new": st.sampled_from(NEW),
    "submit_at": st.integers(0, 6),  # the decode step at (or after) which it is submitted
    "act_at": st.integers(0, 8),  # drop: after this many tokens; cancel: at this decode step
})
sequence = st.fixed_dictionaries({"jobs": st.lists(job, min_size=2, max_size=7),
                                  "close_at": st.one_of(st.none(), st.integers(1, 8))})


def wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def run_sequence(tiny, seq: dict, max_tokens: int):
    """Run one generated sequence; returns (jobs with their futures, outcomes), after the checks
    made during the run (the per-step limits)."""
    violations: list[str] = []
    at_step: dict[int, list] = {}  # decode step -> actions the engine thread runs before it
    lock = threading.Lock()

    def on_batch(size: int, _fell_back: bool) -> None:  # the engine thread, before each step
        rows = sched._batch.rows
        held = sum(row.prompt_tokens + row.request.max_new_tokens for row in rows)
        if len(rows) > 1 and held > max_tokens:
            violations.append(f"step {sched.steps}: {len(rows)} rows hold {held} > {max_tokens} tokens")
        if len(rows) > MAX_ROWS:
            violations.append(f"step {sched.steps}: {len(rows)} rows")
        with lock:
            actions = [a for s in sorted(at_step) if s <= sched.steps for a in at_step.pop(s)]
        for action in actions:
            action()

    sched = ContinuousScheduler(tiny, max_rows=MAX_ROWS, max_tokens=max_tokens, admit_after_steps=1, on_batch=on_batch)
    jobs = []
    try:
        for spec in sorted(seq["jobs"], key=lambda j: j["submit_at"]):
            # submit at the step asked for, or now if the engine has nothing left to step
            wait_for(lambda: sched.steps >= spec["submit_at"] or (sched.running == 0 and sched.waiting == 0))
            entry = dict(spec, streamed=[], resolved=0)
            cancelled = threading.Event()
            on_token = None
            if spec["kind"] in ("stream", "drop"):
                def on_token(_row, delta, entry=entry):
                    if entry["kind"] == "drop" and len(entry["streamed"]) >= entry["act_at"]:
                        raise StreamCancelled("client disconnected")
                    entry["streamed"].append(delta)
            req = request(spec["color"], spec["new"], too_long=spec["kind"] == "error")
            future = sched.submit(req, on_token, cancelled)
            future.add_done_callback(lambda _f, entry=entry: entry.__setitem__("resolved", entry["resolved"] + 1))
            entry["future"] = future
            step = sched.steps + spec["act_at"]
            if spec["kind"] == "cancel":
                with lock:
                    at_step.setdefault(step, []).append(cancelled.set)
            elif spec["kind"] == "cancel_future":
                with lock:
                    at_step.setdefault(step, []).append(future.cancel)
            jobs.append(entry)
        if seq["close_at"] is not None:
            wait_for(lambda: sched.steps >= seq["close_at"] or (sched.running == 0 and sched.waiting == 0))
            sched.close()
        for entry in jobs:
            wait_for(entry["future"].done)
        wait_for(lambda: sched.running == 0 and sched.waiting == 0 or sched._closed)
        time.sleep(0.01)  # a done-callback resolving twice would show by now
    finally:
        sched.close()
    assert not violations, violations
    return sched, jobs


@pytest.mark.timeout(300)
def test_continuous_scheduler_accounting_holds_after_any_sequence(tiny):
    max_tokens = room_for_two(tiny, max(NEW))
    for color in COLORS:
        for new in NEW:
            solo(tiny, color, new)

    long = {"color": "red", "new": max(NEW), "submit_at": 0, "act_at": 2}

    @PROPERTY
    @given(sequence)
    # always tried: three long rows at once (a third must wait), one dropped, one closed mid-run
    @example({"jobs": [dict(long, kind="submit"), dict(long, kind="stream", color="blue"),
                       dict(long, kind="drop", color="green")], "close_at": None})
    @example({"jobs": [dict(long, kind="submit"), dict(long, kind="cancel"), dict(long, kind="submit")],
              "close_at": 3})
    def check(seq):
        sched, jobs = run_sequence(tiny, seq, max_tokens)
        # nothing left behind: rows, jobs, waiting requests, KV cache, tokens in flight
        assert (sched.running, sched.waiting, len(sched._jobs)) == (0, 0, 0)
        assert sched._batch.state is None, "KV rows left in the cache"
        assert sched._in_flight_tokens() == 0
        for entry in jobs:
            future = entry["future"]
            assert future.done() and entry["resolved"] == 1, entry
            if future.cancelled():
                assert entry["kind"] == "cancel_future"
                continue
            outcome = future.result()
            assert (outcome.result is None) != (outcome.error is None), outcome
            if outcome.result is not None:  # finished: the tokens it gets alone
                assert entry["kind"] != "error"
                assert outcome.result.token_ids == solo(tiny, entry["color"], entry["new"]), entry
                if entry["kind"] == "stream":
                    assert "".join(entry["streamed"]).strip() == outcome.result.text.strip()
            elif seq["close_at"] is not None and "closed" in str(outcome.error):
                pass  # close() fails whatever has not finished yet
            elif entry["kind"] == "error":
                assert "context" in str(outcome.error).lower() or "too long" in str(outcome.error).lower(), outcome.error
            elif isinstance(outcome.error, StreamCancelled):
                assert entry["kind"] in ("drop", "cancel"), entry
            else:
                raise AssertionError(f"{entry}: {outcome.error!r}")
            if seq["close_at"] is None and entry["kind"] in ("submit", "stream"):
                assert outcome.result is not None, (entry, outcome.error)

    check()


def test_in_flight_tokens_count_max_new_tokens_so_a_third_long_row_waits(tiny):
    """Deterministic companion of the property: three long requests with room for two in flight
    (prompt + max_new_tokens each) never decode three at a time."""
    new = max(NEW)
    max_tokens = room_for_two(tiny, new)
    sizes: list[int] = []
    sched = ContinuousScheduler(tiny, max_rows=MAX_ROWS, max_tokens=max_tokens, admit_after_steps=0,
                                on_batch=lambda size, _f: sizes.append(size))
    try:
        futures = [sched.submit(request(c, new)) for c in COLORS]
        outcomes = [f.result(timeout=60) for f in futures]
    finally:
        sched.close()
    assert max(sizes) == 2 and 2 in sizes, sizes
    assert [o.result.token_ids for o in outcomes] == [solo(tiny, c, new) for c in COLORS]
