"""The eval-job state machine (serve/jobs.py JobBoard), the job-kind registry, and a job kind run
through a stand-in for its replica pool (progress, cluster facts, fingerprint-checked resume), without Ray."""

from __future__ import annotations

import pytest

from lvlm_hallu.serve.jobs import JOB_KINDS, JobBoard


def test_job_lifecycle_with_progress_and_partial_metrics():
    board = JobBoard()
    job = board.create("pope", "tiny-llava", {"limit": 4})
    assert job.state == "queued" and board.get(job.id) is job
    board.running(job.id)
    board.progress(job.id, 2, 4, {"answered Accuracy": 50.0})
    assert (job.state, job.done, job.total, job.metrics) == ("running", 2, 4, {"answered Accuracy": 50.0})
    board.succeed(job.id, {"POPE (mean F1)": 66.7})
    assert job.state == "succeeded" and job.metrics == {"POPE (mean F1)": 66.7} and job.done == 4
    assert job.finished_at >= job.started_at >= job.created_at


def test_terminal_states_ignore_late_updates():
    board = JobBoard()
    job = board.create("chair", "m", {})
    board.running(job.id)
    assert board.cancel(job.id) is True
    board.progress(job.id, 3, 10, {"CHAIR_s": 1.0})  # a report that was in flight when we cancelled
    board.succeed(job.id, {"CHAIR_s": 2.0})
    board.fail(job.id, "late")
    assert (job.state, job.done, job.metrics, job.error) == ("cancelled", 0, None, None)
    assert board.cancel(job.id) is False


def test_failure_carries_an_error_object():
    board = JobBoard()
    job = board.create("pope", "m", {})
    board.fail(job.id, "PopeBuildError: too few images")
    assert job.state == "failed"
    assert job.error == {"message": "PopeBuildError: too few images", "type": "job_error", "param": None,
                         "code": "job_failed"}


def test_old_finished_jobs_are_trimmed_running_ones_kept():
    board = JobBoard(keep=3)
    running = board.create("pope", "m", {})
    board.running(running.id)
    finished = []
    for _ in range(4):
        job = board.create("pope", "m", {})
        board.succeed(job.id, {})
        finished.append(job.id)
    board.create("pope", "m", {})
    assert running.id in board.jobs and finished[0] not in board.jobs and len(board.jobs) == 3


def test_unknown_ids_are_none_and_kinds_are_registered():
    board = JobBoard()
    assert board.get("nope") is None and board.cancel("nope") is False
    board.progress("nope", 1, 2)  # ignored, no error
    assert {"chair", "pope"} <= set(JOB_KINDS)


# ---------------------------------------------------------------------------------------------
# A job kind end to end without Ray: the pool is an in-process stand-in with ClusterPool.run's signature


class YesModel:
    """A pipeline that answers "Yes" to everything and records the images it was given."""

    def __init__(self):
        self.images = []

    def generate(self, requests):
        from lvlm_hallu.lvlm.types import Result

        self.images += [r.image for r in requests]
        return [Result(text="Yes", token_ids=[1], finish_reason="stop", prompt_tokens=1) for _ in requests]


class InProcessPool:
    """`eval.cluster.ClusterPool` as far as a job sees it: run(items, path, adapter, ...), call(fn),
    shutdown()."""

    def __init__(self, model):
        self.model, self.runs, self.closed = model, [], False

    def call(self, fn):
        return fn(self.model)

    def run(self, items, path, adapter, *, batch_size, progress, fingerprint, on_batch):
        from lvlm_hallu.eval.cluster import RunStats
        from lvlm_hallu.eval.runner import ResultsFile, run

        stats = RunStats()
        inner = adapter(self.model)

        def answer(batch):
            stats.items_per_node["here"] += len(batch)
            return inner(batch)

        self.runs.append(len(items) - len(ResultsFile(path).records))
        done = run(items, answer, path, batch_size=batch_size, progress=progress, fingerprint=fingerprint)
        on_batch(done, stats)
        return done

    def shutdown(self):
        self.closed = True


