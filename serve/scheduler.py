"""Continuous (iteration-level) batching: one engine loop per replica, fed by a queue.

The loop owns a `lvlm.pipeline.RunningBatch`. Between two decode steps it:
  1. retires rows whose client went away (`cancel`);
  2. admits waiting requests: they are prefilled together (each with its interventions' plan and
     twin rows), their first token is sampled, and their rows are merged into the running batch;
  3. runs one decode step for every running row and completes the rows that finished.
A request's greedy output is the same as alone or in a static batch (tests/lvlm/test_engine.py).

Admission policy (`Admission`; waiting requests are taken oldest first, none overtakes another):
  - rows: at most `max_rows` main rows run at once;
  - tokens in flight: at most `max_tokens`, summed over running and admitted requests of prompt
    tokens + max_new_tokens;
  - prefill budget: the requests prefilled between two decode steps form one batched prefill of at
    most `max_prefill_tokens` tokens, counted as the prefill computes them: every row (a request's
    main row and its image-removed twin rows, VHR / PAI contrast) times the longest prompt of the
    group (image tokens included; the batch is left-padded to it). A request whose prompt alone
    exceeds the budget is prefilled alone. Prefills and decode steps interleave: a running row
    waits at most one prefill of `max_prefill_tokens` tokens for its next token, however many wait;
  - refills: while rows run, free rows are refilled when that saves more than it costs. A
    prefill call has a fixed cost (processor, vision tower call, plan, per-layer Python, the
    merge) that a larger group shares; a free row left empty wastes its share of every decode
    step until the running rows finish. So the waiting group is admitted once
        group's requests / max_rows x decode steps the longest running row may still take
    reaches `admit_after_steps` (in whole-batch decode steps), or once it fills the prefill budget
    (waiting cannot make it larger). On a CPU, where a prefill call costs about three decode
    steps, short answers are then prefilled in groups as large as a static batch's and long ones
    refill a row as soon as it frees; 0 refills at once, as vLLM does;
  - an empty batch admits whatever fits at once: a queue that holds a full group never waits.
    Only a batch that has just drained waits for the clients of its last rows (a closed loop's
    clients send their next request as their answer arrives): until as many requests have
    arrived since the drain as those rows, or a full group waits, at most GATHER_STEPS decode
    steps' time (the last one measured). Otherwise the last client to come back would miss the
    group and wait a whole batch. A request that finds the batch idle is admitted at once.
Prompt lengths are estimated before prefill (the rendered prompt's text tokens plus
`vision_grid`² tokens per image; twin rows from the request's plan) and known exactly after.
The queue itself is bounded by the replica's admission limit (429 beyond `max_concurrent`);
`submit` raises `Overloaded` (429) as well when `max_queue` requests are already waiting.

If an admitted group fails to prefill (a prompt only the engine finds too long ...), its requests
are retried one at a time so only the bad one fails. A failing decode step fails the running rows.
Results and errors come back as `serve.batching.Outcome`s through futures.

Clients that leave: a request's `cancelled` event (set by the stream when its consumer goes, or
by `generate` when its awaiting task is cancelled) or a cancelled future retires its row before
the next decode step (its KV rows are dropped from the batch) or takes it out of the queue. Every
future is settled at most once and a settled or cancelled one is skipped, so one client's
departure never reaches the engine loop or its neighbours.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

from lvlm_hallu.serve.batching import Outcome, StreamCancelled, unpack
from lvlm_hallu.serve.errors import Overloaded

log = logging.getLogger("serve.scheduler")
REFILL_STEPS = 6  # docs/serving.md "Batching": chosen on the shapes model on a CPU, long answers refill at once
GATHER_STEPS = 4  # a drained batch waits at most this many decode steps' time for its clients (_gather)


class PrefillShape(NamedTuple):
    """What one waiting request adds to a prefill and to the tokens in flight."""

    rows: int  # its main row plus its twin rows
    prompt_tokens: int  # text and image tokens of its prompt (an estimate before prefill)
    max_new_tokens: int


@dataclass(frozen=True)
class Admission:
    """The admission policy of the module docstring, as a pure function of the queue's state."""

    max_rows: int = 8
    max_tokens: int = 65536
    max_prefill_tokens: int = 2048
    admit_after_steps: int = REFILL_STEPS  # the refill threshold, in whole-batch decode steps

    def __post_init__(self):
        if min(self.max_rows, self.max_tokens, self.max_prefill_tokens) < 1 or self.admit_after_steps < 0:
            raise ValueError("max_rows, max_tokens and max_prefill_tokens must be >= 1, admit_after_steps >= 0")

    def take(self, waiting: Sequence[PrefillShape], *, running: int, in_flight: int, steps_left: int) -> tuple[int, bool]:
        """(n, now): the first n waiting requests fit the limits; `now` says whether to prefill
        them before the next decode step (False: hold them for a larger group). `steps_left`: the
        decode steps the longest running row may still take (its max_new_tokens minus its tokens)."""
        n = rows = longest = 0
        budget_full = False
        for shape in waiting:
            if running + n >= self.max_rows:
                break
            grown_rows, grown_longest = rows + shape.rows, max(longest, shape.prompt_tokens)
            if n and grown_rows * grown_longest > self.max_prefill_tokens:
                budget_full = True
                break
            need = shape.prompt_tokens + shape.max_new_tokens
            if in_flight + need > self.max_tokens and (running or n):
                break
            n, rows, longest, in_flight = n + 1, grown_rows, grown_longest, in_flight + need
        if not n or not running:
            return n, bool(n)
        group_full = budget_full or rows * longest >= self.max_prefill_tokens
        return n, group_full or n * steps_left >= self.admit_after_steps * self.max_rows


