"""Tuning provenance (issue 36, item 5): the test-split guard reads the scenes' ids and file names,
not a description; `improves` is computed for every method; each tuned entry records its command."""

from __future__ import annotations

import json

import pytest

from lvlm_hallu.eval.tune import Constraints, Shape, TuneError, build_spaces, held_out_reason, load_split, search
from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

SHAPE = Shape(num_layers=8, hidden_size=256, tau=5.0, sink_dims=(7,))


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    from lvlm_hallu.lvlm.shapes.world import build_split

    root = tmp_path_factory.mktemp("shapes")
    instances, _ = build_split(root, "test", 6)
    return root, instances


def test_a_renamed_test_split_with_a_rewritten_description_is_still_refused(test_split, tmp_path):
    """The confirmed bypass: the guard read one file's info.description."""
    root, instances = test_split
    disguised = json.loads(instances.read_text())
    disguised["info"]["description"] = disguised["info"]["description"].replace("split test", "split val")
    renamed = tmp_path / "instances_val.json"
    renamed.write_text(json.dumps(disguised))
    with pytest.raises(TuneError, match=r"is a test split \(6 of 6 images have shapes test ids \(first 3000001\)\)"):
        load_split(root / "images", renamed, None, synonyms=SYNONYMS_PATH, n=4, pope_n=0)
    split = load_split(root / "images", renamed, None, synonyms=SYNONYMS_PATH, n=4, pope_n=0, allow_test_split=True)
    assert len(split.chair.items()) == 4


def test_held_out_reasons():
    val = {"images": [{"id": 2_000_001, "file_name": "val_2000001.png"}], "info": {"description": "x, split val"}}
    assert held_out_reason(val) == ""
    coco_val = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}]}
    assert held_out_reason(coco_val) == ""
    coco_test = {"images": [{"id": 42, "file_name": "COCO_test2014_000000000042.jpg"}]}
    assert held_out_reason(coco_test) == "1 of 1 images are test files (first COCO_test2014_000000000042.jpg)"
    renamed_ids = {"images": [{"id": 2_000_001, "file_name": "a.png"}, {"id": 3_000_005, "file_name": "b.png"}]}
    assert held_out_reason(renamed_ids).startswith("1 of 2 images have shapes test ids")
    described = {"images": [{"id": 2_000_001, "file_name": "x.png"}], "info": {"description": "shapes, split test"}}
    assert held_out_reason(described) == "described as 'shapes, split test'"


def test_improves_is_computed_for_vte_too():
    """VTE's exit is chosen for the compute it saves; `improves` used to be forced true for it."""

    def evaluate(method, params):
        m = {"CHAIR_s": 40.0, "CHAIR_i": 20.0, "Recall": 60.0, "F1": 80.0, "Len": 9.0}
        if method == "vte":  # an earlier exit: a little worse on the objective, no recall lost
            m["CHAIR_s"] += 0.5
        return m

    entries = search(build_spaces(["vte"], SHAPE, "small"), evaluate, SHAPE, constraints=Constraints(),
                     progress=False)
    assert entries["vte"]["params"] is not None and entries["vte"]["improves"] is False
    assert entries["vte"]["objective"] > entries["vte"]["baseline_objective"]


def test_each_entry_records_the_command_that_chose_it(tmp_path, monkeypatch):
    from lvlm_hallu.eval import tune as tuning

    seen = {}

    def fake_tune(pipe, spaces, evaluate, out, **kwargs):
        seen["command"] = kwargs["command"]
        raise TuneError("stop here")

    monkeypatch.setattr(tuning, "tune", fake_tune)
    monkeypatch.setattr(tuning, "SplitEvaluator", lambda *a, **k: None)
    from typer.testing import CliRunner

    from lvlm_hallu.cli import app

    res = CliRunner().invoke(app, ["tune", "--model", "shapes", "--methods", "vhr", "--val-n", "4", "-n", "2",
                                   "--pope-n", "0", "--space", "vhr.alpha=2", "--out", str(tmp_path / "t"),
                                   "--no-progress"])
    assert res.exit_code == 2 and "stop here" in res.output, res.output
    assert seen["command"] == (f"lvlm tune --methods vhr -n 2 --pope-n 0 --space vhr.alpha=2 --val-n 4 "
                               f"--out {tmp_path / 't'}")


