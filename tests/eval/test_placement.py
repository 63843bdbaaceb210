"""Devices for evaluation (issue 36, item 1): the placement a local model or a Ray replica loads
with, what reports and fingerprints record of it, and --batch-size auto from the memory estimate.
The GPU path's placement logic is checked without a GPU (tests/eval/test_cluster_devices.py runs
it in Ray actors that reserved fake GPUs)."""

from __future__ import annotations

import pytest

from lvlm_hallu.eval.cluster import replica_device, replica_resources
from lvlm_hallu.eval.context import AUTO_CAP, Placement, auto_batch_size
from lvlm_hallu.eval.errors import EvalError


def test_placement_load_kwargs_and_recorded_fields():
    assert Placement().load_kwargs() == {}  # lvlm.load's own defaults: nothing to pass
    assert Placement().fields() == {"device": "cpu", "dtype": "float32", "device_map": None}
    bf16 = Placement("cpu", "bfloat16")
    assert bf16.load_kwargs() == {"dtype": "bfloat16"} and bf16.fields()["dtype"] == "bfloat16"
    cuda = Placement("cuda:1")
    assert cuda.load_kwargs() == {"device": "cuda:1"}
    assert cuda.fields() == {"device": "cuda:1", "dtype": "float16", "device_map": None}  # the loader's default
    mapped = Placement("cpu", None, {"": 0})
    assert mapped.load_kwargs() == {"device_map": {"": 0}}
    assert mapped.fields() == {"device": "cuda:0", "dtype": "float16", "device_map": {"": 0}}
    with pytest.raises(EvalError, match="--dtype: unknown dtype 'int3'"):
        Placement("cpu", "int3").fields()


def test_auto_batch_size_follows_the_memory_estimate():
    from lvlm_hallu.lvlm import memory

    est = memory.estimate(memory.config_for("shapes"))
    tokens = 300
    budget = int((est.weight_bytes + 5.5 * est.row_bytes(tokens)) / (1 - memory.HEADROOM))
    rows, how = auto_batch_size("shapes", Placement(), tokens, budget_bytes=budget)
    assert rows == 5 == est.largest_batch(budget, tokens) and "5 rows of 300 tokens" in how
    # bfloat16 halves weights and cache: more rows in the same budget
    assert auto_batch_size("shapes", Placement("cpu", "bfloat16"), tokens, budget_bytes=budget)[0] > rows
    assert auto_batch_size("shapes", Placement(), tokens, budget_bytes=10**12)[0] == AUTO_CAP
    with pytest.raises(EvalError, match="leaves no room for one row of 300 tokens"):
        auto_batch_size("shapes", Placement(), tokens, budget_bytes=est.weight_bytes)


def test_replica_resources_reserve_gpus_only_for_gpu_placements():
    assert replica_resources("cpu", None, 4, 8) == ("cpu", {"num_cpus": 1})  # no GPU held for a CPU model
    assert replica_resources("cuda", None, 4, 8) == ("cuda", {"num_cpus": 1, "num_gpus": 1.0})
    assert replica_resources("cuda", None, 4, 2) == ("cuda", {"num_cpus": 1, "num_gpus": 0.5})  # shared
    assert replica_resources("auto", None, 2, 2) == ("cuda", {"num_cpus": 1, "num_gpus": 1.0})
    assert replica_resources("auto", None, 2, 0) == ("cpu", {"num_cpus": 1})
    assert replica_resources("cpu", "auto", 2, 2)[1] == {"num_cpus": 1, "num_gpus": 1.0}
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        replica_resources("cuda", None, 2, 0)


def test_replica_device_is_the_first_gpu_the_actor_sees():
    # Ray sets CUDA_VISIBLE_DEVICES to the reserved GPUs: inside the actor they are cuda:0, cuda:1, ...
    assert replica_device("cuda", None, ["3"]) == "cuda:0"
    assert replica_device("cuda:2", None, ["2"]) == "cuda:0"
    assert replica_device("cpu", None, []) == "cpu" and replica_device("cpu", None, ["0"]) == "cpu"
    assert replica_device("cuda", "auto", ["0", "1"]) is None  # the map decides, over the visible GPUs
    with pytest.raises(RuntimeError, match="reserved no GPU"):
        replica_device("cuda", None, [])
    with pytest.raises(RuntimeError, match="reserved no GPU"):
        replica_device("cpu", "auto", [])
