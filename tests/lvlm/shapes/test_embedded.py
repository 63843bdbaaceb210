"""The embedded models by name: "shapes-detail" loads, is fingerprinted and evaluated like "shapes"."""

from __future__ import annotations

import json

import pytest

from lvlm_hallu import lvlm
from lvlm_hallu.lvlm import shapes
from lvlm_hallu.lvlm.shapes import train

TINY = ["--preset", "tiny", "--batch-size", "4", "--threads", "1", "--tokenizer-scenes", "100", "--world", "detail"]


@pytest.fixture(scope="module")
def tiny_detail(tmp_path_factory):
    run = tmp_path_factory.mktemp("detail-run")
    train.train(train.parse_args(["--out", str(run), "--steps", "1", *TINY]))
    return run / "model"


def test_a_missing_embedded_model_says_where_and_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setitem(shapes.EMBEDDED, "shapes-detail", (tmp_path, "detail"))
    with pytest.raises(FileNotFoundError, match=r"'shapes-detail' is missing at .*docs/shapes-world.md"):
        lvlm.load("shapes-detail")


def test_shapes_detail_loads_its_folder_and_evaluates_on_the_detailed_world(tiny_detail, monkeypatch):
    from lvlm_hallu.eval.context import model_folder
    from lvlm_hallu.eval.datasets import resolve_sources
    from lvlm_hallu.eval.fingerprint import checkpoint_digests, model_identity

    monkeypatch.setitem(shapes.EMBEDDED, "shapes-detail", (tiny_detail, "detail"))
    pipe = lvlm.load("shapes-detail")
    assert pipe.model.config.text_config.hidden_size == 64  # the tiny preset's folder, not the basic model
    assert model_folder("shapes-detail") == tiny_detail
    assert model_identity("shapes-detail") == {"id": "shapes-detail", "revision": None,
                                                **checkpoint_digests(tiny_detail)}
    src = resolve_sources("shapes-detail", None, None, None, None, None, world_images=20)
    instances = json.loads(src.instances.read_text())
    assert "detail-" in str(src.instances) and all("colour" in a for a in instances["annotations"])
    assert src.synonyms == shapes.SYNONYMS_PATH
    basic = resolve_sources("shapes", None, None, None, None, None, world_images=20)
    assert "detail-" not in str(basic.instances)


def test_the_server_checks_each_embedded_model_by_its_folder(tmp_path, monkeypatch):
    from lvlm_hallu.serve.cli import _model_problem

    assert _model_problem("shapes-detail") is None  # shipped in the package
    monkeypatch.setitem(shapes.EMBEDDED, "shapes-detail", (tmp_path, "detail"))
    assert "'shapes-detail' is missing at" in _model_problem("shapes-detail")


def test_tune_without_data_uses_the_val_split_of_the_models_own_world(tmp_path, monkeypatch):
    """`lvlm tune --model shapes-detail` with no data options tunes on the detailed world's val
    scenes (long descriptions), not on the basic world's one-sentence captions."""
    from typer.testing import CliRunner

    from lvlm_hallu.cli import app
    from lvlm_hallu.eval import tune as tuning

    seen = {}

    def stop(images, instances, captions, **kwargs):
        seen[kwargs.get("n")] = json.loads(instances.read_text())["info"]["description"]
        assert kwargs["synonyms"] == shapes.SYNONYMS_PATH
        raise tuning.TuneError("stop here")

    monkeypatch.setattr(tuning, "load_split", stop)
    for n, model in ((2, "shapes"), (3, "shapes-detail")):
        res = CliRunner().invoke(app, ["tune", "--model", model, "--methods", "vhr", "--val-n", "3", "-n", str(n),
                                       "--pope-n", "0", "--out", str(tmp_path / model), "--no-progress"])
        assert res.exit_code == 2 and "stop here" in res.output, res.output
    assert "(detailed), split val" in seen[3] and "detailed" not in seen[2] and "split val" in seen[2]
