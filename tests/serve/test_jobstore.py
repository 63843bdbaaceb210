"""Durable job store (serve/jobstore.py): transitions, reopening, resume, retention, health."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from lvlm_hallu.serve.jobstore import DB_NAME, JobStore


def test_jobs_survive_reopening_with_every_field(tmp_path):
    store = JobStore(tmp_path)
    job = store.create("pope", "shapes", {"limit": 4, "options": {"parser": "opera"}}, {"device": "cpu"})
    store.running(job.id)
    store.progress(job.id, 2, 4, {"answered Accuracy": 50.0})
    again = JobStore(tmp_path).get(job.id)  # a new process (a restarted registry) sees the same row
    assert (again.kind, again.model, again.request, again.load_kwargs) == (
        "pope", "shapes", {"limit": 4, "options": {"parser": "opera"}}, {"device": "cpu"})
    assert (again.state, again.done, again.total, again.metrics, again.attempts) == (
        "running", 2, 4, {"answered Accuracy": 50.0}, 1)
    assert again.workdir == str(tmp_path.resolve() / job.id) and again.started_at >= again.created_at
    store.progress(job.id, 3, 4)  # no metrics: the partial metrics stay
    store.succeed(job.id, {"POPE (mean F1)": 66.7})
    done = JobStore(tmp_path).get(job.id)
    assert (done.state, done.done, done.metrics) == ("succeeded", 4, {"POPE (mean F1)": 66.7})
    assert done.finished_at >= done.started_at
    # an operator can read it with plain sqlite3
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert db.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone() == ("succeeded",)


def test_cluster_facts_follow_progress_and_reset_per_attempt(tmp_path):
    store = JobStore(tmp_path)
    job = store.create("pope", "shapes", {"limit": 4})
    store.running(job.id)
    facts = {"replicas": 2, "items_per_node": {"node-a": 2}, "requeued_batches": 1, "replaced_replicas": 1}
    store.progress(job.id, 2, 4, None, facts)
    store.progress(job.id, 3, 4)  # a report without facts keeps the last ones
    assert JobStore(tmp_path).get(job.id).cluster == facts
    store.fail(job.id, "evaluation job driver died: ActorDiedError")
    store.resume(job.id)
    store.running(job.id)  # a new attempt starts with a new pool: its facts start empty
    again = store.get(job.id)
    assert (again.attempts, again.cluster) == (2, None)


def test_a_store_from_before_the_cluster_column_is_upgraded_in_place(tmp_path):
    import json

    # the table as the first release of the store created it (no `cluster` column)
    old_schema = """CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,
        request TEXT NOT NULL, load_kwargs TEXT NOT NULL, state TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0,
        total INTEGER NOT NULL DEFAULT 0, metrics TEXT, error TEXT, created_at REAL NOT NULL, started_at REAL,
        finished_at REAL, workdir TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);"""
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO jobs (id, kind, model, request, load_kwargs, state, created_at, workdir)"
                   " VALUES ('evaljob-old', 'pope', 'shapes', ?, '{}', 'succeeded', ?, ?)",
                   (json.dumps({"limit": 4}), time.time(), str(tmp_path / "evaljob-old")))
        assert "cluster" not in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    store = JobStore(tmp_path)
    old = store.get("evaljob-old")
    assert (old.state, old.request, old.cluster) == ("succeeded", {"limit": 4}, None)
    job = store.create("pope", "shapes", {})
    store.progress(job.id, 1, 2, None, {"replicas": 1})
    assert store.get(job.id).cluster == {"replicas": 1}


def test_terminal_states_ignore_late_updates(tmp_path):
    store = JobStore(tmp_path)
    job = store.create("chair", "m", {})
    store.running(job.id)
    assert store.cancel(job.id) is True
    store.progress(job.id, 3, 10, {"CHAIR_s": 1.0})
    store.succeed(job.id, {"CHAIR_s": 2.0})
    store.fail(job.id, "late")
    got = store.get(job.id)
    assert (got.state, got.done, got.metrics, got.error) == ("cancelled", 0, None, None)
    assert store.cancel(job.id) is False and store.cancel("nope") is False and store.get("nope") is None


def test_resume_only_failed_or_cancelled_and_reload_requeues_running(tmp_path):
    store = JobStore(tmp_path)
    failed, cancelled, ok, running = (store.create("pope", "m", {"i": i}) for i in range(4))
    for j in (failed, cancelled, ok, running):
        store.running(j.id)
    store.fail(failed.id, "evaluation worker died: ActorDiedError")
    store.cancel(cancelled.id)
    store.succeed(ok.id, {})
    assert store.get(failed.id).error["message"].startswith("evaluation worker died")
    assert store.resume(failed.id) and store.resume(cancelled.id)
    assert not store.resume(ok.id) and not store.resume(running.id) and not store.resume("nope")
    f = store.get(failed.id)
    assert (f.state, f.error, f.finished_at, f.attempts) == ("queued", None, None, 1)
    assert [j.id for j in store.queued()] == [failed.id, cancelled.id]
    assert JobStore(tmp_path).reload() == [running.id]  # the registry restarted: its worker is gone
    assert [j.id for j in store.queued()] == [failed.id, cancelled.id, running.id]
    assert store.get(ok.id).state == "succeeded"


def test_retention_removes_old_and_surplus_finished_jobs_with_their_folders(tmp_path):
    store = JobStore(tmp_path, keep_days=1.0, keep_jobs=2)
    jobs = [store.create("pope", "m", {"i": i}) for i in range(5)]
    for j in jobs:
        (tmp_path / j.id).mkdir()
        (tmp_path / j.id / "pope.jsonl").write_text("{}\n")
    for j in jobs[:4]:
        store.succeed(j.id, {})
    store.running(jobs[4].id)
    assert store.get(jobs[0].id).results == [str(tmp_path.resolve() / jobs[0].id / "pope.jsonl")]
    # newest-first, finished jobs beyond keep_jobs=2 go: the two oldest
    assert sorted(store.prune()) == sorted([jobs[0].id, jobs[1].id])
    assert not (tmp_path / jobs[0].id).exists() and (tmp_path / jobs[2].id).exists()
    # two days later the other finished ones are too old; the running one stays whatever its age
    assert sorted(store.prune(now=time.time() + 2 * 86400)) == sorted([jobs[2].id, jobs[3].id])
    assert [j.id for j in store.list()] == [jobs[4].id] and (tmp_path / jobs[4].id).exists()


def test_retention_never_deletes_outside_the_jobs_directory(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    store = JobStore(tmp_path / "jobs", keep_jobs=1)
    job = store.create("pope", "m", {})
    store._write("UPDATE jobs SET workdir = ? WHERE id = ?", (str(outside), job.id))  # a tampered row
    store.succeed(job.id, {})
    store.succeed(store.create("pope", "m", {}).id, {})
    assert store.prune() == [job.id] and outside.is_dir()


def test_health_reports_counts_and_an_unreadable_store(tmp_path):
    store = JobStore(tmp_path / "jobs")
    store.create("pope", "m", {})
    health = store.health()
    assert health["ok"] and health["jobs"] == {"queued": 1} and health["path"].endswith(DB_NAME)
    (tmp_path / "jobs" / DB_NAME).unlink()
    (tmp_path / "jobs" / DB_NAME).mkdir()  # the database file is gone, a folder in its place
    broken = store.health()
    assert broken["ok"] is False and "Error" in broken["error"]


def test_bad_retention_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_days"):
        JobStore(tmp_path, keep_days=0)
    with pytest.raises(ValueError, match="keep_jobs"):
        JobStore(tmp_path, keep_jobs=0)


# ---------------------------------------------------------------------------------------------
# Through the HTTP API: a store-backed stand-in for serve.jobs.RayJobs (the Ray one: test_jobs_ray.py)


class StoreJobs:
    """RayJobs' interface over a JobStore, in process (no workers: jobs stay queued)."""

    def __init__(self, root):
        self.store = JobStore(root)

    @staticmethod
    def kinds():
        return {"chair": "", "pope": ""}

    async def submit(self, kind, model, request, load_kwargs, owner=None):
        return self.store.create(kind, model, request, load_kwargs, owner=owner).to_dict()

    async def get(self, job_id, owner=None):
        job = self.store.get(job_id, owner)
        return job and job.to_dict()

    async def list(self, owner=None):
        return [j.to_dict() for j in self.store.list(owner)]

    async def cancel(self, job_id, owner=None):
        if self.store.get(job_id, owner) is None:
            return None
        self.store.cancel(job_id)
        return await self.get(job_id)

    async def resume(self, job_id, owner=None):
        if self.store.get(job_id, owner) is None:
            return None
        resumed = self.store.resume(job_id)
        return {"resumed": resumed, "job": await self.get(job_id)}

    async def health(self):
        return self.store.health()


