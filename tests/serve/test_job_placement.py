"""Per-job placement of evaluation jobs (issue 36, item 1): `options.device`, `options.dtype` and
`options.device_map` take the CLI's values (serve/jobspec.py), `serve.jobs.place_job` decides where
the job's replicas load and which GPUs they reserve (as `lvlm eval --ray-actors` does,
tests/eval/test_placement.py), and the placement is recorded in the job's `cluster` facts and its
results file's fingerprint. Without Ray and without a GPU: the GPU path is checked as a decision
(the replicas' own loading on the GPUs they reserved is tests/eval/test_cluster_devices.py)."""

from __future__ import annotations

import json

import pytest

from lvlm_hallu.serve.jobs import JOB_KINDS, JobPlacement, JobPlacementError, place_job
from lvlm_hallu.serve.jobspec import JobSpecError, check_options
from tests.serve.test_jobs import POPE, InProcessPool, YesModel, context

CPU = {"device": "cpu", "dtype": "float32", "device_map": None}

# ---------------------------------------------------------------------------------------------
# Validation at submit (the CLI's values; a 400 naming the option)


def test_placement_options_are_normalised():
    opts = check_options("pope", {"device": "cuda:1", "dtype": "bf16"}, max_tokens=64)
    assert (opts["device"], opts["dtype"]) == ("cuda:1", "bfloat16")  # one spelling: fp16/float16 jobs fingerprint alike
    assert check_options("chair", {"device_map": "auto"}, max_tokens=64)["device_map"] == "auto"
    explicit = {"model.vision_tower": "cpu", "model.language_model": 0, "lm_head": "cuda:1"}
    assert check_options("chair", {"device_map": explicit}, max_tokens=64)["device_map"] == explicit
    assert "device" not in check_options("chair", {}, max_tokens=64)  # nothing named: the server's placement


BAD_PLACEMENTS = [
    ("device-unknown", {"device": "tpu"}, "options.device", "unknown device 'tpu'; use cpu, cuda, cuda:N or auto"),
    ("device-bad-index", {"device": "cuda:x"}, "options.device", "unknown device 'cuda:x'"),
    ("device-number", {"device": 0}, "options.device", "valid string"),
    ("dtype-unknown", {"dtype": "int3"}, "options.dtype", "unknown dtype 'int3'; use float32, float16 or bfloat16"),
    ("dtype-bool", {"dtype": True}, "options.dtype", "valid string"),
    ("device-map-file", {"device_map": "/etc/map.json"}, "options.device_map", "never a file"),
    ("device-map-disk", {"device_map": {"lm_head": "disk"}}, "options.device_map", "needs an offload folder"),
    ("device-map-negative", {"device_map": {"": -1}}, "options.device_map", "a GPU index"),
    ("device-map-bool", {"device_map": {"": True}}, "options.device_map", "a GPU index"),
    ("device-map-empty", {"device_map": {}}, "options.device_map", "non-empty JSON object"),
    ("device-map-list", {"device_map": [0, 1]}, "options.device_map", "non-empty JSON object"),
]


@pytest.mark.parametrize("options,param,needle", [c[1:] for c in BAD_PLACEMENTS], ids=[c[0] for c in BAD_PLACEMENTS])
def test_bad_placements_are_refused_naming_the_option(options, param, needle):
    for kind in ("chair", "pope"):
        with pytest.raises(JobSpecError) as err:
            check_options(kind, options, max_tokens=64)
        assert err.value.param == param and needle in str(err.value), str(err.value)
        assert str(err.value).startswith(f"{param}: ")


# ---------------------------------------------------------------------------------------------
# The decision: where the replicas load and what they reserve

SERVER = {"device": "cpu", "dtype": None}  # ServeConfig().load_kwargs()
ONE_CPU = {"num_cpus": 1.0, "num_gpus": 0.0}  # ServeConfig's eval_num_cpus / eval_num_gpus


