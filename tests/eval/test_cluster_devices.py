"""Ray replicas load on the GPUs they reserved (issue 36, item 1), checked without a GPU: Ray is
started with two fake GPUs, so each replica that reserves one gets its own id and
CUDA_VISIBLE_DEVICES, and `load_replica` maps "cuda" to the one GPU it sees; a replica that
reserved none refuses CUDA instead of loading on the CPU."""

from __future__ import annotations

import sys

import pytest

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Placed:
    """What a replica's model factory decided, without loading a model."""

    def __init__(self, device):
        import os

        self.device, self.visible = device, os.environ.get("CUDA_VISIBLE_DEVICES")

    def info(self):
        return {"device": self.device, "visible": self.visible}


def placed_factory(device: str, device_map=None):
    from lvlm_hallu.eval.cluster import replica_device

    return Placed(replica_device(device, device_map, ray.get_gpu_ids()))


@pytest.fixture(scope="module")
def fake_gpus():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_each_replica_loads_on_the_gpu_it_reserved(fake_gpus):
    from functools import partial

    from lvlm_hallu.eval.cluster import ClusterPool, replica_resources

    device, options = replica_resources("cuda", None, 2, ray.cluster_resources().get("GPU", 0))
    assert options == {"num_cpus": 1, "num_gpus": 1.0}
    pool = ClusterPool(partial(placed_factory, device), 2, actor_options=options)
    try:
        where = pool.where()
        infos = ray.get([a.call.remote(lambda m: m.info()) for a in pool.actors])
    finally:
        pool.shutdown()
    assert sorted(w["gpu_ids"][0] for w in where) == ["0", "1"]  # one GPU each, not the same one
    assert all(w["cuda_visible_devices"] == w["gpu_ids"][0] for w in where)
    assert all(i["device"] == "cuda:0" and i["visible"] in ("0", "1") for i in infos)


def test_a_replica_without_a_gpu_refuses_cuda(fake_gpus, tmp_path):
    from functools import partial

    from lvlm_hallu.eval.cluster import ClusterPool, ClusterStalled
    from lvlm_hallu.eval.runner import Item

    pool = ClusterPool(partial(placed_factory, "cuda"), 1, actor_options={"num_cpus": 1}, max_replacements=1)
    try:
        with pytest.raises(ClusterStalled, match="reserved no GPU"):
            pool.run([Item("a", "q")], tmp_path / "r.jsonl", progress=False)
    finally:
        pool.shutdown()


def test_asking_an_unplaceable_pool_for_its_model_fails_instead_of_waiting(fake_gpus):
    """`info()` / `call()` (the CLI's provenance, before any batch) wait for a live replica for
    `start_timeout` seconds, not forever, when the cluster cannot hold one (here: 4 of 2 GPUs)."""
    import time
    from functools import partial

    from lvlm_hallu.eval.cluster import ClusterPool, ClusterStalled

    pool = ClusterPool(partial(placed_factory, "cuda"), 1, actor_options={"num_cpus": 1, "num_gpus": 4},
                       start_timeout=2, poll=0.2)
    try:
        start = time.monotonic()
        with pytest.raises(ClusterStalled, match=r"no model replica started within 2 s.*'num_gpus': 4"):
            pool.info()
        assert time.monotonic() - start < 10
    finally:
        pool.shutdown()