KEY = "store-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def api(tmp_path):
    from fastapi.testclient import TestClient

    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig
    from lvlm_hallu.serve.limits import Limits
    from tests.serve.conftest import FakePipeline

    jobs = StoreJobs(tmp_path / "jobs")
    config = ServeConfig(model="fake", api_key=KEY, limits=Limits(max_tokens=64))
    with TestClient(build_app(Service(FakePipeline(), config, jobs=jobs)), raise_server_exceptions=False) as client:
        yield client, jobs.store


HERE = str(Path(__file__).resolve())
BAD_SUBMISSIONS = [
    # paths: a job only runs on data it generates; nothing names a server file
    ("images-path", {"kind": "pope", "options": {"images": "/etc"}}, "options.images"),
    ("questions-path", {"kind": "pope", "options": {"questions": [HERE]}}, "options.questions"),
    ("annotations-path", {"kind": "chair", "options": {"annotations": "../../"}}, "options.annotations"),
    ("kind-path", {"kind": "../../etc/passwd"}, "kind"),
    ("router-path", {"kind": "pope", "interventions": [{"name": "vte", "policy": "router", "router_path": HERE}]},
     "interventions.vte.router_path"),
    # unknown names
    ("unknown-parser", {"kind": "pope", "options": {"parser": "foo"}}, "options.parser"),
    ("unknown-split", {"kind": "pope", "options": {"splits": ["random", "hard"]}}, "options.splits"),
    ("repeated-split", {"kind": "pope", "options": {"splits": ["random", "random"]}}, "options.splits"),
    ("chair-takes-no-parser", {"kind": "chair", "options": {"parser": "pope"}}, "options.parser"),
    # wrong types
    ("max-new-tokens-text", {"kind": "pope", "options": {"max_new_tokens": "abc"}}, "options.max_new_tokens"),
    ("max-new-tokens-numeric-text", {"kind": "pope", "options": {"max_new_tokens": "10"}}, "options.max_new_tokens"),
    ("short-caption-text", {"kind": "chair", "options": {"short_caption": "yes"}}, "options.short_caption"),
    ("prompt-number", {"kind": "chair", "options": {"prompt": 42}}, "options.prompt"),
    ("prompt-empty", {"kind": "chair", "options": {"prompt": ""}}, "options.prompt"),
    ("splits-string", {"kind": "pope", "options": {"splits": "random"}}, "options.splits"),
    ("options-list", {"kind": "pope", "options": ["parser", "pope"]}, "options"),
    ("max-tokens-text", {"kind": "pope", "max_tokens": "abc"}, "max_tokens"),
    ("limit-bool", {"kind": "pope", "limit": True}, "limit"),
    ("seed-negative", {"kind": "pope", "seed": -1}, "seed"),
    # huge values
    ("limit-huge", {"kind": "pope", "limit": 10**9}, "limit"),
    ("max-tokens-huge", {"kind": "pope", "max_tokens": 10**9}, "max_tokens"),
    ("max-new-tokens-huge", {"kind": "pope", "options": {"max_new_tokens": 10**9}}, "options.max_new_tokens"),
    ("batch-size-huge", {"kind": "pope", "batch_size": 10**6}, "batch_size"),
    ("seed-huge", {"kind": "pope", "seed": 10**30}, "seed"),
    ("prompt-huge", {"kind": "chair", "options": {"prompt": "x" * 5000}}, "options.prompt"),
]


