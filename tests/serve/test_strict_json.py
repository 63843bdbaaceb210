"""Strict JSON (serve/chat.py, serve/app.py): no NaN or ±Infinity in any answer or stream event,
on the tiny model in process. PAI's contrast gives some tokens zero probability (log p = -inf):
they are not top alternatives, and the answer stays parseable by a strict parser, streamed and
not. A tiny top_p keeps the most likely token (the greedy answer) instead of failing."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from lvlm_hallu.serve.app import build_app
from lvlm_hallu.serve.chat import LOGPROB_FLOOR, jsonable, logprobs
from lvlm_hallu.serve.gateway import asgi_answer
from tests.serve.test_disconnects import HEADERS, chat_body, make_service


def strict(text: str) -> object:
    """json.loads that refuses NaN, Infinity and -Infinity, as strict parsers (JavaScript, Go) do."""
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def events(body: bytes) -> list:
    lines = [line for line in body.decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [strict(line[len("data: "):]) for line in lines[:-1]]


@pytest.fixture(scope="module")
def app():
    """The embedded shapes model: trained, so PAI's plausibility cut leaves tokens at -inf (the
    random-weight tiny model keeps every token plausible)."""
    from lvlm_hallu import lvlm

    service = make_service(lvlm.load("shapes"), "continuous")
    yield build_app(service)
    service.runner.close()


def post(app, body: bytes) -> dict:
    return asyncio.run(asgi_answer(app, "POST", "/v1/chat/completions", "", HEADERS, body))


def test_pai_with_logprobs_is_strict_json_streamed_and_not(app):
    # PAI's contrast named explicitly: its plausibility cut is what leaves tokens at -inf, and the
    # shipped default need not use it (the shapes model's tuned PAI did; its paper values do not).
    extra = {"interventions": [{"name": "pai", "contrast": True}], "logprobs": True, "top_logprobs": 20}
    plain = post(app, chat_body(1, max_tokens=8, **extra))
    assert plain["status"] == 200, plain["body"][:300]
    choice = strict(plain["body"].decode())["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) >= 1
    for entry in entries:
        assert math.isfinite(entry["logprob"]) and all(math.isfinite(t["logprob"]) for t in entry["top_logprobs"])
    assert min(len(e["top_logprobs"]) for e in entries) < 20, "zero-probability tokens are not alternatives"
    streamed = post(app, chat_body(1, max_tokens=8, stream=True, **extra))
    assert streamed["status"] == 200
    chunks = events(streamed["body"])
    assert not [c for c in chunks if "error" in c]
    tokens = [t["token"] for c in chunks for ch in c["choices"] for t in ((ch.get("logprobs") or {}).get("content") or [])]
    assert tokens == [e["token"] for e in entries], "the stream carries the same tokens"


def test_zero_probability_alternatives_are_dropped_and_a_chosen_one_is_floored():
    from lvlm_hallu.lvlm.types import TokenLogprob

    top = (TokenLogprob(1, "a", (97,), -0.1), TokenLogprob(2, "b", (98,), -math.inf),
           TokenLogprob(3, "c", (99,), math.nan))
    out = logprobs([TokenLogprob(1, "a", (97,), -math.inf, top)]).content[0]
    assert out.logprob == LOGPROB_FLOOR and [t.token for t in out.top_logprobs] == ["a"]
    assert jsonable({"x": math.inf, "y": [math.nan, 1.5]}) == {"x": None, "y": [None, 1.5]}


def test_a_tiny_top_p_keeps_the_most_likely_token(app):
    greedy = post(app, chat_body(2, max_tokens=8))
    for top_p in (1e-300, 1e-7):
        sampled = post(app, chat_body(2, max_tokens=8, temperature=1.0, top_p=top_p, seed=3))
        assert sampled["status"] == 200, sampled["body"][:300]
        assert strict(sampled["body"].decode())["choices"][0]["message"] == \
            strict(greedy["body"].decode())["choices"][0]["message"]
