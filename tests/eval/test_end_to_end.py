"""End-to-end CHAIR and POPE on the embedded shapes model over generated COCO-format data."""

import json

import pytest
from typer.testing import CliRunner

from lvlm_hallu.cli import app
from lvlm.shapes import SYNONYMS_PATH, build_split


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
    assert metrics["Recall"] >= 40  # docs/shapes-model.md reports the held-out recall; margin kept
    results = tmp_path / "chair_none.jsonl"
    assert len(results.read_text().splitlines()) == 8  # one record per image, appended as they finish


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
