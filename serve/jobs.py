"""Evaluation jobs (CHAIR, POPE) on Ray, outside the request path, on the cluster runner of `lvlm eval`.

Layout:
- `JobBoard`: the plain state machine of every job (queued → running → succeeded | failed |
  cancelled, with progress and partial metrics); updates after a terminal state are ignored, so
  a late progress report cannot revive a cancelled job. Unit-tested without Ray.
- `JobRegistry`: one named Ray actor (`lvlm-eval-jobs`) that owns the jobs, so every replica of
  the service sees the same ones. Their state is in the durable SQLite store of serve/jobstore.py
  (same transitions as the board), so the registry restarts (`max_restarts`) without losing them
  and failed or cancelled jobs resume from their results files (docs/cluster.md). It starts one
  `JobDriver` actor per job (at most `max_running` at once, the rest wait queued) and kills it
  on cancel or when it is done.
- `JobDriver`: a light actor on the head node (no model, no CPU reserved) that builds the job's
  items in the job's folder and runs them through `eval.cluster.ClusterPool`, the runner of
  `lvlm eval --ray-actors N`: `replicas` model replicas anywhere in the cluster, images shipped
  as bytes, a dead replica's batches retried on another (0 lost, 0 duplicated), the driver the
  only writer of the fingerprinted results file. It reports progress to the registry after each
  batch. Its replicas are owned by it, so they die with it (cancel, registry restart).
- `place_job`: where a job's replicas load the model and what they reserve: the server's placement
  unless the job names its own (`options.device`, `options.dtype`, `options.device_map`, checked
  by serve/jobspec.py), GPUs reserved as `lvlm eval --ray-actors` reserves them. Decided at
  submit (a GPU placement on a cluster without GPUs is a 400) and again by the driver.
- `JOB_KINDS`: job functions by name. "chair" and "pope" run on the embedded shapes world
  (images and COCO-style annotations generated deterministically into the job's folder); more
  kinds (real COCO, custom question files) plug in with `@job_kind("name")`.

`eval`, `lvlm` and the shapes world are imported inside the driver and replicas only: the service
process never pays for them, and the app imports this module without touching torch.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REGISTRY_NAME = "lvlm-eval-jobs"
REGISTRY_NAMESPACE = "lvlm"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


# -- placement --------------------------------------------------------------------------------
PLACEMENT_OPTIONS = ("device", "dtype", "device_map")  # a job's options that place its replicas
MAP_ONLY = ("max_memory", "offload_folder")  # server load options that only mean something under a device map


class JobPlacementError(ValueError):
    """A placement the cluster cannot give the job's replicas; `param` names the option (a 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class JobPlacement:
    """Where one job's replicas load the model (`lvlm.load` keywords) and what each reserves (Ray options)."""

    load_kwargs: dict[str, Any]
    replica_options: dict[str, Any]

    def fields(self) -> dict[str, Any]:
        """{"device", "dtype", "device_map"} with the dtype resolved as lvlm.load resolves it: what
        `lvlm eval` records as `placement` in its reports and fingerprints (eval.context.Placement)."""
        from lvlm_hallu.eval.context import Placement

        load, device_map = self.load_kwargs, self.load_kwargs.get("device_map")
        if isinstance(device_map, str):  # a strategy spreads over the GPUs the replica reserved, if any
            first = "cuda:0" if self.replica_options.get("num_gpus") else "cpu"
            return {**Placement(first, load.get("dtype")).fields(), "device_map": device_map}
        return Placement(load.get("device") or "cpu", load.get("dtype"), device_map).fields()


def _needs_gpu(device: str, device_map: Any) -> bool:
    if device_map is None:
        return device.startswith("cuda")
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(p != "cpu" for p in places)  # a strategy ("auto", ...) spreads over the GPUs


