"""Cluster runner (eval/cluster.py): images travel as bytes or URIs, dead replicas lose and duplicate
nothing, finished keys are skipped, and a two-node cluster gives the local run's answers."""

from __future__ import annotations

import io
import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest

from lvlm_hallu.eval.cluster import ImageBytes, pack, read_uri, unpack
from lvlm_hallu.eval.runner import Item, local_answer

ray = pytest.importorskip("ray")
# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------------
# Fakes: a model that answers with what it was given, and one that dies on a chosen key


class EchoModel:
    """`generate` answers "prompt|WxH|r,g,b" from the image it received (or "prompt|-" without one)."""

    def __init__(self, crash_on: str | None = None, marker: str | None = None, delay: float = 0.0):
        self.crash_on, self.marker, self.delay = crash_on, marker, delay

    def info(self) -> dict:
        return {"model_id": "echo", "pid": os.getpid()}

    def generate(self, requests):
        import time

        from lvlm_hallu.lvlm.types import Result

        if self.crash_on and any(r.prompt == self.crash_on for r in requests) and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")  # once: the retried batch then succeeds
            os._exit(1)  # the replica process dies holding the batch
        time.sleep(self.delay)
        out = []
        for r in requests:
            img = r.image
            seen = "-" if img is None else f"{img.size[0]}x{img.size[1]}|{','.join(map(str, img.getpixel((0, 0))))}"
            out.append(Result(text=f"{r.prompt}|{seen}", token_ids=[], finish_reason="stop", prompt_tokens=0))
        return out


def echo_factory(**kwargs):
    return EchoModel(**kwargs)


def probe_answer(model, root: str):
    """An adapter that records what type each image had on the replica, then answers as local_answer."""
    inner = local_answer(model, max_new_tokens=4)

    def answer(batch):
        if any(isinstance(it.image, str) and it.image.startswith(root) for it in batch):
            raise AssertionError("a driver path reached the replica")
        kinds = [type(it.image).__name__ for it in batch]
        return [f"{k}:{a}" for k, a in zip(kinds, inner(batch), strict=True)]

    return answer


def write_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", (8 + i, 5), (10 * i, 100, 200 - i)).save(p)
        paths.append(p)
    return paths


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Shipping images (no Ray)


def test_pack_reads_bytes_and_unpack_opens_them(tmp_path):
    (p,) = write_images(tmp_path / "imgs", 1)
    packed = pack([Item("a", "q", str(p)), Item("b", "q")], "bytes")
    assert isinstance(packed[0].image, ImageBytes) and packed[0].image.data == p.read_bytes()
    assert packed[1].image is None
    opened = unpack(packed)
    assert isinstance(opened[0].image, io.BytesIO) and opened[0].image.read() == p.read_bytes()


def test_ship_modes(tmp_path):
    (p,) = write_images(tmp_path / "imgs", 1)
    items = [Item("a", "q", str(p)), Item("b", "q", "s3://bucket/x.png")]
    auto = pack(items, "auto")
    assert isinstance(auto[0].image, ImageBytes) and auto[1].image == "s3://bucket/x.png"  # remote: URI
    uri = pack(items[:1], "uri")
    assert uri[0].image == str(p)  # URI mode keeps the location (the user says it is shared)
    assert read_uri(f"file://{p}") == p.read_bytes()
    assert unpack([Item("c", "q", f"file://{p}")])[0].image.read() == p.read_bytes()
    with pytest.raises(KeyError):
        pack(items, "carrier-pigeon")


# ---------------------------------------------------------------------------------------------
# One node


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-cluster")
    yield
    ray.shutdown()


