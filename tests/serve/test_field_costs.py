"""Every request field has a bounded cost, checked before the request is queued (serve/limits.py
`check_costs`, serve/chat.py): huge intervention prompts, lists, strings and stop sequences are
400s naming the field, in process with the fake pipeline, and the engine never sees them. The
same against the running service, with a neighbour's latency measured, is in test_faults.py."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from lvlm_hallu.serve.app import Service, build_app
from lvlm_hallu.serve.config import ServeConfig
from lvlm_hallu.serve.limits import Limits
from tests.serve.conftest import FakePipeline, png
from tests.serve.test_app import AUTH, KEY, body


@pytest.fixture
def served():
    pipeline = FakePipeline()
    service = Service(pipeline, ServeConfig(model="fake", api_key=KEY, limits=Limits(max_tokens=64)))
    with TestClient(build_app(service), raise_server_exceptions=False) as http:
        yield http, pipeline


HUGE = [
    ("carve-prompt", {"interventions": [{"name": "carve", "general_prompt": "x" * 6_000_000}]},
     "interventions.0.general_prompt", "context_length_exceeded"),
    ("carve-prompt-plus-chat", {"interventions": [{"name": "carve", "general_prompt": "x" * 31_990}]},
     "interventions.0.general_prompt", "context_length_exceeded"),
    ("sink-dims", {"interventions": [{"name": "var", "sink_dims": list(range(2_000_000))}]}, None, "too_many_values"),
    ("sink-dims-parser", {"interventions": [{"name": "var", "sink_dims": list(range(9000))}]},
     "interventions.0.sink_dims", "invalid_value"),
    ("sink-dims-model", {"interventions": [{"name": "var", "sink_dims": list(range(40))}]},
     "interventions.0.sink_dims", "invalid_value"),
    ("layers", {"interventions": [{"name": "vhr", "layers": [1] * 33}]}, "interventions.0.layers", "invalid_value"),
    ("nested", {"interventions": [{"name": "vhr", "layers": [[[[1]]]]}]}, "interventions.0.layers.0.0",
     "invalid_value"),
    ("plus-string", {"interventions": "+" * 3_000_000}, "interventions", "invalid_value"),
    ("many", {"interventions": ["vhr"] * 9}, "interventions", "invalid_value"),
    ("big-int", {"interventions": [{"name": "vhr", "alpha": 10**30}]}, "interventions.0.alpha", "invalid_value"),
    ("stop", {"stop": ["y" * 257]}, "stop.0", "invalid_value"),
    ("model", {"model": "m" * 300}, "model", "invalid_value"),
    ("user", {"user": "u" * 300}, "user", "invalid_value"),
]


@pytest.mark.parametrize("name, extra, param, code", HUGE, ids=[h[0] for h in HUGE])
def test_unbounded_fields_are_refused_before_queueing(served, name, extra, param, code):
    http, pipeline = served
    payload = json.dumps(body(**extra))
    r = http.post("/v1/chat/completions", headers={**AUTH, "content-type": "application/json"}, content=payload)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert pipeline.batches == [], "the engine never saw it"
    ok = http.post("/v1/chat/completions", headers=AUTH, json=body(max_tokens=3))
    assert ok.status_code == 200, "and nothing was lost"


def test_a_list_up_to_the_models_dimensions_is_fine(served):
    http, _ = served  # the fake model: 6 layers, 4 heads, hidden size 32
    r = http.post("/v1/chat/completions", headers=AUTH,
                  json=body(interventions=[{"name": "var", "sink_dims": list(range(32))}], max_tokens=3))
    assert r.status_code == 200, r.text[:300]


def test_eval_jobs_bound_their_interventions_too(served):
    http, _ = served
    r = http.post("/v1/eval/jobs", headers=AUTH, json={"kind": "pope", "interventions": "+" * 1000})
    assert r.status_code in (400, 503)  # 503: jobs disabled on this server; never a 500


def test_router_outside_the_router_dir_or_unreadable_is_a_400(served, tmp_path, monkeypatch):
    http, _ = served
    routers, outside = tmp_path / "routers", tmp_path / "elsewhere"
    routers.mkdir()
    outside.mkdir()
    import torch

    torch.save({"w1": torch.zeros(4, 8), "w2": torch.zeros(2, 4)}, outside / "secret.pt")
    (routers / "escape.pt").symlink_to(outside / "secret.pt")
    (routers / "broken.pt").write_bytes(b"not a torch file")
    monkeypatch.setenv("LVLM_ROUTER_DIR", str(routers))
    for name in ("escape", "broken"):
        spec = [{"name": "vte", "policy": "router", "router": name}]
        started = time.perf_counter()
        r = http.post("/v1/chat/completions", headers=AUTH, json=body(interventions=spec, max_tokens=3))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_intervention", r.text[:300]
        assert time.perf_counter() - started < 30
