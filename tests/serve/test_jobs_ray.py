"""Eval jobs on Ray with the durable store: a killed worker's job resumes to exactly N records, a
killed registry comes back (max_restarts) with every job listed from the store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

LIMIT = 16  # POPE questions (one split); batches of 2 leave time to kill the worker mid-job
REQUEST = {"kind": "pope", "limit": LIMIT, "max_tokens": 3, "seed": 0, "batch_size": 2, "interventions": None,
           "options": {"splits": ["random"], "parser": "pope"}}


@pytest.fixture
def jobs(tmp_path):
    from serve.jobs import RayJobs

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield RayJobs(worker_options={"num_cpus": 1}, max_running=1, jobs_dir=str(tmp_path / "jobs"))
    ray.shutdown()


def call(jobs, method: str, *args):
    return ray.get(getattr(jobs._actor, method).remote(*args), timeout=120)


def wait_for(jobs, job_id: str, ok, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = call(jobs, "get", job_id)
        if ok(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job never reached the state wanted: {job}")


def records(job: dict) -> list[dict]:
    (path,) = Path(job["workdir"]).glob("*.jsonl")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [r for r in rows if "key" in r]  # the first line is the run fingerprint


@pytest.mark.slow
def test_killed_worker_then_resume_completes_with_exactly_n_records(jobs):
    job = call(jobs, "submit", "pope", "shapes", dict(REQUEST), {})
    running = wait_for(jobs, job["id"], lambda j: j["state"] == "running" and 2 <= j["done"] < LIMIT)
    worker = ray.get_actor(f"lvlm-eval-worker-{job['id']}-0", namespace="lvlm")
    ray.kill(worker)
    failed = wait_for(jobs, job["id"], lambda j: j["state"] == "failed")
    assert "worker died" in failed["error"]["message"]
    partial = records(failed)
    assert running["done"] <= len(partial) < LIMIT

    outcome = call(jobs, "resume", job["id"])
    assert outcome["resumed"] and outcome["job"]["state"] in ("queued", "running")
    done = wait_for(jobs, job["id"], lambda j: j["state"] in ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    rows = records(done)
    assert len(rows) == LIMIT and len({r["key"] for r in rows}) == LIMIT  # 0 lost, 0 duplicated
    assert rows[: len(partial)] == partial  # the first attempt's answers were kept, not redone
    assert done["attempts"] == 2 and done["done"] == LIMIT and done["metrics"]


@pytest.mark.slow
def test_killed_registry_restarts_and_lists_the_jobs_again(jobs):
    first = call(jobs, "submit", "pope", "shapes", dict(REQUEST, limit=4), {})
    done = wait_for(jobs, first["id"], lambda j: j["state"] == "succeeded")
    second = call(jobs, "submit", "pope", "shapes", dict(REQUEST), {})
    wait_for(jobs, second["id"], lambda j: j["state"] == "running")
    ray.kill(jobs._actor, no_restart=False)  # the registry process dies; Ray starts it again
    listed = {j["id"]: j for j in call(jobs, "list")}  # retried until the new registry answers
    assert listed[first["id"]]["state"] == "succeeded" and listed[first["id"]]["metrics"] == done["metrics"]
    assert listed[second["id"]]["state"] in ("queued", "running")  # its worker died with the registry
    health = call(jobs, "health")
    assert health["ok"] and health["jobs"].get("succeeded") == 1
    finished = wait_for(jobs, second["id"], lambda j: j["state"] in ("succeeded", "failed"))
    assert finished["state"] == "succeeded", finished["error"]
    rows = records(finished)
    assert len(rows) == LIMIT and len({r["key"] for r in rows}) == LIMIT
