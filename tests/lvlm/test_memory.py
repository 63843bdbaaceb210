"""The memory estimate (#18) against measured sizes: the weights of loaded models, the checkpoint
file, and the bytes of a real KV cache after a prefill; refusals with clear messages."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import resolve
from lvlm_hallu.lvlm import memory
from lvlm_hallu.lvlm.memory import MemoryFitError
from lvlm_hallu.lvlm.shapes import MODEL_DIR

HAS_SHAPES = (Path(MODEL_DIR) / "config.json").exists()
MODELS = ["tiny-llava", "tiny-llava-next",
          pytest.param("shapes", marks=pytest.mark.skipif(not HAS_SHAPES, reason="shapes weights missing"))]


def within(estimate: float, measured: float, tol: float = 0.10) -> bool:
    return abs(estimate - measured) <= tol * measured


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    return request.param, lvlm.load(request.param)


def test_weights_estimate_matches_the_loaded_model(loaded):
    name, pipe = loaded
    est = memory.estimate(memory.config_for(name))
    measured = memory.measured_weight_bytes(pipe.model)
    assert within(est.weight_bytes, measured), (est.weight_bytes, measured)
    assert est.parameters == sum(p.numel() for p in {id(p): p for p in pipe.model.parameters()}.values())


@pytest.mark.skipif(not HAS_SHAPES, reason="shapes weights missing")
def test_weights_estimate_matches_the_checkpoint_file():
    est = memory.estimate(memory.config_for("shapes"))
    assert within(est.weight_bytes, (Path(MODEL_DIR) / "model.safetensors").stat().st_size)


def test_half_precision_estimate_matches_a_half_load():
    pipe = lvlm.load("tiny-llava", dtype="float16")
    est16 = memory.estimate(memory.config_for("tiny-llava"), dtype=torch.float16)
    assert within(est16.weight_bytes, memory.measured_weight_bytes(pipe.model))
    assert est16.kv_bytes_per_token * 2 == memory.estimate(pipe.model.config).kv_bytes_per_token


def cache_after_prefill(pipe, interventions=None):
    reqs = [lvlm.Request("Describe this image in detail.", Image.new("RGB", (40, 30), "red"), interventions=resolve(interventions)),
            lvlm.Request("Hi", Image.new("RGB", (30, 40), "blue"), interventions=resolve(interventions))]
    plan = pipe.build_plan(reqs)
    batch = pipe.prepare(reqs + plan.twin_requests())
    plan.bind(batch)
    _, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), plan)
    return state.cache


@pytest.mark.parametrize("interventions", [None, "pai"])
def test_kv_estimate_matches_a_real_cache(loaded, interventions):
    name, pipe = loaded
    est = memory.estimate(pipe.model.config, dtype=pipe.model.dtype)
    cache = cache_after_prefill(pipe, interventions)
    rows, layers = cache.batch_size, len(cache)
    tokens = cache.length(0)
    assert all(cache.length(i) == tokens for i in range(layers))
    used = sum(t.numel() * t.element_size() for i in range(layers) for t in cache.layer_kv(i))
    assert within(est.kv_bytes_per_token * rows * tokens, used), (est.kv_bytes_per_token, used / rows / tokens)
    with_classes = interventions is not None
    allocated = sum(t.numel() * t.element_size() for i in range(layers)
                    for t in (cache._k[i], cache._v[i], cache._cls[i]) if t is not None)
    assert with_classes == all(cache.has_key_classes(i) for i in range(layers))
    assert within(est.kv_bytes(tokens, rows, key_classes=with_classes, chunk=cache.chunk), allocated)


def test_largest_batch_is_the_boundary_of_check_batch():
    est = memory.estimate(memory.config_for("tiny-llava"))
    budget = 64 * 2**20
    fits = est.largest_batch(budget, 200)
    assert fits > 0
    assert est.weight_bytes + fits * est.row_bytes(200) <= budget * (1 - memory.HEADROOM)
    assert est.weight_bytes + (fits + 1) * est.row_bytes(200) > budget * (1 - memory.HEADROOM)
    memory.check_batch(est, rows=fits, tokens=200, budget_bytes=budget)
    with pytest.raises(MemoryFitError, match=f"at most {fits} such rows"):
        memory.check_batch(est, rows=fits + 1, tokens=200, budget_bytes=budget)
    with pytest.raises(MemoryFitError, match="exceed the model context"):
        memory.check_batch(est, rows=1, tokens=est.max_context + 1, budget_bytes=budget)


def test_weights_that_cannot_fit_are_refused_before_loading(tmp_path):
    est = memory.estimate(memory.config_for("tiny-llava"))
    huge = dataclasses.replace(est, weight_bytes=1 << 60)
    with pytest.raises(MemoryFitError, match="--device-map auto"):
        memory.check_load(huge, device="cpu")
    memory.check_load(huge, device="cpu", device_map="auto", offload_folder=str(tmp_path))  # disk holds it
    with pytest.raises(MemoryFitError, match="weights need"):
        memory.check_load(est, device="cpu", device_map="auto", max_memory={"cpu": "100KB"})


@pytest.mark.skipif(not HAS_SHAPES, reason="shapes weights missing")
def test_load_refuses_a_too_small_max_memory():
    with pytest.raises(MemoryFitError, match="weights need"):
        lvlm.load("shapes", device_map="auto", max_memory={"cpu": "1MiB"})


def test_info_command_prints_the_estimate_and_refuses_a_batch_that_cannot_fit():
    from lvlm_hallu.cli import app

    res = CliRunner().invoke(app, ["info", "tiny-llava", "--json", "--tokens", "128",
                                   "--device-map", "auto", "--max-memory", "cpu=32MiB"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    est = memory.estimate(memory.config_for("tiny-llava"))
    assert out["weight_bytes"] == est.weight_bytes and out["budget_bytes"] == {"cpu": 32 * 2**20}
    assert out["largest_batch"] == est.largest_batch(32 * 2**20, 128) > 0
    assert out["kv_bytes_per_1k_tokens"] == 1000 * (est.kv_bytes_per_token + est.key_class_bytes_per_token)
    res = CliRunner().invoke(app, ["info", "tiny-llava", "--tokens", "128", "--batch", str(out["largest_batch"] + 1),
                                   "--device-map", "auto", "--max-memory", "cpu=32MiB"])
    assert res.exit_code == 2 and "lower the batch size" in res.output
