"""Durable evaluation-job store: SQLite (standard library) in the configured jobs directory.

Layout of a jobs directory:

    <jobs_dir>/jobs.sqlite3        one row per job: spec, state, progress, metrics, error, paths,
                                   what the replica pool did (items per node, re-queued batches)
    <jobs_dir>/<job id>/           the job's work folder (generated data, <task>.jsonl results)

The store has the same transitions as `serve.jobs.JobBoard` (queued -> running -> succeeded |
failed | cancelled; updates after a terminal state are ignored, so a late progress report cannot
revive a cancelled job), written through to the database at every change. Beyond the board:
- `reload()`: what a restarted registry actor does first. Jobs left "running" lost their driver
  with the old registry (drivers are owned by it); they go back to "queued" and resume from
  their results files.
- `resume(id)`: a failed or cancelled job goes back to "queued" with its work folder kept, so the
  resumable runner skips the finished keys (and the run fingerprint refuses any mixing).
- `prune()`: the retention policy. Finished jobs older than `keep_days`, and finished jobs beyond
  the newest `keep_jobs`, lose their row and their folder. Queued and running jobs are never pruned.
- `health()`: whether the database answers, for the service's readiness.
- `check_store(root)`: what `lvlm serve` runs before it starts. A store that is not a SQLite
  database, fails SQLite's integrity check, or is empty while job folders exist (truncated)
  raises `JobStoreError`, one line naming the file and the way out (move it aside); job folders
  without a row are returned, to be reported, and never deleted.
- Owners: each row records the owner id of the API key that created it (serve/limits.py
  `key_owner`); `get`, `list`, `cancel` and `resume` given an owner see only that owner's jobs.

One connection per call (WAL mode, a busy timeout): the registry actor is the only writer, and a
second process (an operator's `sqlite3`, a test) can read while it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

TERMINAL = ("succeeded", "failed", "cancelled")
NOT_TERMINAL = "state NOT IN ('succeeded', 'failed', 'cancelled')"
DB_NAME = "jobs.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,          -- JSON: the validated EvalJobRequest fields
    load_kwargs TEXT NOT NULL,      -- JSON: how the replicas load the model
    state TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    metrics TEXT,                   -- JSON or NULL
    error TEXT,                     -- JSON error object or NULL
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    workdir TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cluster TEXT,                   -- JSON or NULL: the replica pool's work in the latest attempt
    owner TEXT                      -- owner id of the API key that created the job, or NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
"""
JSON_COLUMNS = ("request", "load_kwargs", "metrics", "error", "cluster")
# Columns added after the first release, for stores created before them: name -> declaration.
ADDED_COLUMNS = {"cluster": "TEXT", "owner": "TEXT"}
JOB_FOLDER = "evaljob-"  # prefix of job ids and so of their folders


class JobStoreError(RuntimeError):
    """The job store cannot be used as it is (corrupt, truncated); the message is one line."""


@dataclass
class StoredJob:
    """One row; the same fields as `serve.jobs.JobRecord`, plus the work folder and attempts."""

    id: str
    kind: str
    model: str
    request: dict[str, Any]
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    state: str = "queued"
    done: int = 0
    total: int = 0
    metrics: Optional[dict[str, Any]] = None
    error: Optional[dict[str, Any]] = None
    created_at: float = 0.0
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    workdir: str = ""
    attempts: int = 0
    cluster: Optional[dict[str, Any]] = None  # {"replicas", "items_per_node", "requeued_batches", "replaced_replicas"}
    owner: Optional[str] = None  # owner id of the creating API key (None: created without keys)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def results(self) -> list[str]:
        """The job's results files (JSON lines, one per task)."""
        return sorted(str(p) for p in Path(self.workdir).glob("*.jsonl")) if self.workdir else []


def default_jobs_dir() -> Path:
    """`$LVLM_JOBS_DIR`, else `$LVLM_CACHE/eval-jobs` (default `~/.cache/lvlm/eval-jobs`)."""
    if os.environ.get("LVLM_JOBS_DIR"):
        return Path(os.environ["LVLM_JOBS_DIR"])
    return Path(os.environ.get("LVLM_CACHE", Path.home() / ".cache" / "lvlm")) / "eval-jobs"


