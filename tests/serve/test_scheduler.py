"""The continuous scheduler's admission policy (serve/scheduler.py): the pure `Admission` rule,
the prefill estimate against the real prefill, and the engine loop's order of prefills and decode
steps on the tiny model."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from lvlm_hallu.interventions import resolve
from lvlm_hallu.lvlm.types import Request
from lvlm_hallu.serve.scheduler import Admission, ContinuousScheduler, PrefillShape, prefill_shape


def shapes(*pairs, new=8):
    return [PrefillShape(rows, tokens, new) for rows, tokens in pairs]


# -- Admission: a pure function of the queue's state --------------------------------------------------

def test_prefill_is_bounded_by_prompt_tokens_not_requests():
    policy = Admission(max_rows=16, max_prefill_tokens=300)
    assert policy.take(shapes(*[(1, 100)] * 5), running=0, in_flight=0, steps_left=0) == (3, True)
    assert policy.take(shapes(*[(1, 30)] * 12), running=0, in_flight=0, steps_left=0) == (10, True)


def test_twin_rows_and_left_padding_count_against_the_budget():
    policy = Admission(max_rows=16, max_prefill_tokens=300)
    # a VHR request prefills its image-removed twin too: 2 rows of 100 tokens
    assert policy.take(shapes((2, 100), (2, 100)), running=0, in_flight=0, steps_left=0) == (1, True)
    assert policy.take(shapes((2, 100), (1, 100)), running=0, in_flight=0, steps_left=0) == (2, True)
    # a short prompt is padded to the group's longest: 2 rows x 200 > 300
    assert policy.take(shapes((1, 50), (1, 200)), running=0, in_flight=0, steps_left=0) == (1, True)


def test_a_prompt_over_the_budget_is_prefilled_alone():
    policy = Admission(max_rows=8, max_prefill_tokens=100)
    assert policy.take(shapes((2, 400), (1, 10)), running=0, in_flight=0, steps_left=0) == (1, True)
    assert policy.take(shapes((2, 400)), running=7, in_flight=0, steps_left=0) == (1, True)  # it fills the budget


def test_rows_and_tokens_in_flight_limit_the_group():
    policy = Admission(max_rows=8, max_tokens=1000, max_prefill_tokens=4096)
    assert policy.take(shapes(*[(1, 10)] * 6), running=4, in_flight=0, steps_left=99) == (4, True)
    assert policy.take(shapes(*[(1, 10)] * 6), running=8, in_flight=0, steps_left=99) == (0, False)
    # 100 + 8 tokens each against 1000 - 700 in flight: two fit
    assert policy.take(shapes(*[(1, 100)] * 4), running=2, in_flight=700, steps_left=99) == (2, True)
    # into an empty batch the first request always fits, however large
    assert policy.take(shapes((1, 5000)), running=0, in_flight=0, steps_left=0) == (1, True)


def test_a_running_batch_refills_once_its_idle_rows_would_cost_more_than_a_prefill_call():
    """Free rows are refilled once (newcomers / max_rows) x (steps the longest running row may still
    take) reaches admit_after_steps: the decode those rows would idle, in whole-batch steps."""
    policy = Admission(max_rows=8, max_prefill_tokens=2048, admit_after_steps=6)
    two = shapes((1, 75), (1, 75))
    assert policy.take(two, running=6, in_flight=0, steps_left=23) == (2, False)  # 2/8 x 23 < 6: wait
    assert policy.take(two, running=6, in_flight=0, steps_left=24) == (2, True)  # 2/8 x 24 = 6
    assert policy.take(two[:1], running=7, in_flight=0, steps_left=48) == (1, True), "a long answer refills at once"
    seven = shapes(*[(1, 75)] * 7)
    assert policy.take(seven, running=1, in_flight=0, steps_left=6) == (7, False)  # short answers: the batch drains
    assert policy.take(seven, running=1, in_flight=0, steps_left=7) == (7, True)
    assert policy.take(two, running=0, in_flight=0, steps_left=0) == (2, True), "an empty batch never waits"
    # a group that fills the prefill budget cannot grow by waiting
    assert Admission(max_rows=8, max_prefill_tokens=150).take(two + two, running=2, in_flight=0,
                                                               steps_left=1) == (2, True)
    # twin rows count against the budget, not against the refill rule (it counts requests = main rows)
    assert policy.take(shapes((2, 75), (2, 75)), running=6, in_flight=0, steps_left=23) == (2, False)
    assert Admission(max_rows=8, admit_after_steps=0).take(two[:1], running=7, in_flight=0,
                                                           steps_left=0) == (1, True), "0 refills at once"


def test_admission_rejects_nonsense_limits():
    with pytest.raises(ValueError):
        Admission(max_prefill_tokens=0)
    with pytest.raises(ValueError):
        Admission(admit_after_steps=-1)


# -- on the tiny model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from lvlm_hallu import lvlm

    return lvlm.load("tiny-llava")


@pytest.mark.parametrize("spec, twins", [("none", 0), ("vhr", 1), ("pai", 0), ("vhr+var", 1)])
def test_prefill_estimate_equals_the_prefill(tiny, spec, twins):
    for prompt in ["Hi", "What is in the picture? " * 5]:
        request = Request(prompt, Image.new("RGB", (40, 32)), max_new_tokens=3, interventions=resolve(spec))
        shape = prefill_shape(tiny, request, tiny.facts.vision_grid ** 2)
        plan = tiny.build_plan([request])
        assert shape == PrefillShape(1 + twins, tiny.generate([request])[0].prompt_tokens, 3)
        assert shape.rows == 1 + len(getattr(plan, "twins_needed", ()))


def test_engine_loop_prefills_within_the_budget_and_decodes_between_prefills(tiny):
    """A long answer keeps decoding while short requests join: never two prefills without a decode
    step between them, and no group over the token budget; every answer equals the one alone."""
    budget = 120  # two plain prompts of <= 55 tokens, or one VHR request with its twin
    scheduler = ContinuousScheduler(tiny, max_rows=6, max_prefill_tokens=budget, admit_after_steps=2)
    events: list[tuple[str, int]] = []
    batch = scheduler._batch
    admit, step = batch.admit, batch.step

    def traced_admit(requests, **kwargs):
        shape = [prefill_shape(tiny, r, tiny.facts.vision_grid ** 2) for r in requests]
        events.append(("prefill", sum(s.rows for s in shape) * max(s.prompt_tokens for s in shape)))
        return admit(requests, **kwargs)

    def traced_step():
        events.append(("step", len(batch)))
        return step()

    batch.admit, batch.step = traced_admit, traced_step
    specs = ["none", "vhr", "none", "pai", "vhr+var", "none", "none", "var"]
    long = Request("Describe this image.", Image.new("RGB", (40, 40), "red"), max_new_tokens=40, ignore_eos=True)
    short = [Request(["Hi", "Describe this image."][i % 2], Image.new("RGB", (32 + 4 * i, 32), "blue"),
                     max_new_tokens=3 + i % 4, interventions=resolve(spec)) for i, spec in enumerate(specs)]
    try:
        futures = [scheduler.submit(long)] + [scheduler.submit(r) for r in short]
        outcomes = [f.result(timeout=300) for f in futures]
    finally:
        scheduler.close()
    assert [o.error for o in outcomes] == [None] * len(futures)
    assert [o.result.token_ids for o in outcomes] == [tiny.generate([r])[0].token_ids for r in [long, *short]]
    prefills = [(i, cost) for i, (kind, cost) in enumerate(events) if kind == "prefill"]
    assert all(cost <= budget for _, cost in prefills)
    assert all(events[i + 1][0] == "step" for i, _ in prefills[:-1]), "a decode step after every prefill"
    assert scheduler.prefills == len(prefills) < len(futures), "newcomers were prefilled in groups"
    assert scheduler.prefilled == len(futures)


def traced_groups(scheduler) -> list[int]:
    """Requests per prefill call of the scheduler's batch, recorded as they are admitted."""
    groups: list[int] = []
    batch = scheduler._batch
    admit = batch.admit

    def traced_admit(requests, **kwargs):
        groups.append(len(requests))
        return admit(requests, **kwargs)

    batch.admit = traced_admit
    return groups


