"""End-to-end CHAIR and POPE on the embedded shapes model over generated COCO-format data."""

import json

import pytest
from typer.testing import CliRunner

from lvlm_hallu.cli import app
from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH, build_split


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-world")
    instances, captions = build_split(root, "test", 40)
    return ["--images", str(root / "images"), "--instances", str(instances), "--captions", str(captions),
            "--synonyms", str(SYNONYMS_PATH), "--model", "shapes", "--no-progress"]


def report(out, benchmark):
    data = json.loads((out / f"{benchmark}_report.json").read_text())
    assert data["provenance"]["model_id"] == "shapes"
    return {r["name"]: r["metrics"] for r in data["results"]}


def test_chair_end_to_end(world, tmp_path):
    res = CliRunner().invoke(app, ["eval", "chair", *world, "-n", "8", "--max-new-tokens", "48", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (metrics,) = report(tmp_path, "chair").values()
    assert 0 <= metrics["CHAIR_s"] <= 100 and 0 <= metrics["CHAIR_i"] <= 100
    assert metrics["Recall"] >= 25  # 54 on 500 held-out images (docs/shapes-model.md); 8 images vary widely
    lines = (tmp_path / "chair_none.jsonl").read_text().splitlines()
    assert "fingerprint" in json.loads(lines[0])  # the header: the run's fingerprint
    assert len(lines) == 1 + 8  # then one record per image, appended as they finish


def test_pope_end_to_end_with_interventions(world, tmp_path):
    res = CliRunner().invoke(app, ["eval", "compare", "--benchmark", "pope", "--interventions", "none,vhr", *world,
                                   "-n", "6", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    results = report(tmp_path, "pope")
    assert set(results) == {"none", "vhr"}
    for metrics in results.values():
        for split in ("random", "popular", "adversarial"):
            assert 50 <= metrics[f"{split} Acc"] <= 100  # better than chance on its own world
        assert 0 < metrics["POPE (mean F1)"] <= 100
    assert (tmp_path / "pope_report.png").read_bytes()[:4] == b"\x89PNG"


def test_zero_setup_compare_on_the_embedded_model(tmp_path, monkeypatch):
    """`lvlm eval compare --model shapes --interventions none,vhr` with no other argument (fresh clone)."""
    import re

    from transformers import AutoConfig

    from lvlm_hallu.eval.world import DEFAULT_N, WORLD_IMAGES
    from lvlm_hallu.lvlm.shapes import MODEL_DIR

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["eval", "compare", "--model", "shapes", "--interventions", "none,vhr"])
    assert res.exit_code == 0, res.output
    (folder,) = (tmp_path / "runs" / "eval").iterdir()
    assert re.fullmatch(r"chair-shapes-[0-9a-f]{12}", folder.name)
    data = json.loads((folder / "chair_report.json").read_text())
    p = data["provenance"]
    assert p["extra"]["dataset"]["generated"] == "shapes world, test split"
    assert p["extra"]["dataset"]["images"] == WORLD_IMAGES and p["n_images"] == DEFAULT_N
    assert p["options"]["synonyms"] == str(SYNONYMS_PATH)
    # 512 new tokens do not fit the embedded model's context: lowered before loading, with a warning
    context = AutoConfig.from_pretrained(MODEL_DIR).text_config.max_position_embeddings
    assert 0 < p["decoding"]["max_new_tokens"] < context and "clamped to" in res.output
    assert folder.name.endswith(p["fingerprint"]["digest"][:12])
    none, vhr = data["results"]
    assert (none["name"], vhr["name"]) == ("none", "vhr") and none["intervals"] is None
    assert set(vhr["intervals"]) == {"CHAIR_s", "CHAIR_i", "Recall", "Len", "Halluc/cap", "CHAIR_i distinct",
                                     "Repeat %", "Overcount %", "Halluc or repeat %", "Words"}  # caption metrics
    for m, iv in vhr["intervals"].items():
        assert iv["low"] <= iv["diff"] <= iv["high"]
        assert iv["diff"] == pytest.approx(vhr["metrics"][m] - none["metrics"][m])
    assert none["metrics"]["Recall"] >= 40
