"""Batch evaluation on a Ray cluster: model replicas as Ray actors, batches scheduled by the driver (docs/cluster.md).

Why our own small scheduler rather than Ray Data's `map_batches`: an evaluation run is a few
thousand small items whose answers must land, in one place, in an append-only results file that a
restarted run reads to skip finished keys. The driver hands each batch to a replica with a free
slot and gets the answers back; it stays the only writer. Ray Data would add pandas/pyarrow to the
install, its own streaming executor and a sink we would have to make resumable and idempotent.
(`ray.util.ActorPool` has the right shape but blocks in `get_next_unordered` while a replica
waits to be restarted on a lost node, and cannot drop a replica: the driver waits with
`ray.wait(timeout=...)` instead, so it notices within `poll` seconds.)

The cluster rules, and how they hold:
- Images travel with the batch. `ship="bytes"` reads each image on the driver and sends its bytes;
  `ship="uri"` sends the location for every node to read itself (a shared filesystem path,
  `file://`, or `s3://`/`gs://`/`hdfs://` through `pyarrow.fs`); `ship="auto"` (the default)
  sends bytes for local files and URIs for remote ones. A driver-local path never reaches an actor.
- A dead replica loses nothing. Actors are created with `max_restarts` and `max_task_retries`, so
  Ray restarts a crashed replica in place and re-runs the batch it held. A replica gone for good
  (restarts spent, killed) or on a node that left the cluster (`ray.nodes()`, checked every `poll`
  seconds: Ray would otherwise hold its calls until a restart that may never find room) is dropped;
  its batches go back to the queue for the live replicas and a replacement is started (up to
  `max_replacements`), which takes work once Ray has placed it and its model has loaded.
- A run that cannot progress fails. With no live replica for `start_timeout` seconds (none placed,
  e.g. the only node with room was lost) or no batch finished for `stall_timeout` seconds,
  `ClusterStalled` says what is missing; the finished batches are on disk and the same call resumes.
- Nothing is written twice. At-least-once execution may answer a batch twice; records are keyed
  and the driver's `ResultsFile` (eval/runner.py) appends only keys it does not hold.
- Devices: an actor that reserved GPUs (`num_gpus`) sees exactly those (Ray sets
  CUDA_VISIBLE_DEVICES), so `replica_device` maps a requested "cuda"/"cuda:N" to the actor's first
  visible GPU and refuses a CUDA device in an actor that reserved none.
"""

from __future__ import annotations

import io
import os
import time
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
# Devices inside a replica


def replica_device(device: str | None, device_map: Any, gpu_ids: Sequence[Any]) -> str | None:
    """The device a replica loads on: its reserved GPUs are the only ones it sees (Ray sets
    CUDA_VISIBLE_DEVICES to `gpu_ids`), so "cuda" or "cuda:N" becomes "cuda:0" there; a CUDA device
    in a replica that reserved no GPU is refused. With a device map the map decides (None)."""
    if device_map is not None:
        if not gpu_ids and device_map not in ("cpu", {"": "cpu"}):
            raise RuntimeError("--device-map in a replica that reserved no GPU: give the replicas GPUs "
                               "(--ray-actors on a cluster with GPUs) or use --device cpu")
        return None
    if device is None or not str(device).startswith("cuda"):
        return device
    if not gpu_ids:
        raise RuntimeError(f"device {device!r} in a replica that reserved no GPU: the cluster has no free "
                           "GPU for it (ray status shows the GPUs); use --device cpu")
    return "cuda:0"


def replica_resources(device: str, device_map: Any, num_actors: int, cluster_gpus: float) -> tuple[str, dict[str, Any]]:
    """(device, Ray options) of each of `num_actors` replicas: one CPU each; on CUDA (or with a device
    map) a GPU each when the cluster has that many, else an equal share of them. "auto" is CUDA
    when the cluster has GPUs. CUDA on a cluster without GPUs is refused (ValueError)."""
    if device == "auto":
        device = "cuda" if cluster_gpus > 0 else "cpu"
    if device_map is None and not str(device).startswith("cuda"):
        return device, {"num_cpus": 1}
    if cluster_gpus <= 0:
        raise ValueError(f"--device {device}{' --device-map' if device_map is not None else ''} with --ray-actors: "
                         "the Ray cluster has no GPU (`ray status` lists its resources); use --device cpu")
    return device, {"num_cpus": 1, "num_gpus": min(1.0, cluster_gpus / num_actors)}


def load_replica(name: str, *, device: str | None = "cpu", dtype: str | None = None, device_map: Any = None,
                 **kwargs: Any) -> Any:
    """Factory of a replica's model: `lvlm.load` on the GPUs this actor reserved (see `replica_device`)."""
    import ray

    from lvlm_hallu import lvlm

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    placed = replica_device(device, device_map, gpu_ids)
    options = {"dtype": dtype, **kwargs, **({"device_map": device_map} if device_map is not None else {})}
    return lvlm.load(name, **({"device": placed} if placed is not None else {}), **options)


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
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class ClusterStalled(RuntimeError):
    """The run cannot progress: no live replica, or no batch finished for too long."""


