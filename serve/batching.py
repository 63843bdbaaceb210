"""Batch execution and token streaming around one model pipeline, as plain classes.

Two runners share one interface (`generate`, `run_batch`, `run_stream`): `EngineRunner` below
(static batching, `lvlm serve --scheduler static`) and `serve.scheduler.ContinuousScheduler`
(iteration-level batching, the default).

Ray Serve's `@serve.batch` decides WHEN rows form a batch (max_batch_size, batch_wait_timeout_s);
these classes decide HOW a batch runs, and they are what the unit tests exercise (Ray's
`_local_testing_mode` cannot run `@serve.batch`):

- `EngineRunner.run_batch` runs one engine call for the whole batch. Requests were validated one
  by one before they were batched, but if the batched call still raises (a prompt that only the
  engine can tell is too long, a model error on one row) the rows are retried one at a time, so
  only the bad row fails and its neighbours get exactly what they would get alone. Results come
  back as `Outcome`s rather than raising, because one exception from a batch method would fail
  every caller in the batch.
- A lock serialises engine calls: the streaming path and the batch path share one model, and two
  concurrent forwards would only fight over the same cores (or GPU) and memory.
- `TokenStream` bridges the engine's `on_token(row, delta)` callback, called on the worker
  thread, to an async iterator on the event loop. When the client goes away the next callback
  raises `StreamCancelled`, which stops the decode loop instead of finishing it for nobody.
- A `Ticket` carries a non-stream request with the event its caller sets when its client goes
  away; with a real pipeline `EngineRunner` drives the batch step by step itself (as
  `Pipeline.generate` does) and retires such a row at the next decode step, freeing its KV
  rows, while its neighbours decode on unchanged.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence

Generate = Callable[..., list]  # Pipeline.generate(requests, on_token=None) -> list[Result]


@dataclass
class Outcome:
    """What one row of a batch produced: a Result, or the exception that row alone raised."""

    result: Any = None
    error: Optional[BaseException] = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class StreamCancelled(Exception):
    """Raised inside the engine's token callback when the stream's consumer has gone away."""


@dataclass
class Ticket:
    """A request and the event its caller sets when its client has gone away."""

    request: Any
    cancelled: threading.Event = field(default_factory=threading.Event)


def unpack(item: Any) -> tuple[Any, Optional[threading.Event]]:
    """(request, cancelled event or None) of a Request or a Ticket."""
    return (item.request, item.cancelled) if isinstance(item, Ticket) else (item, None)


class EngineRunner:
    """Runs engine calls one at a time and isolates rows that fail."""

    def __init__(self, generate: Generate, *, on_batch: Callable[[int, bool], None] | None = None,
                 pipeline: Any = None):
        # pipeline: a real one (with an engine) lets the runner drop rows whose client left
        self._generate, self._pipeline = generate, pipeline
        self._lock = threading.Lock()
        self._on_batch = on_batch

    def run_batch(self, items: Sequence[Any]) -> list[Outcome]:
        """Generate for every request (or `Ticket`); a failing batch is retried row by row."""
        requests, events = zip(*map(unpack, items)) if items else ((), ())
        with self._lock:
            try:
                outcomes = self._run(list(requests), list(events))
                if len(outcomes) != len(requests):
                    raise RuntimeError(f"engine returned {len(outcomes)} results for {len(requests)} requests")
                self._report(len(requests), False)
                return outcomes
            except Exception as err:  # noqa: BLE001 - every failure becomes a per-row outcome
                if len(requests) == 1:
                    self._report(1, False)
                    return [Outcome(error=err)]
            self._report(len(requests), True)
            return [self._run_one(r, e) for r, e in zip(requests, events)]

    def _run(self, requests: list, events: list) -> list[Outcome]:
        if self._pipeline is None or not any(e is not None for e in events):
            return [Outcome(result=r) for r in self._generate(requests)]
        from lvlm_hallu.lvlm.pipeline import RunningBatch

        batch = RunningBatch(self._pipeline)  # Pipeline.generate's loop, with a look at the callers
        rows = batch.admit(requests)
        while batch:
            for row, event in zip(rows, events):
                if event is not None and event.is_set():
                    batch.cancel(row)  # retired (its KV rows freed) by the next step
            batch.step()
        return [Outcome(error=StreamCancelled("client disconnected")) if row.finish_reason == "cancelled"
                else Outcome(result=row.result) for row in rows]

    async def generate(self, request: Any, cancelled: threading.Event | None = None) -> Outcome:
        """One request alone, on a worker thread; setting `cancelled` stops it at the next step."""
        ticket = Ticket(request, cancelled or threading.Event())
        work = asyncio.ensure_future(asyncio.to_thread(self.run_batch, [ticket]))
        try:
            return (await asyncio.shield(work))[0]
        except asyncio.CancelledError:
            ticket.cancelled.set()
            raise

    def run_stream(self, request: Any, on_token: Callable[[int, str], None], cancelled: Any = None) -> Any:
        """Generate one request, calling `on_token(0, delta)` as text is decoded; raises on failure.
        (`cancelled` is unused: the token callback raises StreamCancelled instead.)"""
        with self._lock:
            self._report(1, False)
            results = self._generate([request], on_token=on_token)
        return results[0]

    def _run_one(self, request: Any, event: threading.Event | None = None) -> Outcome:
        try:
            return self._run([request], [event])[0]
        except Exception as err:  # noqa: BLE001
            return Outcome(error=err)

    def _report(self, size: int, fell_back: bool) -> None:
        if self._on_batch is not None:
            self._on_batch(size, fell_back)


_DONE = object()


async def _unwrap(outcome: Awaitable[Outcome]) -> Any:
    return (await outcome).unwrap()


class TokenStream:
    """Runs one streamed generation on a worker thread and yields its text deltas on the loop.

    Iterate with `async for delta in stream`; afterwards `stream.result` holds the Result. An
    engine error is raised from the iteration. `close()` cancels a generation still running.
    """

    def __init__(self, runner: EngineRunner, request: Any):
        self._runner, self._request = runner, request
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancelled = threading.Event()
        self._task: asyncio.Task | None = None
        self.result: Any = None

    def start(self) -> "TokenStream":
        start_stream = getattr(self._runner, "start_stream", None)
        if start_stream is not None:  # the continuous scheduler: no thread held per stream
            future = start_stream(self._request, self._on_token, self._cancelled)
            self._task = asyncio.ensure_future(_unwrap(asyncio.wrap_future(future)))
        else:
            self._task = asyncio.ensure_future(asyncio.to_thread(self._runner.run_stream, self._request, self._on_token))
        self._task.add_done_callback(self._finished)
        return self

    def _finished(self, task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here: nobody may be left to await a cancelled stream
        self._queue.put_nowait(_DONE)

    def _on_token(self, row: int, delta: str) -> None:  # called on the worker thread
        if self._cancelled.is_set():
            raise StreamCancelled("client disconnected")
        if delta:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    async def next_delta(self) -> Optional[str]:
        """The next text delta, or None once generation has finished (then `result` is set)."""
        if self._task is None:
            self.start()
        item = await self._queue.get()
        if item is _DONE:
            self._queue.put_nowait(_DONE)  # later calls see the end too
            self.result = self._task.result()  # raises the engine's error, if any
            return None
        return item

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> str:
        delta = await self.next_delta()
        if delta is None:
            raise StopAsyncIteration
        return delta

    def cancel(self) -> None:
        """Stop the generation at its next token or decode step. Synchronous on purpose: it runs
        in `finally` blocks of cancelled tasks, where any further `await` raises again."""
        self._cancelled.set()

    async def close(self) -> None:
        """`cancel`, then wait for the worker to let go (never raises)."""
        self.cancel()
        if self._task is not None:
            try:
                await asyncio.shield(self._task)
            except BaseException:  # noqa: BLE001 - StreamCancelled, an error nobody waits for, or our own cancel
                pass
