"""Continuous (iteration-level) batching: one engine loop per replica, fed by a queue.

The loop owns a `lvlm.pipeline.RunningBatch`. Between two decode steps it:
  1. retires rows whose client went away (`cancel`);
  2. admits waiting requests: they are prefilled together (each with its interventions' plan and
     twin rows), their first token is sampled, and their rows are merged into the running batch;
  3. runs one decode step for every running row and completes the rows that finished.
A request's greedy output is the same as alone or in a static batch (tests/lvlm/test_engine.py).

Admission policy (prefill must not starve running rows):
  - at most `max_rows` main rows run at once;
  - at most `max_tokens` tokens in flight: the sum over running and admitted requests of prompt
    tokens (known after prefill; estimated from the image and prompt before) + max_new_tokens;
  - at most `max_prefill_rows` requests are prefilled between two decode steps, as one batched
    prefill, so a running row waits at most one decode step plus one prefill of that many prompts
    for its next token. A request alone may always be admitted into an empty batch;
  - newcomers are admitted in groups: only when `max_prefill_rows` of them fit at once, or the
    oldest has waited `admit_after_steps` decode steps, or nothing is running. One prefill call
    per group amortizes its fixed costs (processor, vision tower call, plan, per-layer Python),
    which dominate when answers are short; the wait is bounded by `admit_after_steps` steps.
The queue itself is bounded by the replica's admission limit (429 beyond `max_concurrent`);
`submit` raises `Overloaded` (429) as well when `max_queue` requests are already waiting.

If an admitted group fails to prefill (a prompt only the engine finds too long ...), its requests
are retried one at a time so only the bad one fails. A failing decode step fails the running rows.
Results and errors come back as `serve.batching.Outcome`s through futures.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from serve.batching import Outcome, StreamCancelled
from serve.errors import Overloaded

log = logging.getLogger("serve.scheduler")


@dataclass
class Job:
    request: Any
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    on_token: Optional[Callable[[int, str], None]] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: Any = None  # the RunningBatch row once admitted
    queued_at_step: int = 0  # the scheduler's step count when the job was queued

    def tokens_estimate(self, image_tokens: int) -> int:
        r = self.request
        images = 0 if r.image is None else (len(r.image) if isinstance(r.image, (list, tuple)) else 1)
        return images * image_tokens + len(r.prompt) // 2 + 16 + r.max_new_tokens


class ContinuousScheduler:
    """Iteration-level scheduler around one pipeline (one per replica)."""

    def __init__(self, pipeline: Any, *, max_rows: int = 8, max_tokens: int = 65536, max_prefill_rows: int = 4,
                 admit_after_steps: int = 4, max_queue: int = 1024, on_batch: Callable[[int, bool], None] | None = None):
        from lvlm.pipeline import RunningBatch

        if max_rows < 1 or max_prefill_rows < 1 or max_tokens < 1:
            raise ValueError("max_rows, max_prefill_rows and max_tokens must be >= 1")
        self.pipeline = pipeline
        self.max_rows, self.max_tokens, self.max_prefill_rows, self.max_queue = max_rows, max_tokens, max_prefill_rows, max_queue
        self._on_batch = on_batch
        self.admit_after_steps = admit_after_steps
        self._batch = RunningBatch(pipeline)
        self._jobs: dict[int, Job] = {}  # id(row) -> job, for the running rows
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        facts = getattr(pipeline, "facts", None)
        grid = getattr(facts, "vision_grid", None)
        self._image_tokens = int(grid) ** 2 if isinstance(grid, int) else 576  # per image, for the estimate
        self.steps = 0
        self.rows_stepped = 0  # sum of batch sizes over steps (mean batch = rows_stepped / steps)
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # -- submitting (any thread) ------------------------------------------------------------------
    def submit(self, request: Any, on_token: Callable[[int, str], None] | None = None,
               cancelled: threading.Event | None = None) -> concurrent.futures.Future:
        """Queue a request; the future resolves to its Outcome."""
        job = Job(request, on_token=on_token, queued_at_step=self.steps)
        if cancelled is not None:
            job.cancelled = cancelled
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting; retry shortly", retry_after_s=1)
            self._waiting.append(job)
            self._wake.notify()
        return job.future

    async def generate(self, request: Any) -> Outcome:
        """Await one request's Outcome without holding a thread."""
        return await asyncio.wrap_future(self.submit(request))

    def run_batch(self, requests: list) -> list[Outcome]:
        """Blocking: submit every request and wait for all (warm-up, tests, the static interface)."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def run_stream(self, request: Any, on_token: Callable[[int, str], None],
                   cancelled: threading.Event | None = None) -> Any:
        """Blocking: one streamed request; returns its Result or raises its error."""
        return self.submit(request, on_token, cancelled).result().unwrap()

    def start_stream(self, request: Any, on_token: Callable[[int, str], None],
                     cancelled: threading.Event) -> concurrent.futures.Future:
        """Non-blocking `run_stream` for the event loop: a future of the Outcome."""
        return self.submit(request, on_token, cancelled)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        return len(self._batch)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the engine loop (its own thread) ---------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._batch:
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self._cancel_gone()
                self._admit()
                if self._batch:
                    self.steps += 1
                    self.rows_stepped += len(self._batch)
                    if self._on_batch is not None:
                        self._on_batch(len(self._batch), False)
                    self._complete(self._batch.step())
            except Exception as err:  # noqa: BLE001 - a failed step fails its rows, not the loop
                log.exception("decode step failed")
                self._fail_running(err)
        self._fail_running(RuntimeError("the scheduler was closed"))
        for job in list(self._waiting):
            job.future.set_result(Outcome(error=RuntimeError("the scheduler was closed")))

    def _cancel_gone(self) -> None:
        for job in self._jobs.values():
            if job.cancelled.is_set():
                self._batch.cancel(job.row)
        with self._wake:
            gone = [j for j in self._waiting if j.cancelled.is_set()]
            for job in gone:
                self._waiting.remove(job)
        for job in gone:
            job.future.set_result(Outcome(error=StreamCancelled("client disconnected")))

    def _in_flight_tokens(self) -> int:
        return sum(row.prompt_tokens + row.request.max_new_tokens for row in self._batch.rows)

    def _take(self) -> list[Job]:
        """Waiting jobs that fit the limits, oldest first (see the module docstring)."""
        taken: list[Job] = []
        tokens = self._in_flight_tokens()
        with self._wake:
            if self._batch and self._waiting:
                group = min(self.max_prefill_rows, self.max_rows)
                fits = self.max_rows - len(self._batch) >= group and len(self._waiting) >= group
                waited = self.steps - self._waiting[0].queued_at_step >= self.admit_after_steps
                if not (fits or waited):
                    return taken
            while self._waiting and len(taken) < self.max_prefill_rows and len(self._batch) + len(taken) < self.max_rows:
                need = self._waiting[0].tokens_estimate(self._image_tokens)
                if tokens + need > self.max_tokens and (self._batch or taken):
                    break
                taken.append(self._waiting.popleft())
                tokens += need
        return taken

    def _admit(self) -> None:
        jobs = self._take()
        if not jobs:
            return
        try:
            self._admit_group(jobs)
        except Exception:  # noqa: BLE001 - retry one by one so only the bad request fails
            for job in jobs:
                try:
                    self._admit_group([job])
                except Exception as err:  # noqa: BLE001
                    job.future.set_result(Outcome(error=err))

    def _admit_group(self, jobs: list[Job]) -> None:
        streams = [self._stream_for(job) for job in jobs]
        rows = self._batch.admit([job.request for job in jobs], streams=streams)
        for job, row in zip(jobs, rows):
            job.row = row
            if row.result is not None:  # finished on its first token
                job.future.set_result(Outcome(result=row.result))
            else:
                self._jobs[id(row)] = job

    def _stream_for(self, job: Job):
        if job.on_token is None:
            return None

        def on_token(_row: int, delta: str) -> None:
            if job.cancelled.is_set():
                return
            try:
                job.on_token(0, delta)
            except StreamCancelled:
                job.cancelled.set()  # retired before the next step

        return on_token

    def _complete(self, rows: list) -> None:
        for row in rows:
            job = self._jobs.pop(id(row), None)
            if job is None:
                continue
            if row.finish_reason == "cancelled":
                job.future.set_result(Outcome(error=StreamCancelled("client disconnected")))
            else:
                job.future.set_result(Outcome(result=row.result))

    def _fail_running(self, err: BaseException) -> None:
        from lvlm.pipeline import RunningBatch

        for job in self._jobs.values():
            if not job.future.done():
                job.future.set_result(Outcome(error=err))
        self._jobs.clear()
        self._batch = RunningBatch(self.pipeline)