@dataclass
class RunStats:
    """What one `run` did: items answered per node, batches re-queued, replicas replaced, nodes lost."""

    items_per_node: Counter = field(default_factory=Counter)
    requeued_batches: int = 0
    replaced_actors: int = 0
    lost_nodes: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Slot:
    """A replica as the driver tracks it: its handle, whether it is placed and loaded, its calls."""

    handle: Any
    started: float
    ready_ref: Any = None  # where(): resolves once the actor is placed and its model loaded
    node: str | None = None
    calls: dict[Any, int] = field(default_factory=dict)  # ObjectRef -> batch id

    @property
    def ready(self) -> bool:
        return self.node is not None


class ClusterPool:
    """`num_actors` model replicas; the driver schedules the batches and alone writes results.

    The replicas live across runs (configurations), so each model loads once. `actor_options`
    are Ray resource options (e.g. `{"num_gpus": 1}` for a GPU per replica); `slots` batches are
    in flight per replica. With `name`, replicas are named actors `<name>-0`, `<name>-1`, ...
    (replacements continue the count), so operators find them with `ray list actors` (the
    namespace comes from `actor_options`). `poll`: seconds between checks of the replicas' nodes;
    `start_timeout`: seconds without any live replica before the run fails (placement and model
    loading included); `stall_timeout`: seconds without a finished batch before it fails (None: never).
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
        poll: float = 1.0,
        start_timeout: float = 600.0,
        stall_timeout: float | None = 3600.0,
    ):
        import ray

        if ship not in SHIPPING:
            raise ValueError(f"unknown ship mode {ship!r}; valid: {', '.join(SHIPPING)}")
        if num_actors < 1 or slots < 1:
            raise ValueError(f"num_actors and slots must be >= 1, got {num_actors}, {slots}")
        if not ray.is_initialized():
            ray.init(include_dashboard=False)  # RAY_ADDRESS (set by `ray job submit`) picks the cluster
        self.ship, self.factory, self.slots = ship, factory, slots
        self.poll, self.start_timeout, self.stall_timeout = poll, start_timeout, stall_timeout
        self.max_replacements = num_actors * 2 if max_replacements is None else max_replacements
        self._cls = ray.remote(Replica)
        self._resources = dict(actor_options or {"num_cpus": 1})
        self._options = dict(max_restarts=max_restarts, max_task_retries=max_task_retries, **self._resources)
        self.name, self._started = name, 0
        self._slots = [self._start() for _ in range(num_actors)]
        self.last_run = RunStats()

    @property
    def actors(self) -> list[Any]:
        """The replicas' actor handles (live, loading, or waiting for room)."""
        return [s.handle for s in self._slots]

    def _start(self) -> _Slot:
        named = {} if self.name is None else {"name": f"{self.name}-{self._started}"}
        self._started += 1
        handle = self._cls.options(**self._options, **named).remote(self.factory)
        return _Slot(handle, time.monotonic(), handle.where.remote())

    # -- the run -------------------------------------------------------------------------------

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
        Raises `ClusterStalled` when it cannot progress (class docstring), a model's own error as
        the `ray.exceptions.RayTaskError` it raised; finished batches are on disk either way.
        """
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        _check_keys(items)
        stats = self.last_run = RunStats()
        results = ResultsFile(results_path, fingerprint)
        todo = [it for it in items if it.key not in results]
        batches = dict(enumerate(_batches(todo, batch_size)))
        pending: deque[int] = deque(batches)
        bar, task = _progress(len(items), len(items) - len(todo), description, progress)
        if on_batch is not None:
            on_batch(results.records, stats)
        last_batch = no_replica_since = time.monotonic()
        next_check = 0.0
        with bar:
            while pending or any(s.calls for s in self._slots):
                self._settle_ready()
                for slot in self._slots:
                    while pending and slot.ready and len(slot.calls) < self.slots:
                        bid = pending.popleft()
                        # The bytes are read now, when a slot is free: at most `slots` batches per replica in memory.
                        slot.calls[slot.handle.answer.remote(adapter, bid, pack(batches[bid], self.ship))] = bid
                calls = {ref: slot for slot in self._slots for ref in slot.calls}
                waiting = [s.ready_ref for s in self._slots if not s.ready]
                done, _ = ray.wait(list(calls) + waiting, num_returns=1, timeout=self.poll, fetch_local=False)
                if done:
                    done, _ = ray.wait(list(calls) + waiting, num_returns=len(calls) + len(waiting), timeout=0,
                                       fetch_local=False)
                for ref in done:
                    slot = calls.get(ref)
                    if slot is None or ref not in slot.calls:
                        continue  # a replica getting ready: _settle_ready reads it next turn
                    bid = slot.calls.pop(ref)
                    try:
                        _, node, answers = ray.get(ref)
                    except RayActorError as err:
                        pending.append(bid)
                        stats.requeued_batches += 1
                        if isinstance(err, ActorDiedError):  # unavailable-for-now replicas are kept
                            self._drop(slot, pending, stats)
                        continue
                    batch = batches[bid]
                    if len(answers) != len(batch):
                        raise RuntimeError(f"replica returned {len(answers)} answers for {len(batch)} items")
                    results.append(make_record(it, a) for it, a in zip(batch, answers, strict=True))
                    slot.node = node
                    stats.items_per_node[node] += len(batch)
                    last_batch = time.monotonic()
                    bar.advance(task, len(batch))
                    if on_batch is not None:
                        on_batch(results.records, stats)
                now = time.monotonic()
                if now >= next_check:
                    self._drop_lost_nodes(pending, stats)
                    next_check = now + self.poll
                if any(s.ready for s in self._slots):
                    no_replica_since = now
                self._check_progress(now, no_replica_since, last_batch, len(pending), stats)
        return {it.key: results.records[it.key] for it in items}

    def _settle_ready(self) -> None:
        """Mark replicas whose where() resolved as ready; a replica that died while starting is dropped."""
        import ray
        from ray.exceptions import RayActorError

        for slot in list(self._slots):
            if slot.ready or not ray.wait([slot.ready_ref], timeout=0, fetch_local=False)[0]:
                continue
            try:
                slot.node = ray.get(slot.ready_ref)["node_id"]
            except RayActorError as err:  # e.g. the model failed to load: say why if none is left
                self._drop(slot, None, self.last_run, reason=str(err).strip().splitlines()[-1][:500])

    def _drop(self, slot: _Slot, pending: deque[int] | None, stats: RunStats, reason: str = "") -> None:
        """Remove a replica for good: its calls back to `pending`, a replacement while the budget lasts."""
        import ray

        if slot not in self._slots:
            return
        self._slots.remove(slot)
        if pending is not None and slot.calls:
            pending.extend(slot.calls.values())
            stats.requeued_batches += len(slot.calls)
        slot.calls.clear()
        ray.kill(slot.handle, no_restart=True)
        if self.max_replacements > 0:
            self.max_replacements -= 1
            stats.replaced_actors += 1
            self._slots.append(self._start())
        if not self._slots:
            raise ClusterStalled(f"every model replica died and the replacement budget is spent "
                                 f"({stats.replaced_actors} replaced in this run)" + (f": {reason}" if reason else ""))

    def _drop_lost_nodes(self, pending: deque[int], stats: RunStats) -> None:
        """Replicas on a node that left the cluster: Ray would hold their calls until it restarts
        them elsewhere, which never happens when no other node has room."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for slot in list(self._slots):
            if slot.node is not None and slot.node not in alive:
                if slot.node not in stats.lost_nodes:
                    stats.lost_nodes.append(slot.node)
                self._drop(slot, pending, stats)

    def _check_progress(self, now: float, no_replica_since: float, last_batch: float, left: int,
                        stats: RunStats) -> None:
        import ray

        if now - no_replica_since > self.start_timeout:
            alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
            raise ClusterStalled(
                f"no model replica has been live for {self.start_timeout:g} s with {left} batches left: the "
                f"cluster has no room for one ({self._resources} each; alive nodes: {alive}; nodes lost in "
                f"this run: {len(stats.lost_nodes)}). The finished batches are on disk: the same command resumes "
                "once the cluster has room."
            )
        if self.stall_timeout is not None and now - last_batch > self.stall_timeout:
            raise ClusterStalled(f"no batch finished for {self.stall_timeout:g} s with {left} batches queued and "
                                 f"{sum(len(s.calls) for s in self._slots)} in flight; the finished batches are "
                                 "on disk: the same command resumes")

    # -- the replicas --------------------------------------------------------------------------

    def _first_ready(self) -> Any:
        """The first replica that is placed and loaded, waiting up to `start_timeout` (ClusterStalled
        if none is: the cluster has no room for a replica, or every one failed to load)."""
        import ray

        deadline = time.monotonic() + self.start_timeout
        while self._slots:
            self._settle_ready()
            ready = [s for s in self._slots if s.ready]
            if ready:
                return ready[0].handle
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterStalled(f"no model replica started within {self.start_timeout:g} s: the cluster has no "
                                     f"room for one ({self._resources} each)")
            ray.wait([s.ready_ref for s in self._slots], num_returns=1, timeout=min(self.poll, left), fetch_local=False)
        raise ClusterStalled("every model replica died before it started")

    def info(self) -> dict[str, Any]:
        """The first live replica's `model.info()` (model id, dtype, device ...), for provenance."""
        import ray

        return ray.get(self._first_ready().info.remote()) if self._slots else {}

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(model)` on the first live replica (all replicas load the same model)."""
        import ray

        return ray.get(self._first_ready().call.remote(fn)) if self._slots else None

    def where(self) -> list[dict[str, Any]]:
        """Node id, process id and reserved GPUs of every replica."""
        import ray

        return ray.get([a.where.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self._slots = []


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