@pytest.mark.parametrize("body,param", [c[1:] for c in BAD_SUBMISSIONS], ids=[c[0] for c in BAD_SUBMISSIONS])
def test_bad_job_submissions_are_4xx_naming_the_field_and_store_nothing(api, body, param):
    http, store = api
    r = http.post("/v1/eval/jobs", headers=AUTH, json=body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"], error
    assert store.list() == []


def test_good_submission_is_stored_with_normalised_options_and_resumes_through_the_api(api):
    http, store = api
    r = http.post("/v1/eval/jobs", headers=AUTH,
                  json={"kind": "pope", "limit": 6, "options": {"parser": "opera", "max_new_tokens": 8}})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    stored = store.get(job_id)
    assert stored.request["options"] == {"parser": "opera", "max_new_tokens": 8} and stored.state == "queued"
    # only failed or cancelled jobs resume
    r = http.post(f"/v1/eval/jobs/{job_id}/resume", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_resumable"
    store.running(job_id)
    store.fail(job_id, "evaluation worker died: ActorDiedError")
    assert http.get(f"/v1/eval/jobs/{job_id}", headers=AUTH).json()["state"] == "failed"
    r = http.post(f"/v1/eval/jobs/{job_id}/resume", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "queued" and r.json()["error"] is None
    assert http.post("/v1/eval/jobs/evaljob-nope/resume", headers=AUTH).status_code == 404
    assert http.post(f"/v1/eval/jobs/{job_id}/resume").status_code == 401  # behind the key like the rest


def test_health_reports_the_job_store(api, tmp_path):
    http, store = api
    http.post("/v1/eval/jobs", headers=AUTH, json={"kind": "chair", "limit": 2})
    jobs = http.get("/health", headers=AUTH).json()["jobs"]
    assert jobs["ok"] is True and jobs["jobs"] == {"queued": 1} and jobs["path"] == str(store.path)
    assert http.get("/health").json()["jobs"] == {"ok": True}, "no key: no path, counts or errors"
    store.path.unlink()
    store.path.mkdir()
    jobs = http.get("/health", headers=AUTH).json()["jobs"]
    assert jobs["ok"] is False and jobs["error"]
    for route in ("/health", "/ready"):  # without a key the failure shows no internals
        assert http.get(route).json()["jobs"] == {"ok": False}


# -- several keys: each job belongs to the key that created it (issue #34) ------------------------

def test_each_job_belongs_to_the_key_that_created_it(tmp_path):
    from fastapi.testclient import TestClient

    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig
    from lvlm_hallu.serve.limits import Limits, key_owner
    from tests.serve.conftest import FakePipeline

    jobs = StoreJobs(tmp_path / "jobs")
    config = ServeConfig(model="fake", api_key="key-alice-1", api_keys=("key-bob-2",), limits=Limits(max_tokens=64))
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("key-alice-1", "key-bob-2"))
    with TestClient(build_app(Service(FakePipeline(), config, jobs=jobs)), raise_server_exceptions=False) as http:
        mine = http.post("/v1/eval/jobs", headers=alice, json={"kind": "chair", "limit": 2}).json()["id"]
        theirs = http.post("/v1/eval/jobs", headers=bob, json={"kind": "pope", "limit": 2}).json()["id"]
        assert [j["id"] for j in http.get("/v1/eval/jobs", headers=alice).json()["data"]] == [mine]
        assert [j["id"] for j in http.get("/v1/eval/jobs", headers=bob).json()["data"]] == [theirs]
        for method, path in (("GET", f"/v1/eval/jobs/{theirs}"), ("DELETE", f"/v1/eval/jobs/{theirs}"),
                             ("POST", f"/v1/eval/jobs/{theirs}/resume")):
            r = http.request(method, path, headers=alice)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, r.text)
        assert jobs.store.get(theirs).state == "queued", "alice could not cancel bob's job"
        assert http.delete(f"/v1/eval/jobs/{theirs}", headers=bob).json()["state"] == "cancelled"
        assert "owner" not in http.get(f"/v1/eval/jobs/{mine}", headers=alice).json()
    stored = {j.id: j.owner for j in jobs.store.list()}
    assert stored == {mine: key_owner("key-alice-1"), theirs: key_owner("key-bob-2")}
    assert "key-alice-1" not in (tmp_path / "jobs" / "jobs.sqlite3").read_bytes().decode("latin-1"), "a hash, not the key"


def test_a_store_that_fails_while_serving_is_a_503_not_a_500(api):
    http, store = api
    store.path.unlink()
    store.path.mkdir()  # the database file is now a directory: every query fails
    for method, path in (("GET", "/v1/eval/jobs"), ("GET", "/v1/eval/jobs/evaljob-x"),
                         ("POST", "/v1/eval/jobs")):
        r = http.request(method, path, headers=AUTH, json={"kind": "chair", "limit": 2} if method == "POST" else None)
        assert r.status_code == 503 and r.json()["error"]["code"] == "jobs_unavailable", (path, r.text)
        assert str(store.path) not in r.text, "no internals in the answer"
