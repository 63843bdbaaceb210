"""Resumable runner: interrupted and torn runs resume to exactly the uninterrupted records; adapters; Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lvlm_hallu.eval.errors import ResultsFileError
from lvlm_hallu.eval.runner import Item, ResultsFile, local_answer, remote_answer, run, split_spec
from lvlm_hallu.lvlm.types import Request, Result

REPO = Path(__file__).resolve().parents[2]


def make_items(n=10):
    return [Item(f"k{i}", f"prompt {i}", None, {"i": i}) for i in range(n)]


def echo(batch):
    return [f"answer to {it.prompt}" for it in batch]


class Boom(RuntimeError):
    pass


def failing_after(k):
    done = {"n": 0}

    def answer(batch):
        if done["n"] + len(batch) > k:
            raise Boom("crash")
        done["n"] += len(batch)
        return echo(batch)

    return answer


def counting(calls):
    def answer(batch):
        calls.extend(it.key for it in batch)
        return echo(batch)

    return answer


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "reference.jsonl"
    records = run(make_items(), echo, path, batch_size=2, progress=False)
    return path.read_bytes(), records


def test_records_are_keyed_json_lines(reference):
    data, records = reference
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert [r["key"] for r in lines] == [f"k{i}" for i in range(10)]
    assert lines[3] == {"key": "k3", "i": 3, "answer": "answer to prompt 3"}
    assert list(records) == [f"k{i}" for i in range(10)]


def test_interrupted_run_resumes_to_identical_records(tmp_path, reference):
    path = tmp_path / "run.jsonl"
    with pytest.raises(Boom):
        run(make_items(), failing_after(4), path, batch_size=2, progress=False)
    assert len(path.read_text().splitlines()) == 4  # finished batches were kept
    calls: list[str] = []
    records = run(make_items(), counting(calls), path, batch_size=2, progress=False)
    assert calls == [f"k{i}" for i in range(4, 10)]  # finished keys skipped
    assert path.read_bytes() == reference[0]
    assert records == reference[1]


def test_torn_last_line_is_discarded(tmp_path, reference):
    lines = reference[0].splitlines(keepends=True)
    path = tmp_path / "torn.jsonl"
    path.write_bytes(b"".join(lines[:5]) + lines[5][:17])  # crash in the middle of a write
    calls: list[str] = []
    run(make_items(), counting(calls), path, batch_size=3, progress=False)
    assert calls == [f"k{i}" for i in range(5, 10)]
    assert path.read_bytes() == reference[0]


def test_finished_run_is_not_repeated_or_duplicated(tmp_path, reference):
    path = tmp_path / "done.jsonl"
    path.write_bytes(reference[0])
    calls: list[str] = []
    run(make_items(), counting(calls), path, batch_size=2, progress=False)
    assert calls == [] and path.read_bytes() == reference[0]
    results = ResultsFile(path)
    results.append([{"key": "k1", "answer": "again"}])
    assert path.read_bytes() == reference[0]


def test_corrupt_middle_line_is_an_error(tmp_path, reference):
    lines = reference[0].splitlines(keepends=True)
    path = tmp_path / "corrupt.jsonl"
    path.write_bytes(lines[0] + b"{not json\n" + lines[2])
    with pytest.raises(ResultsFileError):
        ResultsFile(path)


def test_duplicate_item_keys_rejected(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run([Item("a", "p"), Item("a", "q")], echo, tmp_path / "x.jsonl", progress=False)


# ---------------------------------------------------------------------------------------------
# Adapters


class FakePipeline:
    """Stands in for an lvlm pipeline: records the requests, answers with their fields."""

    def __init__(self):
        self.requests: list[Request] = []

    def generate(self, requests):
        self.requests.extend(requests)
        return [
            Result(
                text=f"{r.prompt}|{r.image.size if r.image else None}|{r.interventions}",
                token_ids=[1],
                finish_reason="stop",
                prompt_tokens=3,
            )
            for r in requests
        ]


def test_local_adapter_builds_requests(tmp_path):
    img = tmp_path / "a.png"
    Image.new("L", (5, 4)).save(img)  # grayscale on disk: the adapter must hand RGB to the model
    pipe = FakePipeline()
    answer = local_answer(pipe, max_new_tokens=64, seed=3, interventions="vhr+var")
    out = answer([Item("a", "Describe.", str(img)), Item("b", "Text only.")])
    assert out == ["Describe.|(5, 4)|('vhr', 'var')", "Text only.|None|('vhr', 'var')"]
    first = pipe.requests[0]
    assert (first.max_new_tokens, first.temperature, first.seed, first.image.mode) == (64, 0.0, 3, "RGB")
    resolved = local_answer(pipe, interventions="vhr", resolve=lambda spec: (f"cfg:{spec}",))
    assert resolved([Item("c", "x")]) == ["x|None|('cfg:vhr',)"]
    assert split_spec("none") == () and split_spec(None) == () and split_spec([{"name": "vhr"}]) == ({"name": "vhr"},)


def test_remote_adapter_calls_chat(tmp_path):
    calls = []

    class Client:
        def chat(self, image, prompt, *, interventions=None, max_tokens=512, temperature=0.0):
            calls.append((prompt, interventions, max_tokens, temperature))
            return f"reply:{prompt}"

    answer = remote_answer(Client(), max_tokens=16, interventions="vhr")
    assert answer([Item("a", "p1"), Item("b", "p2")]) == ["reply:p1", "reply:p2"]
    assert sorted(calls) == [("p1", "vhr", 16, 0.0), ("p2", "vhr", 16, 0.0)]


# ---------------------------------------------------------------------------------------------
# Ray (one test: a cluster start costs ~10 s)

# Runs in its own interpreter: a Ray cluster that fails to start (GCS timeouts on a loaded machine)
# aborts the driver process from C++, which must fail this test, not kill the whole pytest run.
RAY_SCRIPT = """
import json, os, sys
import ray
from lvlm_hallu.eval.runner import Item, RayPool