class JobStore:
    """Jobs in `<root>/jobs.sqlite3`, work folders in `<root>/<job id>/`."""

    def __init__(self, root: str | Path, *, keep_days: float = 7.0, keep_jobs: int = 200):
        if keep_days <= 0 or keep_jobs < 1:
            raise ValueError(f"retention needs keep_days > 0 and keep_jobs >= 1, got {keep_days}, {keep_jobs}")
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self.keep_days, self.keep_jobs = keep_days, keep_jobs
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, decl in ADDED_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0)
        db.row_factory = sqlite3.Row
        return db

    def _write(self, sql: str, args: tuple = ()) -> int:
        with closing(self._connect()) as db, db:  # the inner `with` commits (or rolls back)
            return db.execute(sql, args).rowcount

    def _rows(self, sql: str, args: tuple = ()) -> list[StoredJob]:
        with closing(self._connect()) as db:
            return [self._job(r) for r in db.execute(sql, args).fetchall()]

    @staticmethod
    def _job(row: sqlite3.Row) -> StoredJob:
        data = dict(row)
        for col in JSON_COLUMNS:
            data[col] = None if data[col] is None else json.loads(data[col])
        return StoredJob(**data)

    # -- the board's interface ------------------------------------------------------------------
    def create(self, kind: str, model: str, request: dict[str, Any], load_kwargs: dict | None = None,
               owner: str | None = None) -> StoredJob:
        job_id = f"{JOB_FOLDER}{uuid.uuid4().hex[:16]}"
        job = StoredJob(id=job_id, kind=kind, model=model, request=dict(request), load_kwargs=dict(load_kwargs or {}),
                        created_at=time.time(), workdir=str(self.root / job_id), owner=owner)
        self._write(
            "INSERT INTO jobs (id, kind, model, request, load_kwargs, state, created_at, workdir, owner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.id, kind, model, json.dumps(job.request), json.dumps(job.load_kwargs), job.state, job.created_at,
             job.workdir, owner),
        )
        self.prune()
        return job

    def get(self, job_id: str, owner: str | None = None) -> Optional[StoredJob]:
        """The job, or None when it does not exist or (given an owner) belongs to another."""
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows and (owner is None or rows[0].owner == owner) else None

    def list(self, owner: str | None = None) -> list[StoredJob]:
        if owner is None:
            return self._rows("SELECT * FROM jobs ORDER BY created_at, rowid")
        return self._rows("SELECT * FROM jobs WHERE owner = ? ORDER BY created_at, rowid", (owner,))

    def queued(self) -> list[StoredJob]:
        return self._rows("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid")

    def running(self, job_id: str) -> None:
        self._write("UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1, cluster = NULL"
                    " WHERE id = ? AND state = 'queued'", (time.time(), job_id))

    def progress(self, job_id: str, done: int, total: int, metrics: Optional[dict] = None,
                 cluster: Optional[dict] = None) -> None:
        self._write("UPDATE jobs SET done = ?, total = ?, metrics = COALESCE(?, metrics),"
                    f" cluster = COALESCE(?, cluster) WHERE id = ? AND {NOT_TERMINAL}",
                    (int(done), int(total), None if metrics is None else json.dumps(metrics),
                     None if cluster is None else json.dumps(cluster), job_id))

    def succeed(self, job_id: str, metrics: dict) -> None:
        self._write("UPDATE jobs SET state = 'succeeded', metrics = ?, finished_at = ?, done = MAX(done, total)"
                    f" WHERE id = ? AND {NOT_TERMINAL}", (json.dumps(metrics), time.time(), job_id))

    def fail(self, job_id: str, message: str, type_: str = "job_error") -> None:
        error = {"message": message, "type": type_, "param": None, "code": "job_failed"}
        self._write(f"UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ? AND {NOT_TERMINAL}",
                    (json.dumps(error), time.time(), job_id))

    def cancel(self, job_id: str) -> bool:
        """Mark cancelled; False when the job had already finished (or does not exist)."""
        return self._write(f"UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ? AND {NOT_TERMINAL}",
                           (time.time(), job_id)) == 1

    # -- durability -----------------------------------------------------------------------------
    def resume(self, job_id: str) -> bool:
        """A failed or cancelled job goes back to the queue, keeping its folder; False otherwise."""
        return self._write("UPDATE jobs SET state = 'queued', error = NULL, finished_at = NULL"
                           " WHERE id = ? AND state IN ('failed', 'cancelled')", (job_id,)) == 1

    def reload(self) -> list[str]:
        """After a registry restart: jobs left running lost their driver; requeue them. Returns their ids."""
        ids = [j.id for j in self._rows("SELECT * FROM jobs WHERE state = 'running'")]
        self._write("UPDATE jobs SET state = 'queued' WHERE state = 'running'")
        self.prune()
        return ids

    def prune(self, now: float | None = None) -> list[str]:
        """Apply the retention policy; returns the ids removed (rows and folders)."""
        now = time.time() if now is None else now
        finished = self._rows(f"SELECT * FROM jobs WHERE NOT {NOT_TERMINAL} ORDER BY created_at DESC, rowid DESC")
        cutoff = now - self.keep_days * 86400.0
        gone = [j for n, j in enumerate(finished) if n >= self.keep_jobs or (j.finished_at or j.created_at) < cutoff]
        for job in gone:
            self._write("DELETE FROM jobs WHERE id = ?", (job.id,))
            folder = Path(job.workdir)
            if folder.parent == self.root and folder.is_dir():  # never outside the jobs directory
                shutil.rmtree(folder, ignore_errors=True)
        return [j.id for j in gone]

    def orphans(self) -> list[str]:
        """Job folders in the jobs directory with no row in the store."""
        folders = {p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith(JOB_FOLDER)}
        with closing(self._connect()) as db:
            known = {row[0] for row in db.execute("SELECT id FROM jobs")}
        return sorted(folders - known)

    def health(self) -> dict[str, Any]:
        """{"ok", "path", "jobs", "error"}: whether the database can be read right now."""
        try:
            with closing(self._connect()) as db:
                counts = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            return {"ok": True, "path": str(self.path), "jobs": counts, "error": None}
        except sqlite3.Error as err:
            return {"ok": False, "path": str(self.path), "jobs": {}, "error": f"{type(err).__name__}: {err}"}