def run_all(scheduler, requests) -> list:
    try:
        futures = [scheduler.submit(r) for r in requests]
        return [f.result(timeout=300) for f in futures]
    finally:
        scheduler.close()


@pytest.mark.parametrize("refill", [6, 0])
def test_a_deep_queue_of_short_answers_prefills_static_sized_groups_unless_told_to_refill_at_once(tiny, refill):
    """Short answers (3-5 tokens, 4 rows): with the refill threshold, every group is as large as a
    static batch, because free rows would idle for fewer steps than a prefill call costs; with 0 the
    first freed row is refilled at once. Tokens equal the solo runs either way."""
    specs = ["none", "vhr", "var", "vhr+var", "pai", "none"]
    requests = [Request("Describe this image.", Image.new("RGB", (32 + 4 * i, 32), "blue"), max_new_tokens=3 + i % 3,
                        interventions=resolve(specs[i % len(specs)]), ignore_eos=True) for i in range(12)]
    scheduler = ContinuousScheduler(tiny, max_rows=4, admit_after_steps=refill)
    groups = traced_groups(scheduler)
    outcomes = run_all(scheduler, requests)
    assert [o.error for o in outcomes] == [None] * len(requests)
    assert [o.result.token_ids for o in outcomes] == [tiny.generate([r])[0].token_ids for r in requests]
    assert sum(groups) == len(requests)
    if refill:
        assert groups == [4, 4, 4]
    else:
        assert len(groups) > 3 and min(groups) < 4