def test_bytes_reach_replicas_resume_and_spread(ray_local, tmp_path):
    from lvlm_hallu.eval.cluster import ClusterPool

    paths = write_images(tmp_path / "driver-only", 10)
    items = [Item(f"k{i}", f"q{i}", str(p), {"i": i}) for i, p in enumerate(paths)]
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"key": "k0", "i": 0, "answer": "from before"}) + "\n")
    pool = ClusterPool(partial(echo_factory, delay=0.2), num_actors=2)
    try:
        adapter = partial(probe_answer, root=str(tmp_path))
        records = pool.run(items, out, adapter, batch_size=2, progress=False)
        assert records["k0"]["answer"] == "from before"  # finished key skipped
        for i in range(1, 10):
            assert records[f"k{i}"]["answer"] == f"BytesIO:q{i}|{8 + i}x5|{10 * i},100,{200 - i}"
        assert sum(pool.last_run.items_per_node.values()) == 9
        assert len({w["pid"] for w in pool.where()}) == 2
        again = pool.run(items, out, adapter, batch_size=2, progress=False)  # nothing left: no call
        assert again == records and sum(pool.last_run.items_per_node.values()) == 0
    finally:
        pool.shutdown()
    recs = lines(out)
    assert [r["key"] for r in recs].count("k0") == 1 and sorted(r["key"] for r in recs) == sorted(records)


@pytest.mark.parametrize("max_restarts", [2, 0], ids=["ray-restarts-replica", "driver-requeues-batch"])
def test_replica_killed_mid_job_loses_and_duplicates_nothing(ray_local, tmp_path, max_restarts):
    from lvlm_hallu.eval.cluster import ClusterPool

    n = 12
    items = [Item(f"k{i}", f"q{i}", None, {"i": i}) for i in range(n)]
    out = tmp_path / "r.jsonl"
    factory = partial(echo_factory, crash_on="q5", marker=str(tmp_path / "crashed"), delay=0.1)
    pool = ClusterPool(factory, num_actors=2, max_restarts=max_restarts, max_task_retries=max_restarts)
    try:
        records = pool.run(items, out, batch_size=2, progress=False)
        stats = pool.last_run
    finally:
        pool.shutdown()
    assert (tmp_path / "crashed").exists()  # a replica really died holding k5's batch
    assert {k: r["answer"] for k, r in records.items()} == {f"k{i}": f"q{i}|-" for i in range(n)}
    keys = [r["key"] for r in lines(out)]
    assert sorted(keys) == sorted(f"k{i}" for i in range(n)) and len(keys) == n  # 0 lost, 0 duplicated
    if max_restarts == 0:  # Ray gave up on the replica: the driver re-ran the batch on another one
        # k5's batch and the one queued behind it on the dead replica (2 slots per replica)
        assert stats.requeued_batches in (1, 2) and stats.replaced_actors == 1
    else:  # Ray restarted the replica and retried the call itself
        assert stats.requeued_batches == 0


def test_named_replicas_and_the_per_batch_hook_through_a_kill(ray_local, tmp_path):
    """`on_batch` sees every record on disk after each batch (resumed keys included); a named replica
    killed for good from the hook has its batches re-queued and a replacement named next in line."""
    from lvlm_hallu.eval.cluster import ClusterPool

    n = 10
    items = [Item(f"k{i}", f"q{i}", None, {"i": i}) for i in range(n)]
    out = tmp_path / "r.jsonl"
    seen: list[tuple[int, int]] = []  # (records on disk, requeued batches so far)

    def hook(records, stats):
        seen.append((len(records), stats.requeued_batches))
        if len(seen) == 2:  # the first batch of this run is on disk: replica 0 still holds work
            ray.kill(ray.get_actor("hook-rep-0", namespace="test-cluster"), no_restart=True)

    pool = ClusterPool(partial(echo_factory, delay=0.2), num_actors=2, name="hook-rep")
    try:
        pool.run(items[:2], out, batch_size=2, progress=False)  # a finished batch to resume from
        records = pool.run(items, out, batch_size=2, progress=False, on_batch=hook)
        stats = pool.last_run
        assert ray.get_actor("hook-rep-2", namespace="test-cluster") in pool.actors  # the replacement
    finally:
        pool.shutdown()
    counts = [c for c, _ in seen]
    assert counts[0] == 2 and counts[-1] == n and counts == sorted(counts) and len(counts) == 1 + (n - 2) // 2
    assert stats.replaced_actors == 1 and stats.requeued_batches in (1, 2) and seen[-1][1] == stats.requeued_batches
    keys = [r["key"] for r in lines(out)]
    assert sorted(keys) == sorted(f"k{i}" for i in range(n)) and len(keys) == n  # 0 lost, 0 duplicated
    assert {k: r["answer"] for k, r in records.items()} == {f"k{i}": f"q{i}|-" for i in range(n)}