def test_a_job_that_names_nothing_runs_as_the_server_places_it():
    gpu_server = {"device": "cuda", "dtype": "float16"}
    placed = place_job({}, gpu_server, {"num_cpus": 1.0, "num_gpus": 1.0}, 2, 0)
    assert placed == JobPlacement(gpu_server, {"num_cpus": 1.0, "num_gpus": 1.0})  # unchanged, even without GPUs
    assert place_job({"parser": "pope"}, SERVER, ONE_CPU, 1, 4).load_kwargs == SERVER


def test_gpu_placements_reserve_gpus_like_ray_actors():
    # one GPU per replica when the cluster has that many, else an equal share (replica_resources)
    placed = place_job({"device": "cuda"}, SERVER, ONE_CPU, 2, 4)
    assert placed.load_kwargs == {"device": "cuda", "dtype": None}
    assert placed.replica_options == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert place_job({"device": "cuda"}, SERVER, ONE_CPU, 4, 2).replica_options["num_gpus"] == 0.5
    # the GPUs the server already reserves per eval replica (--eval-num-gpus) are kept
    assert place_job({"device": "cuda:0"}, SERVER, {"num_cpus": 2.0, "num_gpus": 0.25}, 4, 1).replica_options == {
        "num_cpus": 2.0, "num_gpus": 0.25}
    # "auto": cuda when the cluster has a GPU, else cpu (nothing reserved)
    assert place_job({"device": "auto"}, SERVER, ONE_CPU, 1, 1).load_kwargs["device"] == "cuda"
    assert place_job({"device": "auto"}, SERVER, ONE_CPU, 1, 0) == JobPlacement(SERVER, {"num_cpus": 1.0})
    # a strategy map spreads over GPUs: reserved too
    mapped = place_job({"device_map": "auto", "dtype": "bfloat16"}, SERVER, ONE_CPU, 1, 2)
    assert mapped.load_kwargs == {"device": "cpu", "dtype": "bfloat16", "device_map": "auto"}
    assert mapped.replica_options["num_gpus"] == 1.0


def test_cpu_placements_hold_no_gpu_and_drop_the_servers_map():
    gpu_server = {"device": "cuda", "dtype": "float16", "device_map": "auto", "max_memory": {0: "20GiB"},
                  "offload_folder": "/srv/offload"}
    placed = place_job({"device": "cpu"}, gpu_server, {"num_cpus": 1.0, "num_gpus": 1.0}, 2, 8)
    # the job named one device: the server's map (and what only a map uses) goes; its dtype stays
    assert placed.load_kwargs == {"device": "cpu", "dtype": "float16"}
    assert placed.replica_options == {"num_cpus": 1.0}  # no GPU held for a CPU model
    cpu_map = place_job({"device_map": {"": "cpu"}}, SERVER, ONE_CPU, 1, 0)  # a map onto the CPU needs no GPU
    assert cpu_map.replica_options == {"num_cpus": 1.0} and cpu_map.load_kwargs["device_map"] == {"": "cpu"}
    # a job's map keeps the server's memory limits for it
    remapped = place_job({"device_map": "balanced"}, gpu_server, {"num_cpus": 1.0, "num_gpus": 1.0}, 1, 8)
    assert remapped.load_kwargs["max_memory"] == {0: "20GiB"} and remapped.load_kwargs["device_map"] == "balanced"


@pytest.mark.parametrize("options,param", [({"device": "cuda"}, "options.device"),
                                           ({"device_map": {"": 0}}, "options.device_map"),
                                           ({"dtype": "float16"}, "options.dtype")])
def test_a_gpu_placement_on_a_cluster_without_gpus_is_refused(options, param):
    server = {"device": "cuda", "dtype": None} if "dtype" in options else SERVER  # dtype alone: the server's cuda
    with pytest.raises(JobPlacementError, match="the Ray cluster has no GPU") as err:
        place_job(options, server, ONE_CPU, 2, 0)
    assert err.value.param == param and str(err.value).startswith(f"{param}: ")


