"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): the shapes model answers the same as
a local run, both nodes answer, and the replicas only ever see image bytes, never the driver's path;
a service eval job (serve/jobs.py) runs on the same two nodes through the same runner."""

from __future__ import annotations

import json
import sys
from functools import partial

import pytest

from lvlm_hallu.eval.runner import Item, local_answer, run

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_IMAGES = 6
MAX_NEW_TOKENS = 10


def load_shapes():
    from lvlm_hallu import lvlm

    return lvlm.load("shapes")


def guarded_answer(model, root: str, **decoding):
    """local_answer, after checking that no image arrived as a path under the driver's folder."""
    inner = local_answer(model, **decoding)

    def answer(batch):
        paths = [it.image for it in batch if isinstance(it.image, str)]
        assert not paths, f"driver paths reached a replica: {paths}"
        return inner(batch)

    return answer


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_two_nodes_equal_local_run_and_share_the_work(two_nodes, tmp_path):
    from lvlm_hallu.eval.cluster import ClusterPool
    from lvlm_hallu.lvlm.shapes import build_split

    cluster, worker = two_nodes
    images = tmp_path / "driver-only"
    inst, _ = build_split(images, "test", N_IMAGES)
    coco = json.loads(inst.read_text())
    items = [Item(f"img{im['id']}", "Describe this image.", str(images / "images" / im["file_name"]),
                  {"image_id": im["id"]}) for im in coco["images"]]
    assert len(items) == N_IMAGES

    pool = ClusterPool(load_shapes, num_actors=2, actor_options={"num_cpus": 1}, ship="bytes")
    try:
        adapter = partial(guarded_answer, root=str(images), max_new_tokens=MAX_NEW_TOKENS)
        remote = pool.run(items, tmp_path / "cluster.jsonl", adapter, batch_size=2, progress=False)
        per_node = dict(pool.last_run.items_per_node)
        where = pool.where()
    finally:
        pool.shutdown()

    local = run(items, local_answer(load_shapes(), max_new_tokens=MAX_NEW_TOKENS), tmp_path / "local.jsonl",
                batch_size=2, progress=False)
    assert remote == local  # same records, answer for answer
    assert any(r["answer"].strip() for r in local.values())
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2 and set(per_node) == nodes and {w["node_id"] for w in where} == nodes
    assert all(v > 0 for v in per_node.values()) and sum(per_node.values()) == N_IMAGES


@pytest.mark.slow
def test_service_job_on_two_nodes_equals_a_local_run_and_both_nodes_answer(two_nodes, tmp_path):
    """The job's images are generated in its folder on the head node; replicas on both nodes answer."""
    import time

    from lvlm_hallu import interventions
    from lvlm_hallu.eval.compare import CHAIR_PROMPT
    from lvlm_hallu.lvlm.shapes import build_split
    from lvlm_hallu.serve.jobs import RayJobs

    jobs = RayJobs(replica_options={"num_cpus": 1}, replicas=2, jobs_dir=str(tmp_path / "jobs"))
    request = {"kind": "chair", "limit": N_IMAGES, "max_tokens": MAX_NEW_TOKENS, "seed": 0, "batch_size": 2,
               "interventions": None, "options": {}}
    job = ray.get(jobs._actor.submit.remote("chair", "shapes", request, {}), timeout=60)
    deadline = time.monotonic() + 300
    while job["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = ray.get(jobs._actor.get.remote(job["id"]), timeout=60)
    assert job["state"] == "succeeded", job["error"]
    rows = [json.loads(x) for x in (tmp_path / "jobs" / job["id"] / "chair.jsonl").read_text().splitlines()[1:]]
    answered = {r["key"]: r["answer"] for r in rows}

    inst, _ = build_split(tmp_path / "local", "test", N_IMAGES)  # the same generated split, here
    coco = json.loads(inst.read_text())
    items = [Item(str(im["id"]), CHAIR_PROMPT, str(tmp_path / "local" / "images" / im["file_name"]),
                  {"image_id": im["id"]}) for im in sorted(coco["images"], key=lambda im: im["id"])]  # the job's order
    local = run(items, local_answer(load_shapes(), max_new_tokens=MAX_NEW_TOKENS, resolve=interventions.resolve,
                                    seed=0), tmp_path / "local.jsonl", batch_size=2, progress=False)
    assert answered == {k: r["answer"] for k, r in local.items()} and len(answered) == N_IMAGES
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    per_node = job["cluster"]["items_per_node"]
    assert len(nodes) == 2 and set(per_node) == nodes and all(v > 0 for v in per_node.values())
    assert sum(per_node.values()) == N_IMAGES and job["metrics"]["CHAIR_s"] >= 0
