"""Service eval jobs on Ray through the cluster runner (eval/cluster.py ClusterPool) and the durable
store, driven over the HTTP API: a replica killed mid-job loses and duplicates nothing; a killed job
driver fails the job and POST /v1/eval/jobs/{id}/resume completes it with exactly N records; a killed
registry comes back (max_restarts) with every job listed from the store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

LIMIT = 80  # POPE questions (one split); batches of 1 leave a few seconds to kill mid-job
BODY = {"kind": "pope", "limit": LIMIT, "max_tokens": 3, "seed": 0, "batch_size": 1,
        "options": {"splits": ["random"], "parser": "pope"}}
KEY = "jobs-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NS = "lvlm"  # serve.jobs.REGISTRY_NAMESPACE: drivers and replicas are named there


def start(tmp_path, replicas: int):
    """Ray with 2 CPUs, the real RayJobs, and the service's HTTP app in front of it (no Ray Serve)."""
    from fastapi.testclient import TestClient

    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig
    from lvlm_hallu.serve.jobs import RayJobs
    from lvlm_hallu.serve.limits import Limits
    from tests.serve.conftest import FakePipeline

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    jobs = RayJobs(replica_options={"num_cpus": 1}, replicas=replicas, jobs_dir=str(tmp_path / "jobs"))
    config = ServeConfig(model="shapes", api_key=KEY, limits=Limits(max_tokens=64))
    return jobs, TestClient(build_app(Service(FakePipeline(), config, jobs=jobs)), raise_server_exceptions=False)


@pytest.fixture
def two_replicas(tmp_path):
    jobs, client = start(tmp_path, replicas=2)
    with client:
        yield jobs, client
    ray.shutdown()


@pytest.fixture
def one_replica(tmp_path):
    jobs, client = start(tmp_path, replicas=1)
    with client:
        yield jobs, client
    ray.shutdown()


def submit(http, body: dict) -> dict:
    r = http.post("/v1/eval/jobs", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(http, job_id: str, ok, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = http.get(f"/v1/eval/jobs/{job_id}", headers=AUTH)
        assert r.status_code == 200, r.text
        job = r.json()
        if ok(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never reached the state wanted: {job}")


def records(tmp_path: Path, job_id: str) -> list[dict]:
    path = tmp_path / "jobs" / job_id / "pope.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert "fingerprint" in rows[0]  # the run fingerprint heads the file
    return rows[1:]


def mid_job(job: dict) -> bool:
    return job["state"] == "running" and 2 <= job["progress"]["done"] <= LIMIT // 2


def gone(name: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NS)
        except ValueError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_replica_killed_mid_job_loses_and_duplicates_nothing(two_replicas, tmp_path):
    _, http = two_replicas
    job = submit(http, BODY)
    running = wait_for(http, job["id"], mid_job)
    replica = ray.get_actor(f"lvlm-eval-replica-{job['id']}-0-0", namespace=NS)
    # Loaded first: on a busy machine the other replica alone can answer the first batches, and a
    # replica killed while loading holds no batch (the driver just replaces it). Its calls run in
    # order, so once this where() answers, the driver has the answer to its own and sends it batches.
    ray.get(replica.where.remote())
    # Gone for good (no Ray restart): the driver re-queues the batches it held and starts a replacement.
    ray.kill(replica, no_restart=True)
    done = wait_for(http, job["id"], lambda j: j["state"] in ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    rows = records(tmp_path, job["id"])
    assert len(rows) == LIMIT and len({r["key"] for r in rows}) == LIMIT  # 0 lost, 0 duplicated
    cluster = done["cluster"]
    assert cluster["replicas"] == 2 and sum(cluster["items_per_node"].values()) == LIMIT
    # the dead replica held 1 or 2 batches (2 slots per replica), each of 1 question
    assert cluster["replaced_replicas"] == 1 and cluster["requeued_batches"] in (1, 2)
    assert done["attempts"] == 1 and done["progress"] == {"done": LIMIT, "total": LIMIT}
    assert running["progress"]["total"] == LIMIT and done["metrics"]["POPE (mean F1)"] > 0
    assert gone(f"lvlm-eval-replica-{job['id']}-0-1")  # the pool is shut down with the job


@pytest.mark.slow
def test_killed_driver_fails_the_job_and_resume_over_http_completes_it(two_replicas, tmp_path):
    _, http = two_replicas
    job = submit(http, BODY)
    running = wait_for(http, job["id"], mid_job)
    ray.kill(ray.get_actor(f"lvlm-eval-driver-{job['id']}-0", namespace=NS))
    failed = wait_for(http, job["id"], lambda j: j["state"] == "failed")
    assert "driver died" in failed["error"]["message"] and failed["error"]["code"] == "job_failed"
    # the replicas are owned by the driver: they die with it instead of idling on the cluster
    assert gone(f"lvlm-eval-replica-{job['id']}-0-0") and gone(f"lvlm-eval-replica-{job['id']}-0-1")
    partial = records(tmp_path, job["id"])
    assert running["progress"]["done"] <= len(partial) < LIMIT

    r = http.post(f"/v1/eval/jobs/{job['id']}/resume", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["state"] in ("queued", "running") and r.json()["error"] is None
    done = wait_for(http, job["id"], lambda j: j["state"] in ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    rows = records(tmp_path, job["id"])
    assert len(rows) == LIMIT and len({r["key"] for r in rows}) == LIMIT  # 0 lost, 0 duplicated
    assert rows[: len(partial)] == partial  # the first attempt's answers were kept, not redone
    assert done["attempts"] == 2 and done["progress"]["done"] == LIMIT
    assert sum(done["cluster"]["items_per_node"].values()) == LIMIT - len(partial)  # only what was left
    r = http.post(f"/v1/eval/jobs/{job['id']}/resume", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_resumable"


@pytest.mark.slow
def test_killed_registry_restarts_and_lists_the_jobs_again(one_replica, tmp_path):
    jobs, http = one_replica
    first = submit(http, dict(BODY, limit=4, batch_size=2))
    done = wait_for(http, first["id"], lambda j: j["state"] == "succeeded")
    second = submit(http, BODY)
    wait_for(http, second["id"], lambda j: j["state"] == "running")
    ray.kill(jobs._actor, no_restart=False)  # the registry process dies; Ray starts it again
    r = http.get("/v1/eval/jobs", headers=AUTH)  # retried until the new registry answers
    assert r.status_code == 200, r.text
    listed = {j["id"]: j for j in r.json()["data"]}
    assert listed[first["id"]]["state"] == "succeeded" and listed[first["id"]]["metrics"] == done["metrics"]
    assert listed[second["id"]]["state"] in ("queued", "running")  # its driver died with the registry
    health = http.get("/health", headers=AUTH).json()["jobs"]  # details need a key
    assert health["ok"] and health["jobs"].get("succeeded") == 1
    finished = wait_for(http, second["id"], lambda j: j["state"] in ("succeeded", "failed"))
    assert finished["state"] == "succeeded", finished["error"]
    rows = records(tmp_path, second["id"])
    assert len(rows) == LIMIT and len({r["key"] for r in rows}) == LIMIT
    assert finished["attempts"] == 2