def place_job(options: dict[str, Any], load_kwargs: dict[str, Any], replica_options: dict[str, Any],
              replicas: int, cluster_gpus: float) -> JobPlacement:
    """The job's placement: the server's (`lvlm serve --device --dtype --device-map`, and
    `--eval-num-gpus` for the Ray options of its eval replicas) unless the job's `options` name one.

    - The job's `device` or `device_map` replaces the server's device and map together (a device
      names one device; a map decides alone, as in lvlm.load); its `dtype` replaces the server's.
      "auto" is cuda when the cluster has a GPU, else cpu.
    - GPUs as `lvlm eval --ray-actors` reserves them (eval.cluster.replica_resources): a job that
      names a placement needing a GPU keeps the GPUs the server reserves per eval replica, or else
      reserves one per replica when the cluster has that many (an equal share otherwise); one that
      names a CPU placement reserves none. On a cluster without a GPU it is refused
      (JobPlacementError). Each replica then loads on the GPUs it reserved (eval.cluster.load_replica).
    - A job that names nothing runs as the server places it, unchanged.
    """
    asked = {k: options[k] for k in PLACEMENT_OPTIONS if options.get(k) is not None}
    if not asked:
        return JobPlacement(dict(load_kwargs), dict(replica_options))
    load = dict(load_kwargs)
    if "dtype" in asked:
        load["dtype"] = asked["dtype"]
    if "device" in asked or "device_map" in asked:
        load.pop("device_map", None)
        device = asked.get("device") or load.get("device") or "cpu"
        load["device"] = ("cuda" if cluster_gpus > 0 else "cpu") if device == "auto" else device
        if "device_map" in asked:
            load["device_map"] = asked["device_map"]
    if load.get("device_map") is None:
        for key in MAP_ONLY:  # lvlm.load refuses them without a map
            load.pop(key, None)
    device, device_map = str(load.get("device") or "cpu"), load.get("device_map")
    cpu_options = {k: v for k, v in replica_options.items() if k != "num_gpus"}
    if not _needs_gpu(device, device_map):
        return JobPlacement(load, cpu_options)  # no GPU held for a CPU model
    if replica_options.get("num_gpus"):
        return JobPlacement(load, dict(replica_options))
    if cluster_gpus <= 0:
        param = "options.device_map" if "device_map" in asked else "options.device" if "device" in asked \
            else "options.dtype"
        where = f"device_map {device_map!r}" if device_map is not None else f"device {device!r}"
        raise JobPlacementError(f"{param}: the job's replicas would load on {where}, but the Ray cluster has no GPU "
                                "(`ray status` lists its resources); use device cpu", param)
    return JobPlacement(load, {**cpu_options, "num_gpus": min(1.0, cluster_gpus / replicas)})


# -- job kinds --------------------------------------------------------------------------------
@dataclass
class JobContext:
    """What a job function gets: its request, the model and its replicas, a work folder, a progress hook."""

    job_id: str
    request: dict[str, Any]  # EvalJobRequest fields
    model: str
    load_kwargs: dict[str, Any]
    workdir: Path
    report: Callable[..., None]  # (done, total, partial metrics, cluster facts)
    replicas: int = 1  # model replicas of the job's ClusterPool
    replica_options: dict[str, Any] = field(default_factory=dict)  # Ray options of each replica
    replica_name: Optional[str] = None  # replicas are named <replica_name>-0, -1, ...

    def placement(self) -> dict[str, Any]:
        """Device, resolved dtype and device map of the replicas (`JobPlacement.fields`)."""
        return JobPlacement(self.load_kwargs, self.replica_options).fields()

    def pool(self) -> Any:
        """The job's `eval.cluster.ClusterPool`: `replicas` actors that each load the model once."""
        from functools import partial

        from lvlm_hallu.eval.cluster import ClusterPool, load_replica

        # load_replica: each replica loads on the GPU it reserved (the server's --device cuda:N
        # names a GPU of the head node; a replica sees only its own, as cuda:0).
        return ClusterPool(partial(load_replica, self.model, **self.load_kwargs), self.replicas,
                           actor_options=self.replica_options or None, name=self.replica_name)


@dataclass(frozen=True)
class JobKind:
    name: str
    run: Callable[[JobContext], dict]  # returns the final metrics
    summary: str


