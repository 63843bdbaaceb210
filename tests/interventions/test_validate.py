"""interventions/validate.py against a real model: what it accepts runs in the engine, what it
refuses is exactly what the engine cannot run (layer L, sink dimension E), and non-finite or
huge parameters never reach the engine. Layer counts come from the loaded model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import InterventionError, resolve
from lvlm_hallu.interventions.validate import MAX_VALUE, validate

IMG = Image.new("RGB", (32, 32), "red")


@pytest.fixture(scope="module")
def pipe():
    return lvlm.load("tiny-llava")


def specs_at(L: int, E: int, edge: int) -> dict[str, list[dict]]:
    """One spec per model-dependent parameter, set to `edge` layers/dims past the last valid one."""
    last_layer, last_dim = L - 1 + edge, E - 1 + edge
    return {
        "vhr.layers": [{"name": "vhr", "layers": [last_layer]}],
        "var.sink_dims": [{"name": "var", "sink_dims": [last_dim]}],
        "pai.start_layer": [{"name": "pai", "start_layer": last_layer}],
        "vte.exit_layer": [{"name": "vte", "exit_layer": last_layer + 1}],  # k = L: never exit (docs/methods.md, neutral settings)
        "vte.min_layer": [{"name": "vte", "policy": "dynamic", "min_layer": last_layer}],
        "carve.layers": [{"name": "carve", "layers": [last_layer], "max_steps": 2}],
    }


def test_the_last_valid_index_is_accepted_and_runs(pipe):
    facts = pipe.facts
    for key, spec in specs_at(facts.num_layers, facts.hidden_size, edge=0).items():
        configs = resolve(spec)
        validate(configs, facts)
        (result,) = pipe.generate([lvlm.Request("Describe it.", IMG, max_new_tokens=2, interventions=configs)])
        assert result.completion_tokens >= 1, key


def test_one_past_the_end_is_refused_and_the_engine_could_not_run_it(pipe):
    facts = pipe.facts
    for key, spec in specs_at(facts.num_layers, facts.hidden_size, edge=1).items():
        configs = resolve(spec)  # type-valid: only the model makes it wrong
        with pytest.raises(InterventionError) as info:
            validate(configs, facts)
        assert info.value.param == f"interventions.{key}", (key, info.value.param)
        with pytest.raises(Exception):  # what the service used to answer with a 500
            pipe.generate([lvlm.Request("Describe it.", IMG, max_new_tokens=2, interventions=configs)])


@pytest.mark.parametrize("spec, param", [
    ({"name": "pai", "alpha": float("nan")}, "interventions.pai"),
    ({"name": "pai", "alpha": float("inf")}, "interventions.pai.alpha"),
    ({"name": "pai", "alpha": 1e308}, "interventions.pai.alpha"),
    ({"name": "vhr", "alpha": 1e308}, "interventions.vhr.alpha"),
    ({"name": "var", "tau": float("inf")}, "interventions.var.tau"),
    ({"name": "carve", "lam": float("nan")}, "interventions.carve"),
    # integers too large for a float (JSON allows them): refused, not an OverflowError (a 500)
    ({"name": "vhr", "alpha": 10**400}, "interventions.vhr.alpha"),
    ({"name": "pai", "gamma": 10**400}, "interventions.pai.gamma"),
    ({"name": "vhr", "layers": [10**400]}, "interventions.vhr.layers"),
    ({"name": "vte", "exit_layer": 10**400}, "interventions.vte.exit_layer"),
])
def test_non_finite_and_huge_values_are_refused(pipe, spec, param):
    with pytest.raises(InterventionError) as info:
        validate(resolve([spec]), pipe.facts)
    assert info.value.param.startswith(param)


@pytest.mark.parametrize("spec, param", [
    ({"name": "vhr", "layers": [True, 1.9]}, "interventions.vhr.layers"),  # used to run as layers (1, 1)
    ({"name": "vhr", "layers": [1, 2.0]}, "interventions.vhr.layers"),
    ({"name": "vhr", "layers": 1}, "interventions.vhr.layers"),
    ({"name": "carve", "layers": [False]}, "interventions.carve.layers"),
    ({"name": "var", "sink_dims": [2.7]}, "interventions.var.sink_dims"),
    ({"name": "var", "sink_dims": "12"}, "interventions.var.sink_dims"),
])
def test_index_lists_are_integers_not_truncated(spec, param):
    with pytest.raises(InterventionError, match="must be a list of integers") as info:
        resolve([spec])
    assert info.value.param == param


def test_integer_index_lists_are_kept(pipe):
    import numpy as np

    (vhr,) = resolve([{"name": "vhr", "layers": [np.int64(1), 2]}])
    (var,) = resolve([{"name": "var", "sink_dims": range(2, 4)}])
    assert vhr.layers == (1, 2) and type(vhr.layers[0]) is int and var.sink_dims == (2, 3)


def test_the_caps_are_far_above_the_papers_settings_and_run(pipe):
    # PAI at its cap still gives finite logits on the tiny model (fp32): the cap guards overflow
    configs = resolve([{"name": "pai", "alpha": MAX_VALUE[("pai", "alpha")]}])
    validate(configs, pipe.facts)
    (result,) = pipe.generate([lvlm.Request("Describe it.", IMG, max_new_tokens=2, interventions=configs)])
    assert result.completion_tokens >= 1
    assert all(v >= 10 for v in MAX_VALUE.values() if v != MAX_VALUE[("carve", "lam")])


def test_router_names_come_from_the_operator_directory(tmp_path, monkeypatch, pipe):
    from lvlm_hallu.interventions.vte import router_names

    monkeypatch.delenv("LVLM_ROUTER_DIR", raising=False)
    with pytest.raises(InterventionError, match="no router named 'r1'.*none"):
        validate(resolve([{"name": "vte", "policy": "router", "router": "r1"}]), pipe.facts)
    monkeypatch.setenv("LVLM_ROUTER_DIR", str(tmp_path))
    E = pipe.facts.hidden_size
    torch.save({"w1": torch.zeros(2, 2 * E), "b1": torch.zeros(2), "w2": torch.zeros(1, 2), "b2": torch.zeros(1)},
               tmp_path / "r1.pt")
    (tmp_path / "notes.txt").write_text("not a router")
    assert router_names() == ["r1"]
    validate(resolve([{"name": "vte", "policy": "router", "router": "r1"}]), pipe.facts)
    with pytest.raises(InterventionError, match="available: r1"):
        validate(resolve([{"name": "vte", "policy": "router", "router": "r2"}]), pipe.facts)
    for bad in ("../r1", "/tmp/r1", "r1.pt", "a/b", ""):
        with pytest.raises(InterventionError):
            resolve([{"name": "vte", "policy": "router", "router": bad}])
