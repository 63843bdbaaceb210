"""Batch evaluation on a Ray cluster: model replicas under `ray.util.ActorPool` (docs/cluster.md).

Why `ActorPool` rather than Ray Data's `map_batches`: an evaluation run is a few thousand small
items whose answers must land, in one place, in an append-only results file that a restarted run
reads to skip finished keys. `ActorPool` hands each batch to whichever replica is free and gives the
answers back to the driver, which stays the only writer; Ray Data would add pandas/pyarrow to the
install, its own streaming executor and a sink we would have to make resumable and idempotent.

The three cluster rules, and how they hold:
- Images travel with the batch. `ship="bytes"` reads each image on the driver and sends its bytes;
  `ship="uri"` sends the location for every node to read itself (a shared filesystem path,
  `file://`, or `s3://`/`gs://`/`hdfs://` through `pyarrow.fs`); `ship="auto"` (the default)
  sends bytes for local files and URIs for remote ones. A driver-local path never reaches an actor.
- A dead replica loses nothing. Actors are created with `max_restarts` and `max_task_retries`, so
  Ray restarts a crashed replica (on any node with room) and re-runs the batch it held. When a
  replica is gone for good (restarts spent, node lost), `ActorPool` drops it, the driver re-queues
  that batch for the other replicas and starts a replacement.
- Nothing is written twice. At-least-once execution may answer a batch twice; records are keyed
  and the driver's `ResultsFile` (eval/runner.py) appends only keys it does not hold.
"""

from __future__ import annotations

import io
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lvlm_hallu.eval.fingerprint import Fingerprint
from lvlm_hallu.eval.runner import AnswerFn, Item, ResultsFile, _batches, _check_keys, _progress, local_answer, make_record

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")


# ---------------------------------------------------------------------------------------------
# Images: bytes or node-readable URIs


