"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): the shapes model answers the same as
a local run, both nodes answer, and the replicas only ever see image bytes, never the driver's path."""

from __future__ import annotations

import json
import sys
from functools import partial

import pytest

from eval.runner import Item, local_answer, run

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_IMAGES = 6
MAX_NEW_TOKENS = 10


def load_shapes():
    import lvlm

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
    from eval.cluster import ClusterPool
    from lvlm.shapes import build_split

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