def context(tmp_path, request, pool, reports):
    from lvlm_hallu.serve.jobs import JobContext

    class Ctx(JobContext):
        def pool(self):
            if pool is None:
                raise AssertionError("no pool may start: the fingerprint check comes first")
            return pool

    return Ctx("evaljob-test", dict(request), "shapes", {}, tmp_path, lambda *a: reports.append(a))  # never loaded


POPE = {"kind": "pope", "limit": 6, "max_tokens": 3, "seed": 0, "batch_size": 2, "interventions": None,
        "options": {"splits": ["random"], "parser": "pope"}}


def test_pope_job_answers_through_its_pool_and_resume_checks_the_fingerprint(tmp_path):
    from PIL import Image

    from lvlm_hallu.eval.fingerprint import FingerprintMismatch

    model, reports = YesModel(), []
    pool = InProcessPool(model)
    metrics = JOB_KINDS["pope"].run(context(tmp_path, POPE, pool, reports))
    # 6 balanced questions all answered "Yes": accuracy 50, yes-ratio 100, recall 100, precision 50
    assert (metrics["random Acc"], metrics["random Yes"], metrics["random Rec"], metrics["random Prec"]) == (
        50.0, 100.0, 100.0, 50.0)
    assert pool.runs == [6] and pool.closed and len(model.images) == 6
    assert all(isinstance(im, Image.Image) for im in model.images)  # read from the job's own folder
    done, total, partial, cluster = reports[-1]
    assert (done, total, cluster) == (6, 6, {"replicas": 1, "items_per_node": {"here": 6}, "requeued_batches": 0,
                                           "replaced_replicas": 0,
                                           "placement": {"device": "cpu", "dtype": "float32", "device_map": None}})
    assert partial["answered Accuracy"] == 50.0

    # the same job again (another batch size: not part of the fingerprint) resumes with nothing to do
    again = InProcessPool(YesModel())
    assert JOB_KINDS["pope"].run(context(tmp_path, dict(POPE, batch_size=3), again, [])) == metrics
    assert again.runs == [0]
    # another decoding setting must not continue this results file: refused before any replica starts
    with pytest.raises(FingerprintMismatch, match="max_tokens"):
        JOB_KINDS["pope"].run(context(tmp_path, dict(POPE, max_tokens=5), None, []))


class TunedYesModel(YesModel):
    """A YesModel with the facts and profile that model-aware intervention values come from."""

    def __init__(self, alpha):
        super().__init__()
        from types import SimpleNamespace

        self.facts, self.alpha = SimpleNamespace(hidden_size=192, num_layers=6), alpha

    def profile(self):
        return {"model_id": "shapes", "tuned": {"vhr": {"params": {"alpha": self.alpha, "layers": [2, 3]}}}}


def test_a_job_with_tuned_values_does_not_resume_under_other_tuned_values(tmp_path):
    import json

    from lvlm_hallu.eval.fingerprint import FingerprintMismatch

    request = dict(POPE, interventions="vhr:tuned")
    pool = InProcessPool(TunedYesModel(2.0))
    metrics = JOB_KINDS["pope"].run(context(tmp_path, request, pool, []))
    header = json.loads((tmp_path / "pope.jsonl").read_text().splitlines()[0])["fingerprint"]
    assert header["interventions_resolved"][0]["alpha"] == 2.0
    again = InProcessPool(TunedYesModel(2.0))
    assert JOB_KINDS["pope"].run(context(tmp_path, request, again, [])) == metrics and again.runs == [0]
    retuned = InProcessPool(TunedYesModel(3.0))
    with pytest.raises(FingerprintMismatch, match=r"interventions_resolved\[0\]\.alpha: 2\.0 != 3\.0"):
        JOB_KINDS["pope"].run(context(tmp_path, request, retuned, []))
    assert retuned.model.images == [] and retuned.closed  # nothing answered, the pool shut down
