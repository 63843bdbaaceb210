"""The continuous scheduler's admission policy (serve/scheduler.py): the pure `Admission` rule,
the prefill estimate against the real prefill, and the engine loop's order of prefills and decode
steps on the tiny model."""

from __future__ import annotations

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
    assert policy.take(shapes(*[(1, 100)] * 5), running=0, in_flight=0, held_steps=0) == (3, True)
    assert policy.take(shapes(*[(1, 30)] * 12), running=0, in_flight=0, held_steps=0) == (10, True)


def test_twin_rows_and_left_padding_count_against_the_budget():
    policy = Admission(max_rows=16, max_prefill_tokens=300)
    # a VHR request prefills its image-removed twin too: 2 rows of 100 tokens
    assert policy.take(shapes((2, 100), (2, 100)), running=0, in_flight=0, held_steps=0) == (1, True)
    assert policy.take(shapes((2, 100), (1, 100)), running=0, in_flight=0, held_steps=0) == (2, True)
    # a short prompt is padded to the group's longest: 2 rows x 200 > 300
    assert policy.take(shapes((1, 50), (1, 200)), running=0, in_flight=0, held_steps=0) == (1, True)


def test_a_prompt_over_the_budget_is_prefilled_alone():
    policy = Admission(max_rows=8, max_prefill_tokens=100)
    assert policy.take(shapes((2, 400), (1, 10)), running=0, in_flight=0, held_steps=0) == (1, True)
    assert policy.take(shapes((2, 400)), running=7, in_flight=0, held_steps=0) == (1, True)  # it fills the budget


def test_rows_and_tokens_in_flight_limit_the_group():
    policy = Admission(max_rows=8, max_tokens=1000, max_prefill_tokens=4096)
    assert policy.take(shapes(*[(1, 10)] * 6), running=4, in_flight=0, held_steps=0) == (4, True)
    assert policy.take(shapes(*[(1, 10)] * 6), running=8, in_flight=0, held_steps=0) == (0, False)
    # 100 + 8 tokens each against 1000 - 700 in flight: two fit
    assert policy.take(shapes(*[(1, 100)] * 4), running=2, in_flight=700, held_steps=9) == (2, True)
    # into an empty batch the first request always fits, however large
    assert policy.take(shapes((1, 5000)), running=0, in_flight=0, held_steps=0) == (1, True)


def test_newcomers_wait_for_a_group_while_rows_run_but_not_longer_than_admit_after_steps():
    policy = Admission(max_rows=8, max_prefill_tokens=2048, admit_after_steps=4)
    few = shapes((1, 75), (1, 75))
    assert policy.take(few, running=6, in_flight=0, held_steps=0) == (2, False)
    assert policy.take(few, running=6, in_flight=0, held_steps=3) == (2, False)
    assert policy.take(few, running=6, in_flight=0, held_steps=4) == (2, True)
    assert policy.take(few, running=0, in_flight=0, held_steps=0) == (2, True), "an empty batch never waits"
    # half of max_rows is a group worth a prefill call
    assert policy.take(shapes(*[(1, 75)] * 4), running=4, in_flight=0, held_steps=0) == (4, True)
    # so is a group that fills the budget
    assert Admission(max_rows=8, max_prefill_tokens=150).take(few + few, running=2, in_flight=0,
                                                               held_steps=0) == (2, True)
    assert Admission(max_rows=8, admit_after_steps=0).take(few[:1], running=7, in_flight=0, held_steps=0) == (1, True)


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