JOB_KINDS: dict[str, JobKind] = {}


def job_kind(name: str, summary: str) -> Callable[[Callable[[JobContext], dict]], Callable[[JobContext], dict]]:
    def wrap(fn: Callable[[JobContext], dict]) -> Callable[[JobContext], dict]:
        JOB_KINDS[name] = JobKind(name, fn, summary)
        return fn

    return wrap


def cluster_facts(replicas: int, stats: Any, placement: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the job's pool did in this attempt (`eval.cluster.RunStats`) and where its replicas
    ran (`placement`: device, resolved dtype, device map), as the job record shows it."""
    facts = {"replicas": replicas, "items_per_node": dict(stats.items_per_node),
             "requeued_batches": stats.requeued_batches, "replaced_replicas": stats.replaced_actors}
    return facts if placement is None else {**facts, "placement": placement}


def _answer_with_progress(ctx: JobContext, task: Any, items: list, partial_metrics: Callable[[dict], dict]) -> dict:
    """Answer `items` on the job's replica pool (eval/cluster.py); report after every batch."""
    from functools import partial

    from lvlm_hallu import interventions
    from lvlm_hallu.eval.fingerprint import Fingerprint, items_digest, model_identity
    from lvlm_hallu.eval.runner import RESOLVED_FIELD, check_results_file, intervention_values, local_answer, model_context

    req = ctx.request
    path = ctx.workdir / f"{task.name}.jsonl"
    # A resumed job continues its results file only if nothing its answers depend on has changed
    # (the model's weights, the request, the items): FingerprintMismatch fails the job otherwise.
    # The batch size and the number of replicas change who answers, not what; the placement
    # (device, resolved dtype, map) changes what, as in `lvlm eval` (a bfloat16 job never resumes
    # float32 answers).
    # The values the replicas run for "tuned" and model-aware defaults are checked once they are
    # loaded (eval.runner.RESOLVED_FIELD), everything else before.
    placement = ctx.placement()
    fingerprint = Fingerprint.of(benchmark=task.name,
                                 model=model_identity(ctx.model), load=ctx.load_kwargs, placement=placement,
                                 job={k: v for k, v in req.items() if k != "batch_size"}, items=items_digest(items))
    check_results_file(path, fingerprint, ignore=(RESOLVED_FIELD,))
    # Picklable (a partial of module functions): it travels to the replicas with every batch.
    adapter = partial(local_answer, max_new_tokens=req["max_tokens"], interventions=req.get("interventions"),
                      resolve=interventions.resolve, seed=req.get("seed"))
    total = len(items)

    def on_batch(records: dict, stats: Any) -> None:
        ctx.report(len(records), total, partial_metrics(records) if records else None,
                   cluster_facts(ctx.replicas, stats, placement))

    pool = ctx.pool()
    try:
        values = intervention_values(interventions.resolve, pool.call(model_context))
        if values is not None:
            fingerprint = fingerprint.extend(**{RESOLVED_FIELD: values(req.get("interventions"))})
        done = pool.run(items, path, adapter, batch_size=req["batch_size"], progress=False,
                        fingerprint=fingerprint, on_batch=on_batch)
    finally:
        pool.shutdown()
    metrics, _details = task.score(done)
    return {k: round(float(v), 4) for k, v in metrics.items()}


@job_kind("chair", "CHAIR on captions of shapes-world test images (limit = images)")
def run_chair(ctx: JobContext) -> dict:
    from lvlm_hallu.eval.chair import CaptionParser, ground_truth_from_coco, load_synonyms, score_captions
    from lvlm_hallu.eval.coco import image_file_names, load_coco
    from lvlm_hallu.eval.compare import CHAIR_PROMPT, ChairTask
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH, build_split

    req, opts = ctx.request, ctx.request.get("options") or {}
    req["max_tokens"] = req.get("max_tokens") or int(opts.get("max_new_tokens", 64))
    inst, caps = build_split(ctx.workdir / "data", "test", req["limit"], seed=req.get("seed") or None)
    parser = CaptionParser(load_synonyms(SYNONYMS_PATH))
    coco = load_coco(inst)
    names = image_file_names(coco)
    ids = sorted(names)
    gt = ground_truth_from_coco(coco, caps, parser=parser, image_ids=ids)
    files = {i: str(ctx.workdir / "data" / "images" / names[i]) for i in ids}
    task = ChairTask(files, gt, parser, prompt=opts.get("prompt", CHAIR_PROMPT),
                     short_caption=bool(opts.get("short_caption", False)))

    def partial(records: dict) -> dict:
        result = score_captions([(r["image_id"], r["answer"]) for r in records.values()], gt, parser,
                                short_caption=task.short_caption)
        return {k: round(float(v), 4) for k, v in result.metrics().items()}

    return _answer_with_progress(ctx, task, task.items(), partial)


@job_kind("pope", "POPE on shapes-world test images (limit = questions per split; options.splits, options.parser)")
def run_pope(ctx: JobContext) -> dict:
    from lvlm_hallu.eval.chair import CaptionParser, ground_truth_from_coco, load_synonyms
    from lvlm_hallu.eval.coco import image_file_names, load_coco
    from lvlm_hallu.eval.compare import PopeTask
    from lvlm_hallu.eval.pope import SPLITS, build_split as build_pope_split, get_parser, metrics_from_predictions
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH, build_split

    req, opts = ctx.request, ctx.request.get("options") or {}
    req["max_tokens"] = req.get("max_tokens") or int(opts.get("max_new_tokens", 8))
    splits = opts.get("splits") or list(SPLITS)
    parser_name = opts.get("parser", "pope")
    get_parser(parser_name)
    # Negatives are drawn from the objects of the sampled images, so a handful of images would
    # leave none to ask about: sample at least 8 images and keep the first `limit` questions
    # (an even count keeps the yes/no interleaving balanced).
    n_images = max(8, -(-req["limit"] // 6))
    keep = req["limit"] + req["limit"] % 2
    inst, caps = build_split(ctx.workdir / "data", "test", 3 * n_images, seed=req.get("seed") or None)
    coco = load_coco(inst)
    gt = ground_truth_from_coco(coco, caps, parser=CaptionParser(load_synonyms(SYNONYMS_PATH)))
    questions = {s: build_pope_split(gt.objects, s, n_images=n_images, seed=req.get("seed", 0),
                                     image_names=image_file_names(coco))[:keep] for s in splits}
    task = PopeTask(questions, ctx.workdir / "data" / "images", parser=parser_name)
    parse = get_parser(parser_name)

    def partial(records: dict) -> dict:
        preds = [parse(r["answer"], r["label"]) for r in records.values()]
        m = metrics_from_predictions(preds, [r["label"] for r in records.values()], parser_name).metrics()
        return {f"answered {k}": round(float(v), 4) for k, v in m.items()}

    return _answer_with_progress(ctx, task, task.items(), partial)


# -- state ------------------------------------------------------------------------------------
@dataclass
class JobRecord:
    id: str
    kind: str
    model: str
    request: dict[str, Any]
    state: str = "queued"
    done: int = 0
    total: int = 0
    metrics: Optional[dict[str, Any]] = None
    error: Optional[dict[str, Any]] = None
    created_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    owner: Optional[str] = None  # owner id of the API key that created it (serve/limits.py key_owner)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobBoard:
    """Job states and their transitions; keeps the `keep` most recent finished jobs."""

    def __init__(self, keep: int = 200):
        self.jobs: dict[str, JobRecord] = {}
        self.keep = keep

    def create(self, kind: str, model: str, request: dict[str, Any], owner: str | None = None) -> JobRecord:
        job = JobRecord(id=f"evaljob-{uuid.uuid4().hex[:16]}", kind=kind, model=model, request=request, owner=owner)
        self.jobs[job.id] = job
        self._trim()
        return job

    def get(self, job_id: str, owner: str | None = None) -> Optional[JobRecord]:
        """The job, or None when it does not exist or (given an owner) belongs to another."""
        job = self.jobs.get(job_id)
        return job if job is not None and (owner is None or job.owner == owner) else None

    def list(self, owner: str | None = None) -> list[JobRecord]:
        return sorted((j for j in self.jobs.values() if owner is None or j.owner == owner), key=lambda j: j.created_at)

    def queued(self) -> list[JobRecord]:
        return [j for j in self.list() if j.state == "queued"]

    def running(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.state == "queued":
            job.state, job.started_at = "running", time.time()

    def progress(self, job_id: str, done: int, total: int, metrics: Optional[dict] = None) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.state not in TERMINAL:
            job.done, job.total = done, total
            if metrics is not None:
                job.metrics = metrics

    def succeed(self, job_id: str, metrics: dict) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.state not in TERMINAL:
            job.state, job.metrics, job.finished_at = "succeeded", metrics, time.time()
            job.done = max(job.done, job.total)

    def fail(self, job_id: str, message: str, type_: str = "job_error") -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.state not in TERMINAL:
            job.state, job.finished_at = "failed", time.time()
            job.error = {"message": message, "type": type_, "param": None, "code": "job_failed"}

    def cancel(self, job_id: str) -> bool:
        """Mark cancelled; False when the job had already finished."""
        job = self.jobs.get(job_id)
        if job is None or job.state in TERMINAL:
            return False
        job.state, job.finished_at = "cancelled", time.time()
        return True

    def _trim(self) -> None:
        finished = [j for j in self.list() if j.state in TERMINAL]
        for job in finished[: max(0, len(self.jobs) - self.keep)]:
            del self.jobs[job.id]


# -- Ray actors -------------------------------------------------------------------------------
HEAD_NODE = {"node:__internal_head__": 0.001}


class JobDriver:
    """Drives one job (a Ray actor on the head node): its folder, its items, its replica pool."""

    def run(self, job_id: str, kind: str, model: str, request: dict, load_kwargs: dict, registry: Any,
            root: str, replicas: int, replica_options: dict, attempt: int) -> tuple[Optional[dict], Optional[str]]:
        """Run the job; returns (metrics, error) and also pushes them to the registry at once."""
        workdir = Path(root) / job_id
        workdir.mkdir(parents=True, exist_ok=True)
        registry.started.remote(job_id)

        def report(done: int, total: int, metrics: Optional[dict], cluster: Optional[dict] = None) -> None:
            registry.progress.remote(job_id, done, total, metrics, cluster)

        try:
            import ray

            # decided again here: the cluster's GPUs may have changed since the submit
            placed = place_job(request.get("options") or {}, load_kwargs, replica_options, replicas,
                               float(ray.cluster_resources().get("GPU", 0)))
            ctx = JobContext(job_id, dict(request), model, placed.load_kwargs, workdir, report, replicas=replicas,
                             replica_options={"namespace": REGISTRY_NAMESPACE, **placed.replica_options},
                             replica_name=f"lvlm-eval-replica-{job_id}-{attempt}")
            outcome = (JOB_KINDS[kind].run(ctx), None)
        except Exception as err:  # noqa: BLE001 - the job fails, the driver reports why
            outcome = (None, f"{type(err).__name__}: {err}")
        registry.finished.remote(job_id, *outcome)
        return outcome


class JobRegistry:
    """Named Ray actor holding the job store (serve/jobstore.py) and the driver actors of running jobs.

    `replica_options` are the Ray options of each model replica (`num_cpus`, `num_gpus`,
    `runtime_env`); each job gets `replicas` of them.
    """

    def __init__(self, replica_options: dict[str, Any], max_running: int = 1, root: str | None = None,
                 retention: dict[str, Any] | None = None, replicas: int = 1):
        import ray

        from lvlm_hallu.serve.jobstore import JobStore

        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.root = root or tempfile.mkdtemp(prefix="lvlm-eval-jobs-")
        # The durable store (serve/jobstore.py): a restarted registry (max_restarts) runs this
        # constructor again with the same root and finds every job; jobs left running lost their
        # driver with the old registry and are queued again, resuming from their results files.
        self.board = JobStore(self.root, **(retention or {}))
        self.driver_class = ray.remote(JobDriver)
        # The driver holds no model: no CPU reserved, so the replicas get the cluster's CPUs. It
        # lives on the head node, beside the store, so a resumed job finds its results file
        # even when the jobs directory is not shared with the worker nodes.
        runtime_env = {"runtime_env": replica_options["runtime_env"]} if "runtime_env" in replica_options else {}
        self.driver_options = {"num_cpus": 0, "resources": HEAD_NODE, **runtime_env}
        self.replica_options = dict(replica_options)
        self.replicas = replicas
        self.max_running = max_running
        self.workers: dict[str, Any] = {}  # job id -> (driver actor, ref of its run call)
        self.board.reload()
        self._schedule()

    # `owner`: the owner id of the caller's API key (serve/limits.py); None sees every job (a
    # server without keys). Another owner's job is reported as missing.
    def submit(self, kind: str, model: str, request: dict, load_kwargs: dict, owner: str | None = None) -> dict:
        job = self.board.create(kind, model, request, load_kwargs, owner=owner)
        self._schedule()
        return self.board.get(job.id).to_dict()

    def get(self, job_id: str, owner: str | None = None) -> Optional[dict]:
        self._reap()
        job = self.board.get(job_id, owner)
        return None if job is None else job.to_dict()

    def list(self, owner: str | None = None) -> list[dict]:
        self._reap()
        return [j.to_dict() for j in self.board.list(owner)]

    def cancel(self, job_id: str, owner: str | None = None) -> Optional[dict]:
        import ray

        job = self.board.get(job_id, owner)
        if job is None:
            return None
        if self.board.cancel(job_id) and job_id in self.workers:
            # Stops the job mid-batch; its replicas are owned by the driver and die with it.
            ray.kill(self.workers.pop(job_id)[0])
        self._schedule()
        return self.board.get(job_id).to_dict()

    def resume(self, job_id: str, owner: str | None = None) -> Optional[dict]:
        """Queue a failed or cancelled job again; it continues from its results file.

        Returns {"resumed": bool, "job": record} (resumed False: the job was not failed or
        cancelled), or None for an unknown id (or another owner's job).
        """
        if self.board.get(job_id, owner) is None:
            return None
        resumed = self.board.resume(job_id)
        self._schedule()
        return {"resumed": resumed, "job": self.board.get(job_id).to_dict()}

    def health(self) -> dict:
        return {**self.board.health(), "running": len(self.workers), "orphans": len(self.board.orphans())}

    # called by drivers
    def started(self, job_id: str) -> None:
        self.board.running(job_id)

    def progress(self, job_id: str, done: int, total: int, metrics: Optional[dict],
                 cluster: Optional[dict] = None) -> None:
        self.board.progress(job_id, done, total, metrics, cluster)

    def finished(self, job_id: str, metrics: Optional[dict], error: Optional[str]) -> None:
        import ray

        self._record(job_id, metrics, error)
        entry = self.workers.pop(job_id, None)
        if entry is not None:
            ray.kill(entry[0])  # its run() has nothing left to do but return
        self._schedule()  # a slot is free: start the next queued job without waiting for a poll

    def _record(self, job_id: str, metrics: Optional[dict], error: Optional[str]) -> None:
        if error is None:
            self.board.succeed(job_id, metrics or {})
        else:
            self.board.fail(job_id, error)

    def _schedule(self) -> None:
        import ray

        self._reap()
        me = ray.get_runtime_context().current_actor
        for job in self.board.queued():
            if job.id in self.workers:
                continue
            if len(self.workers) >= self.max_running:
                break
            # Named per attempt, so operators (and tests) can find a job's driver and replicas:
            # `ray list actors` shows lvlm-eval-driver-<id>-<attempt> and lvlm-eval-replica-<id>-<attempt>-<n>.
            name = f"lvlm-eval-driver-{job.id}-{job.attempts}"
            driver = self.driver_class.options(name=name, namespace=REGISTRY_NAMESPACE, **self.driver_options).remote()
            ref = driver.run.remote(job.id, job.kind, job.model, job.request, job.load_kwargs, me, self.root,
                                    self.replicas, self.replica_options, job.attempts)
            # The job stays "queued" until the driver reports `started`.
            self.workers[job.id] = (driver, ref)

    def _reap(self) -> None:
        """Collect the outcomes of finished runs; a driver that died fails its job (resume continues it)."""
        import ray

        if not self.workers:
            return
        refs = {ref: job_id for job_id, (_, ref) in self.workers.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            job_id = refs[ref]
            driver, _ = self.workers.pop(job_id)
            try:
                # The run's return value is the same outcome `finished` carries; it counts when
                # that message is still queued behind the call that got us here.
                self._record(job_id, *ray.get(ref))
            except Exception as err:  # noqa: BLE001 - the driver process died (OOM, killed, node lost)
                self.board.fail(job_id, f"evaluation job driver died: {type(err).__name__}")
            ray.kill(driver)
        if ready:
            self._schedule()


class RayJobs:
    """The service's view of the registry actor (async, for the replica's event loop)."""

    def __init__(self, *, replica_options: dict[str, Any], replicas: int = 1, max_running: int = 1,
                 jobs_dir: str | None = None, retention: dict[str, Any] | None = None):
        import ray

        from lvlm_hallu.serve.jobstore import default_jobs_dir

        self._replica_options, self._replicas = dict(replica_options), replicas
        # Ray restarts a dead registry with these same arguments (so the same jobs directory) and
        # retries the calls that were in flight or sent while it was down. It lives on the head
        # node, so a restart finds the store on the same disk.
        self._actor = ray.remote(JobRegistry).options(
            name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True, lifetime="detached",
            num_cpus=0, max_concurrency=1, max_restarts=-1, max_task_retries=-1,
            resources=HEAD_NODE,
        ).remote(replica_options, max_running, str(jobs_dir or default_jobs_dir()), retention, replicas)

    @staticmethod
    def kinds() -> dict[str, str]:
        return {k.name: k.summary for k in JOB_KINDS.values()}

    @staticmethod
    def cluster_gpus() -> float:
        import ray

        return float(ray.cluster_resources().get("GPU", 0))

    def place(self, request: dict, load_kwargs: dict) -> JobPlacement:
        """The job's placement (`place_job`) on the cluster as it is now; a placement it cannot
        give is a 400 naming the option, before anything is stored."""
        from lvlm_hallu.serve.errors import BadRequest

        options = request.get("options") or {}
        named = any(options.get(k) is not None for k in PLACEMENT_OPTIONS)
        try:  # the cluster is asked only for a job that names a placement
            return place_job(options, load_kwargs, self._replica_options, self._replicas,
                             self.cluster_gpus() if named else 0.0)
        except JobPlacementError as err:
            raise BadRequest(str(err), param=err.param, code="invalid_value") from None

    async def submit(self, kind: str, model: str, request: dict, load_kwargs: dict, owner: str | None = None) -> dict:
        # the job's own load options are stored with it (the server's, or those its options name)
        placed = self.place(request, load_kwargs)
        return await self._actor.submit.remote(kind, model, request, placed.load_kwargs, owner)

    async def get(self, job_id: str, owner: str | None = None) -> Optional[dict]:
        return await self._actor.get.remote(job_id, owner)

    async def list(self, owner: str | None = None) -> list[dict]:
        return await self._actor.list.remote(owner)

    async def cancel(self, job_id: str, owner: str | None = None) -> Optional[dict]:
        return await self._actor.cancel.remote(job_id, owner)

    async def resume(self, job_id: str, owner: str | None = None) -> Optional[dict]:
        return await self._actor.resume.remote(job_id, owner)

    async def health(self) -> dict:
        return await self._actor.health.remote()