def factory():
    class Model:
        def info(self):
            return {"model_id": "fake", "pid": os.getpid()}

        def generate(self, requests):
            from lvlm_hallu.lvlm.types import Result
            return [Result(text=f"{r.prompt}@{os.getpid()}", token_ids=[], finish_reason="stop", prompt_tokens=0)
                    for r in requests]

    return Model()

items = [Item(f"k{i}", f"prompt {i}", None, {"i": i}) for i in range(12)]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
try:
    pool = RayPool(factory, num_actors=2)
    info = pool.info()
    pool.where()  # both replicas up: batches go only to ready replicas, and the fake answers at once
    records = pool.run(items, sys.argv[1], batch_size=2, progress=False)
    again = pool.run(items, sys.argv[1], batch_size=2, progress=False)  # nothing left to do
    pool.shutdown()
finally:
    ray.shutdown()
print("RESULT " + json.dumps({"info": info, "records": records, "same": records == again, "driver": os.getpid()}))
"""


@pytest.mark.slow
def test_ray_actors_resume_and_spread(tmp_path):
    pytest.importorskip("ray")
    path = tmp_path / "ray.jsonl"
    path.write_text(
        "".join(json.dumps({"key": f"k{i}", "i": i, "answer": f"prompt {i}@done"}) + "\n" for i in range(3))
    )
    # actors import eval/ and lvlm/ from this checkout even when the project is not installed
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", RAY_SCRIPT, str(path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=240
    )
    result_lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and result_lines, f"ray run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    out = json.loads(result_lines[-1][len("RESULT ") :])
    info, records = out["info"], out["records"]
    assert info["model_id"] == "fake" and info["pid"] != out["driver"]  # the model was built inside an actor
    assert list(records) == [f"k{i}" for i in range(12)]
    assert out["same"]
    answers = [records[f"k{i}"]["answer"] for i in range(12)]
    assert answers[:3] == [f"prompt {i}@done" for i in range(3)]  # resumed, not recomputed
    assert all(a.startswith(f"prompt {i}@") for i, a in enumerate(answers))
    assert len({a.split("@")[1] for a in answers[3:]}) == 2  # both actors answered
    lines = path.read_text().splitlines()
    assert len(lines) == 12 and len({json.loads(x)["key"] for x in lines}) == 12