def test_a_long_running_row_has_freed_rows_refilled_at_once(tiny):
    """Two 40-token answers run beside 8-token ones (3 rows): each time a short row frees, the long
    rows still have 18-32 steps to go (1/3 x 18 >= 6), so the next request joins alone, at once."""
    lengths = [8, 40, 40, 8, 8, 8]
    requests = [Request("Describe this image.", Image.new("RGB", (40, 40), "red"), max_new_tokens=n,
                        interventions=resolve(["none", "vhr"][i % 2]), ignore_eos=True) for i, n in enumerate(lengths)]
    scheduler = ContinuousScheduler(tiny, max_rows=3, admit_after_steps=6)
    groups = traced_groups(scheduler)
    steps_at_admission: list[int] = []
    admit = scheduler._batch.admit

    def noting_step(requests, **kwargs):
        steps_at_admission.append(scheduler.steps)
        return admit(requests, **kwargs)

    scheduler._batch.admit = noting_step
    outcomes = run_all(scheduler, requests)
    assert [o.result.token_ids for o in outcomes] == [tiny.generate([r])[0].token_ids for r in requests]
    assert groups == [3, 1, 1, 1]
    assert steps_at_admission == [0, 7, 14, 21], "each newcomer joins right after the step that freed a row"


def test_a_drained_batch_waits_for_the_clients_of_its_last_rows(tiny):
    """After a drain the batch waits until as many requests have arrived as its last rows (the
    closed loop's clients coming back), at most GATHER_STEPS decode steps' time: two expected
    clients arriving 0.2 s apart form one group, and they end the wait (well before its 2 s cap).
    A request that finds the batch idle for longer is admitted alone at once."""
    requests = [Request("Describe this image.", Image.new("RGB", (32 + 8 * i, 32), "green"), max_new_tokens=3)
                for i in range(3)]
    scheduler = ContinuousScheduler(tiny, max_rows=4)
    groups = traced_groups(scheduler)
    try:
        with scheduler._wake:  # as if a batch of two rows and 0.5 s steps had just drained
            scheduler._step_s, scheduler._drained_at = 0.5, time.perf_counter()
            scheduler._owed = scheduler._arrivals + 2
        started = time.perf_counter()
        first = scheduler.submit(requests[0])
        time.sleep(0.2)
        second = scheduler.submit(requests[1])
        outcomes = [first.result(timeout=60), second.result(timeout=60)]
        waited = time.perf_counter() - started
        time.sleep(0.3)  # far longer than GATHER_STEPS tiny-model steps: the batch is idle, not just drained
        outcomes.append(scheduler.submit(requests[2]).result(timeout=60))
    finally:
        scheduler.close()
    assert [o.result.token_ids for o in outcomes] == [tiny.generate([r])[0].token_ids for r in requests]
    assert groups == [2, 1]
    assert waited < 1.5, "the second client's arrival ended the wait"