@dataclass(frozen=True)
class ImageBytes:
    """An image file's bytes, read where the data lives and shipped inside the batch."""

    data: bytes
    name: str  # the source location, for error messages only; actors never open it

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def read_uri(uri: str) -> bytes:
    """Bytes of a local path, `file://` URI, or remote URI (`pyarrow.fs`, when pyarrow is installed)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not is_remote(uri):
        return Path(uri).read_bytes()
    try:
        from pyarrow import fs
    except ImportError as err:
        raise RuntimeError(f"reading {uri} needs pyarrow (pip install pyarrow)") from err
    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as f:
        return f.read()


def _ship_bytes(image: str) -> Any:
    return ImageBytes(read_uri(image), image)


def _ship_uri(image: str) -> Any:
    return image


def _ship_auto(image: str) -> Any:
    return image if is_remote(image) else _ship_bytes(image)


SHIPPING: dict[str, Callable[[str], Any]] = {"bytes": _ship_bytes, "uri": _ship_uri, "auto": _ship_auto}


def pack(batch: Sequence[Item], ship: str) -> list[Item]:
    """The batch as it travels: each image replaced by its bytes (or kept as a URI)."""
    how = SHIPPING[ship]
    return [it if it.image is None else replace(it, image=how(it.image)) for it in batch]


def unpack(batch: Sequence[Item]) -> list[Item]:
    """On the replica: images as what `PIL.Image.open` reads (a file object or a readable path)."""
    out = []
    for it in batch:
        image = it.image
        if isinstance(image, ImageBytes):
            image = image.open()
        elif isinstance(image, str) and (is_remote(image) or image.startswith("file://")):
            image = io.BytesIO(read_uri(image))
        out.append(replace(it, image=image))
    return out


# ---------------------------------------------------------------------------------------------
# The replica actor


class Replica:
    """One model replica (a Ray actor): `factory()` builds it, `adapter(model)` answers batches."""

    def __init__(self, factory: Callable[[], Any]):
        self.model = factory()

    def answer(self, adapter: Callable[[Any], AnswerFn], bid: int, batch: Sequence[Item]) -> tuple[int, str, list[str]]:
        import ray

        answers = list(adapter(self.model)(unpack(batch)))
        return bid, ray.get_runtime_context().get_node_id(), answers

    def info(self) -> dict[str, Any]:
        info = getattr(self.model, "info", None)
        return dict(info() if callable(info) else info or {})

    def call(self, fn: Callable[[Any], Any]) -> Any:
        return fn(self.model)

    def where(self) -> dict[str, Any]:
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@dataclass
class RunStats:
    """What one `run` did: items answered per node, batches re-queued, replicas replaced."""

    items_per_node: Counter = field(default_factory=Counter)
    requeued_batches: int = 0
    replaced_actors: int = 0


class ClusterPool:
    """`num_actors` model replicas in a `ray.util.ActorPool`; the driver alone writes results.

    The replicas live across runs (configurations), so each model loads once. `actor_options`
    are Ray resource options (e.g. `{"num_gpus": 1}` for a GPU per replica); `slots` batches are
    in flight per replica (a replacement replica gets one: `ActorPool.push` takes a handle once).
    With `name`, replicas are named actors `<name>-0`, `<name>-1`, ... (replacements continue the
    count), so operators find them with `ray list actors` (the namespace comes from `actor_options`).
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        num_actors: int = 2,
        *,
        actor_options: Mapping[str, Any] | None = None,
        ship: str = "auto",
        max_restarts: int = 2,
        max_task_retries: int = 2,
        max_replacements: int | None = None,
        slots: int = 2,
        name: str | None = None,
    ):
        import ray
        from ray.util import ActorPool

        if ship not in SHIPPING:
            raise ValueError(f"unknown ship mode {ship!r}; valid: {', '.join(SHIPPING)}")
        if num_actors < 1 or slots < 1:
            raise ValueError(f"num_actors and slots must be >= 1, got {num_actors}, {slots}")
        if not ray.is_initialized():
            ray.init(include_dashboard=False)  # RAY_ADDRESS (set by `ray job submit`) picks the cluster
        self.ship = ship
        self.factory = factory
        self.max_replacements = num_actors * 2 if max_replacements is None else max_replacements
        self._cls = ray.remote(Replica)
        self._options = dict(max_restarts=max_restarts, max_task_retries=max_task_retries,
                             **dict(actor_options or {"num_cpus": 1}))
        self.name, self._started = name, 0
        self.actors = [self._start() for _ in range(num_actors)]
        # Each replica is in the pool `slots` times: its next batch is already queued on it while
        # the driver writes the last one, so the replica never waits for the driver.
        self.pool = ActorPool([a for _ in range(slots) for a in self.actors])
        self.last_run = RunStats()

    def _start(self) -> Any:
        named = {} if self.name is None else {"name": f"{self.name}-{self._started}"}
        self._started += 1
        return self._cls.options(**self._options, **named).remote(self.factory)

    def run(
        self,
        items: Sequence[Item],
        results_path: str | Path,
        adapter: Callable[[Any], AnswerFn] = local_answer,
        *,
        batch_size: int = 8,
        progress: bool = True,
        description: str = "eval (ray)",
        fingerprint: Fingerprint | None = None,
        on_batch: Callable[[Mapping[str, dict], RunStats], None] | None = None,
    ) -> dict[str, dict]:
        """Answer every unfinished item on the replicas; return all records by key.

        `fingerprint` (eval/fingerprint.py) goes into a new results file; resuming a file written by
        another run (model, prompt, decoding, interventions, items, scorer) raises FingerprintMismatch.
        `on_batch(records, stats)` is called once before the first batch and after every batch is
        on disk, with every record the file holds (finished keys included) and this run's stats:
        the service's eval jobs report progress and partial metrics from it.
        """
        from ray.exceptions import RayActorError

        _check_keys(items)
        stats = self.last_run = RunStats()
        results = ResultsFile(results_path, fingerprint)
        todo = [it for it in items if it.key not in results]
        pending: deque[tuple[int, list[Item]]] = deque(enumerate(_batches(todo, batch_size)))
        outstanding: dict[int, tuple[list[Item], Any, Any]] = {}  # batch id -> (batch, ref, replica)
        bar, task = _progress(len(items), len(items) - len(todo), description, progress)
        if on_batch is not None:
            on_batch(results.records, stats)

        def call(actor: Any, job: tuple[int, list[Item]]) -> Any:
            bid, batch = job
            # The bytes are read here, when a slot is free: at most `slots` batches per replica in memory.
            ref = actor.answer.remote(adapter, bid, pack(batch, self.ship))
            outstanding[bid] = (batch, ref, actor)
            return ref

        with bar:
            while pending or self.pool.has_next():
                while pending and self.pool.has_free():
                    self.pool.submit(call, pending.popleft())
                try:
                    bid, node, answers = self.pool.get_next_unordered()
                except RayActorError:
                    lost, dead = self._failed(outstanding)
                    pending.extend(lost)
                    self._replace(dead)
                    continue
                batch = outstanding.pop(bid)[0]
                if len(answers) != len(batch):
                    raise RuntimeError(f"replica returned {len(answers)} answers for {len(batch)} items")
                results.append(make_record(it, a) for it, a in zip(batch, answers, strict=True))
                stats.items_per_node[node] += len(batch)
                bar.advance(task, len(batch))
                if on_batch is not None:
                    on_batch(results.records, stats)
        return {it.key: results.records[it.key] for it in items}

    def _failed(self, outstanding: dict[int, tuple[list[Item], Any, Any]]) -> tuple[list, list]:
        """(batches whose call ended with its replica, replicas dead for good); the batches leave `outstanding`."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        refs = {ref: bid for bid, (_, ref, _) in outstanding.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
        lost, dead = [], []
        for ref in ready:
            try:
                ray.get(ref)  # finished fine: the pool hands it back on a later call
            except RayActorError as err:
                bid = refs[ref]
                batch, _, actor = outstanding.pop(bid)
                lost.append((bid, batch))
                if isinstance(err, ActorDiedError):  # unavailable-for-now replicas stay in the pool
                    dead.append(actor)
        self.last_run.requeued_batches += len(lost)
        return lost, dead

    def _replace(self, dead: list[Any]) -> None:
        """Start a fresh replica for each dead one, up to `max_replacements` over the pool's life."""
        import ray

        for actor in dead:
            if actor not in self.actors:
                continue
            self.actors.remove(actor)
            ray.kill(actor, no_restart=True)
            if self.max_replacements > 0:
                self.max_replacements -= 1
                self.last_run.replaced_actors += 1
                fresh = self._start()
                self.actors.append(fresh)
                self.pool.push(fresh)
        if not self.actors:
            raise RuntimeError("every model replica died and the replacement budget is spent")

    def info(self) -> dict[str, Any]:
        """The first replica's `model.info()` (model id, dtype, attention backend ...), for provenance."""
        import ray

        return ray.get(self.actors[0].info.remote()) if self.actors else {}

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(model)` on the first replica (all replicas load the same model)."""
        import ray

        return ray.get(self.actors[0].call.remote(fn)) if self.actors else None

    def where(self) -> list[dict[str, Any]]:
        """Node id and process id of every replica."""
        import ray

        return ray.get([a.where.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def run_cluster(
    items: Sequence[Item],
    factory: Callable[[], Any],
    results_path: str | Path,
    *,
    adapter: Callable[[Any], AnswerFn] = local_answer,
    num_actors: int = 2,
    batch_size: int = 8,
    progress: bool = True,
    fingerprint: Fingerprint | None = None,
    **pool_options: Any,
) -> dict[str, dict]:
    """One-shot run: start `num_actors` replicas, answer the items, stop the replicas."""
    pool = ClusterPool(factory, num_actors, **pool_options)
    try:
        return pool.run(items, results_path, adapter, batch_size=batch_size, progress=progress,
                        fingerprint=fingerprint)
    finally:
        pool.shutdown()