def test_tune_batch_size_is_a_number_or_auto(tmp_path):
    from typer.testing import CliRunner

    from lvlm_hallu.cli import app

    res = CliRunner().invoke(app, ["tune", "--model", "shapes", "--methods", "vhr", "--val-n", "4", "-n", "2",
                                   "--pope-n", "0", "--batch-size", "lots", "--out", str(tmp_path / "t"), "--no-progress"])
    assert res.exit_code == 2 and "--batch-size must be a positive integer or auto, got 'lots'" in res.output


def test_tune_batch_size_auto_comes_from_the_memory_estimate(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lvlm_hallu.cli import app
    from lvlm_hallu.eval import tune as tuning
    from lvlm_hallu.eval.context import AUTO_CAP

    seen = {}

    def fake_tune(*args, **kwargs):
        raise TuneError("stop here")

    monkeypatch.setattr(tuning, "tune", fake_tune)
    monkeypatch.setattr(tuning, "SplitEvaluator", lambda *a, **k: seen.update(k))
    res = CliRunner().invoke(app, ["tune", "--model", "shapes", "--methods", "vhr", "--val-n", "4", "-n", "2",
                                   "--pope-n", "0", "--batch-size", "auto", "--out", str(tmp_path / "t"),
                                   "--no-progress"])
    assert res.exit_code == 2 and "stop here" in res.output, res.output
    assert "--batch-size auto: " in res.output and 1 <= seen["batch_size"] <= AUTO_CAP



SHIPPED_MODELS = ("shapes", "shapes-detail")


def _shipped(model):
    from lvlm_hallu.lvlm.profile import _shipped_paths

    return json.loads(_shipped_paths()[model][0].read_text())


@pytest.mark.parametrize("model", SHIPPED_MODELS)
def test_the_shipped_file_is_for_the_shipped_weights(model):
    from lvlm_hallu.lvlm.profile import _shipped_paths, shipped_models, weights_digest
    from lvlm_hallu.lvlm.shapes import embedded_dir

    data = _shipped(model)
    assert model in shipped_models() and data["model_id"] == model
    assert _shipped_paths()[model][1] == embedded_dir(model) / "model.safetensors"  # the weights that load
    assert data["weights_sha256"] == weights_digest(embedded_dir(model) / "model.safetensors")  # else it is ignored
    assert set(data["methods"]) == {"vhr", "pai", "var", "vte"}


@pytest.mark.parametrize("model,method", [(model, m) for model in SHIPPED_MODELS for m in ("vhr", "pai", "var", "vte")])
def test_each_shipped_entry_is_its_own_recorded_run_on_the_one_split(model, method):
    """The shipped tuned.json mixed four runs with different settings, carried commands written in
    by hand (`command_source`), and a VHR value chosen on used held-out data. Each entry is now
    written by its own `lvlm tune --methods M ... --ship` run (its command recorded by the code),
    every one on VHR's validation split and settings, and its choice and `improves` recompute
    from its table."""
    from lvlm_hallu.eval.tune import judge, objective, select

    entries = _shipped(model)["methods"]
    entry = entries[method]
    assert entry["eval"] == entries["vhr"]["eval"]  # one split, one setting
    command = entry["command"]
    assert command.startswith("lvlm tune ") and f" --methods {method} " in command and " --ship" in command
    assert not {"command_source", "selection"} & set(entry)  # nothing added by hand
    constraints = Constraints(**entry["constraints"])
    for row in entry["table"]:  # feasibility as the recorded constraints judge it
        assert judge(method, row["metrics"], entry["baseline"], constraints) == (row["feasible"], row["violation"])
    chosen = select(method, entry["table"])
    assert entry["params"] == (chosen["params"] if chosen else None)
    beats = chosen is not None and objective(chosen["metrics"], constraints) < objective(entry["baseline"], constraints)
    assert entry["improves"] is beats  # computed, never forced