def test_model_error_is_raised_and_finished_batches_stay(ray_local, tmp_path):
    from lvlm_hallu.eval.cluster import ClusterPool

    items = [Item(f"k{i}", f"q{i}", "/definitely/not/here.png" if i == 3 else None) for i in range(6)]
    pool = ClusterPool(echo_factory, num_actors=1, ship="uri")  # the replica fails to open k3's image
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="here.png"):
            pool.run(items, tmp_path / "r.jsonl", batch_size=1, progress=False)
    finally:
        pool.shutdown()
    assert [r["key"] for r in lines(tmp_path / "r.jsonl")] == ["k0", "k1", "k2"]


def test_bad_pool_arguments(ray_local):
    from lvlm_hallu.eval.cluster import ClusterPool

    with pytest.raises(ValueError, match="ship mode"):
        ClusterPool(echo_factory, ship="carrier-pigeon")
    with pytest.raises(ValueError, match="num_actors"):
        ClusterPool(echo_factory, num_actors=0)


def test_resume_checks_the_run_fingerprint(ray_local, tmp_path):
    from lvlm_hallu.eval.cluster import ClusterPool
    from lvlm_hallu.eval.fingerprint import Fingerprint, FingerprintMismatch

    items = [Item(f"k{i}", f"q{i}") for i in range(4)]
    out = tmp_path / "r.jsonl"
    fp = Fingerprint.of(model={"id": "echo"}, prompt="q", decoding={"max_new_tokens": 4})
    pool = ClusterPool(echo_factory, num_actors=1)
    try:
        pool.run(items[:2], out, batch_size=2, progress=False, fingerprint=fp)
        with pytest.raises(FingerprintMismatch, match="decoding.max_new_tokens"):
            pool.run(items, out, batch_size=2, progress=False, fingerprint=fp.extend(decoding={"max_new_tokens": 8}))
        assert sum(pool.last_run.items_per_node.values()) == 0  # refused before any batch went out
        records = pool.run(items, out, batch_size=2, progress=False, fingerprint=fp)  # same run: resumes
        assert sum(pool.last_run.items_per_node.values()) == 2
    finally:
        pool.shutdown()
    rows = lines(out)
    assert rows[0]["digest"] == fp.digest and [r["key"] for r in rows[1:]] == ["k0", "k1", "k2", "k3"]
    assert {k: r["answer"] for k, r in records.items()} == {f"k{i}": f"q{i}|-" for i in range(4)}


class TunedModel(EchoModel):
    """An EchoModel with the facts and profile model-aware intervention values come from."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.facts = SimpleNamespace(hidden_size=192, num_layers=6)

    def profile(self):
        return {"model_id": "echo", "tuned": {"vhr": {"params": {"alpha": 2.5, "layers": [1, 2]}}}, "pid": os.getpid()}


def test_replica_context_gives_the_tuned_values_the_replica_runs(ray_local):
    """`lvlm eval ... --ray-actors N` fingerprints the values the replicas run (eval.runner.intervention_values)."""
    from lvlm_hallu.eval.cluster import ClusterPool
    from lvlm_hallu.eval.errors import EvalError
    from lvlm_hallu.eval.runner import intervention_values, model_context
    from lvlm_hallu.interventions import resolve

    pool = ClusterPool(TunedModel, num_actors=1)
    try:
        facts, profile = pool.call(model_context)
    finally:
        pool.shutdown()
    assert profile["pid"] != os.getpid() and facts.num_layers == 6  # computed on the replica
    (vhr,) = intervention_values(lambda spec: tuple(resolve(spec)), (facts, profile))("vhr:tuned")
    assert (vhr["alpha"], list(vhr["layers"]), vhr["sources"]["alpha"]) == (2.5, [1, 2], "tuned")
    with pytest.raises(EvalError, match="pai: no tuned values for echo"):
        intervention_values(lambda spec: tuple(resolve(spec)), (facts, profile))("pai:tuned")