@dataclass
class Job:
    request: Any
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    on_token: Optional[Callable[[int, str], None]] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: Any = None  # the RunningBatch row once admitted
    shape: Optional[PrefillShape] = None  # set by the engine loop when it first considers the job


class ContinuousScheduler:
    """Iteration-level scheduler around one pipeline (one per replica)."""

    def __init__(self, pipeline: Any, *, max_rows: int = 8, max_tokens: int = 65536, max_prefill_tokens: int = 2048,
                 admit_after_steps: int = REFILL_STEPS, max_queue: int = 1024, on_batch: Callable[[int, bool], None] | None = None):
        from lvlm_hallu.lvlm.pipeline import RunningBatch

        self.admission = Admission(max_rows, max_tokens, max_prefill_tokens, admit_after_steps)
        self.pipeline, self.max_queue = pipeline, max_queue
        self._on_batch = on_batch
        self._batch = RunningBatch(pipeline)
        self._jobs: dict[int, Job] = {}  # id(row) -> job, for the running rows
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        grid = getattr(getattr(pipeline, "facts", None), "vision_grid", None)
        self._image_tokens = int(grid) ** 2 if isinstance(grid, int) else 576  # per image, for the estimate
        self._step_s = self._drained_at = 0.0  # the last decode step's duration; when the batch last drained
        self._arrivals = 0  # requests submitted so far
        self._owed = 0  # requests the clients of the batch's last rows may send after it drained (see _gather)
        self.steps = 0
        self.rows_stepped = 0  # sum of batch sizes over steps (mean batch = rows_stepped / steps)
        self.prefills = 0  # prefill calls (groups admitted); mean group = prefilled / prefills
        self.prefilled = 0  # requests admitted through them
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # -- submitting (any thread) ------------------------------------------------------------------
    def submit(self, request: Any, on_token: Callable[[int, str], None] | None = None,
               cancelled: threading.Event | None = None) -> concurrent.futures.Future:
        """Queue a request; the future resolves to its Outcome."""
        job = Job(request, on_token=on_token)
        if cancelled is not None:
            job.cancelled = cancelled
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting; retry shortly", retry_after_s=1)
            self._waiting.append(job)
            self._arrivals += 1
            self._wake.notify()
        return job.future

    async def generate(self, request: Any, cancelled: threading.Event | None = None) -> Outcome:
        """Await one request's Outcome without holding a thread. If the awaiting task is
        cancelled (its client left), the row is retired at the next step."""
        cancelled = cancelled or threading.Event()
        future = self.submit(request, cancelled=cancelled)
        try:
            # shield: a cancelled wrapper must not cancel the engine's future under its feet
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def run_batch(self, items: list) -> list[Outcome]:
        """Blocking: submit every request (or `Ticket`) and wait for all (warm-up, tests, the
        static interface)."""
        futures = [self.submit(r, cancelled=e) for r, e in map(unpack, items)]
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
                if not self._batch:
                    self._gather()
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
                    started = time.perf_counter()
                    finished = self._batch.step()
                    self._step_s = time.perf_counter() - started
                    if not self._batch:  # drained: the clients of its last rows may come back
                        with self._wake:
                            self._drained_at = time.perf_counter()
                            self._owed = self._arrivals + sum(row.finish_reason != "cancelled" for row in finished)
                    self._complete(finished)
            except Exception as err:  # noqa: BLE001 - a failed step fails its rows, not the loop
                log.exception("decode step failed")
                self._fail_running(err)
        self._fail_running(RuntimeError("the scheduler was closed"))
        with self._wake:  # nothing stays queued (or counted as waiting) after close
            left = list(self._waiting)
            self._waiting.clear()
        for job in left:
            settle(job, Outcome(error=RuntimeError("the scheduler was closed")))

    def _gather(self) -> None:
        """After a drain, wait for the clients of the batch's last rows: until as many requests
        have arrived since as those rows, or the waiting ones fill the rows or the prefill budget,
        at most GATHER_STEPS decode steps' time (the last one measured) after the drain. A static
        batch is gathered the same way (`--batch-wait-ms`); a request that finds the batch idle
        for longer is admitted at once. Called holding the lock."""
        deadline = self._drained_at + GATHER_STEPS * self._step_s
        while not self._closed and self._arrivals < self._owed and time.perf_counter() < deadline:
            waiting = list(itertools.islice(self._waiting, self.admission.max_rows))
            n, _ = self.admission.take([self._shape(job) for job in waiting], running=0, in_flight=0, steps_left=0)
            if len(waiting) >= self.admission.max_rows or n < len(waiting):
                break  # a full group is here
            self._wake.wait(deadline - time.perf_counter())

    def _cancel_gone(self) -> None:
        for job in self._jobs.values():
            if gone(job):
                self._batch.cancel(job.row)  # retired, KV rows dropped, by the next step
        with self._wake:
            left = [j for j in self._waiting if gone(j)]
            for job in left:
                self._waiting.remove(job)
        for job in left:
            settle(job, Outcome(error=StreamCancelled("client disconnected")))

    def _in_flight_tokens(self) -> int:
        return sum(row.prompt_tokens + row.request.max_new_tokens for row in self._batch.rows)

    def _take(self) -> list[Job]:
        """Waiting jobs to prefill before the next step, oldest first (see `Admission`)."""
        free = self.admission.max_rows - len(self._batch)
        with self._wake:
            waiting = list(itertools.islice(self._waiting, max(0, free)))  # no more could join
        if not waiting:
            return []
        shapes = [self._shape(job) for job in waiting]
        steps_left = max((row.request.max_new_tokens - len(row.ids) for row in self._batch.rows), default=0)
        n, now = self.admission.take(shapes, running=len(self._batch), in_flight=self._in_flight_tokens(),
                                     steps_left=steps_left)
        if not now:
            return []
        with self._wake:
            taken = [self._waiting.popleft() for _ in range(n)]  # only this thread removes jobs
        return taken

    def _shape(self, job: Job) -> PrefillShape:
        if job.shape is None:
            job.shape = prefill_shape(self.pipeline, job.request, self._image_tokens)
        return job.shape

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
                    settle(job, Outcome(error=err))

    def _admit_group(self, jobs: list[Job]) -> None:
        streams = [self._stream_for(job) for job in jobs]
        self.prefills += 1
        self.prefilled += len(jobs)
        rows = self._batch.admit([job.request for job in jobs], streams=streams)
        for job, row in zip(jobs, rows):
            job.row = row
            if row.result is not None:  # finished on its first token
                settle(job, Outcome(result=row.result))
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
                settle(job, Outcome(error=StreamCancelled("client disconnected")))
            else:
                settle(job, Outcome(result=row.result))

    def _fail_running(self, err: BaseException) -> None:
        from lvlm_hallu.lvlm.pipeline import RunningBatch

        for job in self._jobs.values():
            settle(job, Outcome(error=err))
        self._jobs.clear()
        self._batch = RunningBatch(self.pipeline)