def test_recorded_fields_resolve_the_dtype_where_the_replicas_run():
    assert place_job({}, SERVER, ONE_CPU, 1, 0).fields() == CPU
    assert place_job({"dtype": "bfloat16"}, SERVER, ONE_CPU, 1, 0).fields() == dict(CPU, dtype="bfloat16")
    assert place_job({"device": "cuda"}, SERVER, ONE_CPU, 1, 1).fields() == {
        "device": "cuda", "dtype": "float16", "device_map": None}  # the loader's CUDA default
    # a strategy map: the replica's first reserved GPU decides the default dtype (not this process's GPUs)
    assert place_job({"device_map": "auto"}, SERVER, ONE_CPU, 1, 2).fields() == {
        "device": "cuda:0", "dtype": "float16", "device_map": "auto"}
    assert place_job({"device_map": {"": 1}}, SERVER, ONE_CPU, 1, 2).fields()["device"] == "cuda:1"


# ---------------------------------------------------------------------------------------------
# Applied and recorded by the job


def test_the_job_records_its_placement_and_refuses_to_resume_under_another(tmp_path):
    from lvlm_hallu.eval.fingerprint import FingerprintMismatch

    request = dict(POPE, options={**POPE["options"], "dtype": "bfloat16"})
    placed = place_job(request["options"], SERVER, ONE_CPU, 1, 0)
    reports = []
    ctx = context(tmp_path, request, InProcessPool(YesModel()), reports)
    ctx.load_kwargs = placed.load_kwargs
    JOB_KINDS["pope"].run(ctx)
    header = json.loads((tmp_path / "pope.jsonl").read_text().splitlines()[0])["fingerprint"]
    assert header["placement"] == dict(CPU, dtype="bfloat16") and header["load"]["dtype"] == "bfloat16"
    assert reports[-1][3]["placement"] == dict(CPU, dtype="bfloat16")  # the job record's `cluster` facts

    # the same job as float32 is another run: refused before any replica starts
    other = context(tmp_path, dict(request, options={**POPE["options"], "dtype": "float32"}), None, [])
    other.load_kwargs = place_job(other.request["options"], SERVER, ONE_CPU, 1, 0).load_kwargs
    with pytest.raises(FingerprintMismatch, match=r'placement\.dtype: "bfloat16" != "float32"'):
        JOB_KINDS["pope"].run(other)


def test_the_pool_loads_with_the_jobs_placement(monkeypatch, tmp_path):
    from lvlm_hallu.eval import cluster
    from lvlm_hallu.serve.jobs import JobContext

    seen = {}

    class Pool:
        def __init__(self, factory, replicas, actor_options=None, name=None):
            seen.update(factory=factory, replicas=replicas, actor_options=actor_options)

    monkeypatch.setattr(cluster, "ClusterPool", Pool)
    placed = place_job({"device": "cuda", "dtype": "bfloat16"}, SERVER, ONE_CPU, 2, 2)
    JobContext("j", {}, "shapes", placed.load_kwargs, tmp_path, print, replicas=2,
               replica_options=placed.replica_options).pool()
    assert seen["factory"].func is cluster.load_replica and seen["factory"].args == ("shapes",)
    assert seen["factory"].keywords == {"device": "cuda", "dtype": "bfloat16"}  # load_replica maps cuda to its GPU
    assert seen["actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0} and seen["replicas"] == 2


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class _Registry:
    def __init__(self):
        self.calls = []
        for name in ("started", "progress", "finished"):
            setattr(self, name, _Remote(lambda *a, name=name: self.calls.append((name, *a))))


def test_the_driver_places_the_job_and_fails_it_clearly_without_gpus(monkeypatch, tmp_path):
    import ray

    from lvlm_hallu.serve import jobs

    seen = []
    monkeypatch.setitem(jobs.JOB_KINDS, "probe", jobs.JobKind("probe", lambda ctx: seen.append(ctx) or {"ok": 1.0}, ""))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 2.0})
    registry = _Registry()
    request = {"options": {"device": "cuda:1", "dtype": "float16"}}
    outcome = jobs.JobDriver().run("evaljob-p", "probe", "shapes", request, SERVER, registry, str(tmp_path), 2,
                                   dict(ONE_CPU), 0)
    assert outcome == ({"ok": 1.0}, None)
    (ctx,) = seen
    assert ctx.load_kwargs == {"device": "cuda:1", "dtype": "float16"}
    assert ctx.replica_options == {"namespace": jobs.REGISTRY_NAMESPACE, "num_cpus": 1.0, "num_gpus": 1.0}
    assert ctx.placement() == {"device": "cuda:1", "dtype": "float16", "device_map": None}

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})  # the GPUs are gone since the submit
    metrics, error = jobs.JobDriver().run("evaljob-q", "probe", "shapes", request, SERVER, registry, str(tmp_path), 2,
                                          dict(ONE_CPU), 0)
    assert metrics is None and "JobPlacementError: options.device: the job's replicas would load on device " \
        "'cuda:1', but the Ray cluster has no GPU" in error
    assert len(seen) == 1 and registry.calls[-1] == ("finished", "evaljob-q", None, error)


