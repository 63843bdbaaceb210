"""The eval-job state machine (serve/jobs.py JobBoard) and the job-kind registry, without Ray."""

from __future__ import annotations

from serve.jobs import JOB_KINDS, JobBoard


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