def gone(job: Job) -> bool:
    """The job's client has left: its stream or caller said so, or its future was cancelled."""
    return job.cancelled.is_set() or job.future.cancelled()


def settle(job: Job, outcome: Outcome) -> None:
    """Resolve the job's future once; a future already settled or cancelled is left alone."""
    if job.future.done():
        return
    try:
        job.future.set_result(outcome)
    except concurrent.futures.InvalidStateError:  # cancelled by its caller meanwhile
        pass


def prefill_shape(pipeline: Any, request: Any, image_tokens: int) -> PrefillShape:
    """Estimate a request's prefill before it runs: its plan's twin rows (interventions/plan.py,
    cheap to build) and its prompt's tokens (the rendered chat text, each image placeholder
    counted as `image_tokens`). Anything that fails here fails again, properly, at prefill."""
    r = request
    images = 0 if r.image is None else (len(r.image) if isinstance(r.image, (list, tuple)) else 1)
    try:
        rows = 1 + len(getattr(pipeline.build_plan([r]), "twins_needed", ()))
        text_tokens = len(pipeline.tokenizer(pipeline.render_prompt(r))["input_ids"])  # as the processor: BOS too
        tokens = text_tokens + images * (image_tokens - 1)
    except Exception:  # noqa: BLE001 - a rough estimate; the prefill reports the real error
        rows, tokens = 1, images * image_tokens + len(str(r.prompt)) // 2 + 16
    return PrefillShape(rows, max(1, tokens), r.max_new_tokens)
