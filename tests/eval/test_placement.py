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
    tokens = 200  # within the shapes model's 256-token context
    budget = int((est.weight_bytes + 5.5 * est.row_bytes(tokens)) / (1 - memory.HEADROOM))
    rows, how = auto_batch_size("shapes", Placement(), tokens, budget_bytes=budget)
    assert rows == 5 == est.largest_batch(budget, tokens) and "5 rows of 200 tokens" in how
    # without a measured prompt the whole context is assumed: fewer rows
    assert auto_batch_size("shapes", Placement(), None, budget_bytes=budget)[0] == est.largest_batch(budget, 256)
    # bfloat16 halves weights and cache: more rows in the same budget
    assert auto_batch_size("shapes", Placement("cpu", "bfloat16"), tokens, budget_bytes=budget)[0] > rows
    assert auto_batch_size("shapes", Placement(), tokens, budget_bytes=10**12)[0] == AUTO_CAP
    with pytest.raises(EvalError, match="leaves no room for one row of 200 tokens"):
        auto_batch_size("shapes", Placement(), 200, budget_bytes=est.weight_bytes)


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


# ---------------------------------------------------------------------------------------------
# Through the CLI


def _world(tmp_path_factory):
    from lvlm_hallu.lvlm.shapes import build_split

    root = tmp_path_factory.mktemp("world")
    build_split(root, "test", 4)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory)


def _chair(world, tmp_path, *extra):
    from typer.testing import CliRunner

    from lvlm_hallu.eval import cli
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

    args = ["chair", "--model", "tiny-llava", "--images", str(world / "images"), "--annotations", str(world),
            "--synonyms", str(SYNONYMS_PATH), "-n", "2", "--max-new-tokens", "4", "--no-progress",
            "--out", str(tmp_path / "out"), *extra]
    return CliRunner().invoke(cli.app, args)


def test_eval_records_device_and_dtype_in_report_and_fingerprint(world, tmp_path):
    """Must show: `lvlm eval chair --model tiny-llava --device cpu --dtype bfloat16` records both."""
    import json

    res = _chair(world, tmp_path, "--device", "cpu", "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "chair_report.json").read_text())
    prov = report["provenance"]
    assert prov["dtype"] == "bfloat16" and prov["extra"]["device"] == "cpu"  # as the loaded model reports them
    assert prov["extra"]["placement"] == {"device": "cpu", "dtype": "bfloat16", "device_map": None}
    header = json.loads((tmp_path / "out" / "chair_none.jsonl").read_text().splitlines()[0])
    assert header["fingerprint"]["placement"] == {"device": "cpu", "dtype": "bfloat16", "device_map": None}
    assert prov["fingerprint"]["fields"]["placement"] == header["fingerprint"]["placement"]
    again = _chair(world, tmp_path, "--device", "cpu", "--dtype", "float32")  # another dtype: another run
    assert again.exit_code == 2 and 'placement.dtype: "bfloat16" != "float32"' in again.output


def test_batch_size_auto_and_refused_placements(world, tmp_path, monkeypatch):
    import json

    import torch

    res = _chair(world, tmp_path, "--batch-size", "auto")
    assert res.exit_code == 0 and "--batch-size auto: " in res.output, res.output
    report = json.loads((tmp_path / "out" / "chair_report.json").read_text())
    assert 1 <= report["provenance"]["extra"]["batch_size"] <= 64
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for extra, needle in ((["--device", "cuda"], "torch sees no GPU"), (["--dtype", "int3"], "--dtype: unknown dtype"),
                          (["--batch-size", "0"], "positive integer or auto"),
                          (["--server", "http://127.0.0.1:9", "--device", "cuda"], "places its own")):
        res = _chair(world, tmp_path / "refused", *extra)
        assert res.exit_code == 2 and needle in res.output, (extra, res.output)



def test_tune_refuses_a_bad_placement_before_loading(tmp_path):
    """`lvlm tune --device-map` reaches lvlm.load through the same Placement (an unknown map is
    refused with the loader's message, exit 2, before any model loads)."""
    from typer.testing import CliRunner

    from lvlm_hallu.cli import app

    res = CliRunner().invoke(app, ["tune", "--model", "shapes", "--methods", "vhr", "--device-map", "everywhere",
                                   "--out", str(tmp_path / "tune"), "--val-n", "4", "-n", "2", "--pope-n", "0"])
    assert res.exit_code == 2 and "everywhere" in res.output, res.output