# ---------------------------------------------------------------------------------------------
# Through the HTTP API: RayJobs' submit-time decision, a store instead of the registry actor

KEY = "placement-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def api(tmp_path):
    from fastapi.testclient import TestClient

    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig
    from lvlm_hallu.serve.jobs import RayJobs
    from lvlm_hallu.serve.jobstore import JobStore
    from lvlm_hallu.serve.limits import Limits
    from tests.serve.conftest import FakePipeline

    store = JobStore(tmp_path / "jobs")

    async def submit(kind, model, request, load_kwargs, owner):
        return store.create(kind, model, request, load_kwargs, owner=owner).to_dict()

    class Actor:  # the registry actor's submit, in process
        pass

    jobs = RayJobs.__new__(RayJobs)  # no Ray: the actor is the store, the cluster's GPUs are set here
    jobs._actor, jobs._replica_options, jobs._replicas = Actor(), {"num_cpus": 1.0, "num_gpus": 0.0}, 2
    jobs._actor.submit = _Remote(submit)
    jobs.cluster_gpus = lambda: cluster["gpus"]
    cluster = {"gpus": 0.0}
    config = ServeConfig(model="fake", api_key=KEY, limits=Limits(max_tokens=64))
    with TestClient(build_app(Service(FakePipeline(), config, jobs=jobs)), raise_server_exceptions=False) as client:
        yield client, store, cluster


@pytest.mark.parametrize("options,param", [({"device": "tpu"}, "options.device"), ({"dtype": "int3"}, "options.dtype"),
                                           ({"device_map": "/etc/map.json"}, "options.device_map"),
                                           ({"device": "cuda"}, "options.device"),
                                           ({"device_map": "auto"}, "options.device_map")])
def test_bad_or_unplaceable_placements_are_400s_and_store_nothing(api, options, param):
    http, store, _ = api
    r = http.post("/v1/eval/jobs", headers=AUTH, json={"kind": "pope", "limit": 6, "options": options})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: ") and error["code"] == "invalid_value"
    assert store.list() == []


def test_a_placed_job_is_stored_with_its_own_load_options(api):
    http, store, cluster = api
    cluster["gpus"] = 1.0
    r = http.post("/v1/eval/jobs", headers=AUTH,
                  json={"kind": "chair", "limit": 2, "options": {"device": "auto", "dtype": "bf16"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request"]["options"] == {"device": "auto", "dtype": "bfloat16", "short_caption": False}
    stored = store.get(body["id"])
    assert stored.load_kwargs == {"device": "cuda", "dtype": "bfloat16"}  # auto: the cluster has a GPU
    plain = http.post("/v1/eval/jobs", headers=AUTH, json={"kind": "chair", "limit": 2}).json()
    assert store.get(plain["id"]).load_kwargs == {"device": "cpu", "dtype": None}  # the server's
