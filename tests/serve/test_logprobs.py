"""OpenAI `logprobs` / `top_logprobs` through the app with the real tiny model (continuous
scheduler, in process): the numbers are the engine's (themselves equal to transformers' generate
scores, tests/lvlm/test_logprobs.py), the stream carries the same entries as the non-stream answer,
the official openai client parses both, and out-of-range values are 400s."""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import resolve
from lvlm_hallu.serve.app import Service, build_app
from lvlm_hallu.serve.chat import answer_text
from lvlm_hallu.serve.config import ServeConfig
from tests.serve.conftest import data_url, png

KEY = "logprobs-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def pipe():
    return lvlm.load("tiny-llava")


@pytest.fixture(scope="module")
def http(pipe):
    service = Service(pipe, ServeConfig(model="tiny-llava", api_key=KEY, warmup=False, eval_jobs=False))
    with TestClient(build_app(service), raise_server_exceptions=False) as client:
        yield client
    service.runner.close()


def body(**extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(png((40, 30)))}}, {"type": "text", "text": PROMPT}]
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def engine_entries(pipe, k: int, interventions=()):
    """The same request straight through the engine."""
    image = Image.open(io.BytesIO(png((40, 30)))).convert("RGB")
    (result,) = pipe.generate([lvlm.Request(PROMPT, image, max_new_tokens=8, logprobs=k, interventions=interventions)])
    return result


def stream_events(http, payload) -> list[dict]:
    with http.stream("POST", "/v1/chat/completions", headers=AUTH, json={**payload, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_non_stream_logprobs_are_the_engines(http, pipe):
    r = http.post("/v1/chat/completions", headers=AUTH, json=body(logprobs=True, top_logprobs=3))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    expected = engine_entries(pipe, 3)
    assert [e["logprob"] for e in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-6)
    for wire, entry in zip(content, expected.logprobs):
        assert wire["token"] == entry.token and wire["bytes"] == list(wire["token"].encode())
        assert len(wire["top_logprobs"]) == 3
        assert [t["logprob"] for t in wire["top_logprobs"]] == pytest.approx([t.logprob for t in entry.top], abs=1e-6)
        assert wire["top_logprobs"][0]["token"] == wire["token"]  # greedy picks the argmax
    assert answer_text("".join(e["token"] for e in content)) == choice["message"]["content"]


def test_without_logprobs_the_field_is_null(http):
    r = http.post("/v1/chat/completions", headers=AUTH, json=body())
    assert r.json()["choices"][0]["logprobs"] is None
    r = http.post("/v1/chat/completions", headers=AUTH, json=body(logprobs=False))
    assert r.json()["choices"][0]["logprobs"] is None


def test_stream_carries_the_same_entries(http):
    full = http.post("/v1/chat/completions", headers=AUTH, json=body(logprobs=True, top_logprobs=2)).json()
    events = stream_events(http, body(logprobs=True, top_logprobs=2))
    streamed = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert streamed == full["choices"][0]["logprobs"]["content"]
    text = "".join(c["delta"].get("content", "") for ev in events for c in ev["choices"])
    assert text == full["choices"][0]["message"]["content"]


def test_intervention_logprobs_are_of_the_adjusted_distribution(http, pipe):
    spec = [{"name": "pai", "alpha": 2.0, "start_layer": 0}]
    r = http.post("/v1/chat/completions", headers=AUTH, json=body(logprobs=True, top_logprobs=1, interventions=spec))
    content = r.json()["choices"][0]["logprobs"]["content"]
    expected = engine_entries(pipe, 1, tuple(resolve(spec)))
    assert [e["logprob"] for e in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-6)
    plain = engine_entries(pipe, 1)
    assert [e.logprob for e in plain.logprobs] != pytest.approx([e["logprob"] for e in content], abs=1e-4)
    assert all(e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"]) for e in content)


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprobs_values_are_400(http, extra, param):
    r = http.post("/v1/chat/completions", headers=AUTH, json=body(**extra))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_parses_logprobs(http):
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
    messages = body()["messages"]
    reply = oai.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=6, logprobs=True,
                                        top_logprobs=4)
    content = reply.choices[0].logprobs.content
    assert content and all(isinstance(t, openai.types.chat.ChatCompletionTokenLogprob) for t in content)
    assert all(len(t.top_logprobs) == 4 and t.logprob <= 0 and t.bytes for t in content)
    stream = oai.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=6, logprobs=True,
                                         top_logprobs=4, stream=True)
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content or []]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny-llava", messages=messages, logprobs=True, top_logprobs=21)
    assert info.value.body["param"] == "top_logprobs"


def test_sdk_chat_logprobs(http):
    from lvlm_hallu.serve.client import Client

    reply = Client(api_key=KEY, http_client=http).chat(png((40, 30)), PROMPT, max_tokens=6, logprobs=2)
    content = reply.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    assert answer_text("".join(t.token for t in content)) == reply.text