def check_store(root: str | Path) -> list[str]:
    """Check the job store under `root` before the service starts; returns the job folders that
    have no row (to report). Raises `JobStoreError` (one line: the file and the way out) when the
    database is not SQLite, fails `PRAGMA integrity_check`, or is empty while job folders exist."""
    root = Path(root).expanduser().resolve()
    path = root / DB_NAME
    way_out = f"move it aside (mv {path} {path}.broken) to start with an empty store"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(JOB_FOLDER)) \
        if root.is_dir() else []
    if path.exists():
        with open(path, "rb") as f:
            header = f.read(16)
        if header and header != b"SQLite format 3\x00":
            raise JobStoreError(f"job store {path} is not a SQLite database; {way_out}")
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)) as db:
                verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                rows = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] if "jobs" in tables else 0
        except sqlite3.Error as err:
            raise JobStoreError(f"job store {path} cannot be read ({err}); {way_out}") from None
        if verdict != "ok":
            raise JobStoreError(f"job store {path} is corrupt (integrity check: {verdict[:80]}); {way_out}")
        if folders and not rows:
            raise JobStoreError(f"job store {path} holds no jobs but {len(folders)} job folders exist (truncated?); "
                                f"{way_out}")
    elif folders:
        raise JobStoreError(f"job store {path} is missing but {len(folders)} job folders exist; restore it, or move "
                            f"the folders aside to start with an empty store")
    return JobStore(root).orphans() if path.exists() else []
