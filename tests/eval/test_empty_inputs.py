"""Empty inputs are errors, exit 2, before any model loads (issue 36, item 6): an empty captions
file scored CHAIR 0.0 with exit 0; an empty image list, question file or ground-truth mapping, or
-n 0, would likewise score nothing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.fixture
def cli(monkeypatch, tmp_path):
    from lvlm_hallu.eval import cli

    def no_model(name, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "_load_model", no_model)
    monkeypatch.setattr(cli, "RUNS", tmp_path / "runs")
    return cli


def _fails(cli, args, needle):
    res = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and needle in res.output, res.output


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_score_chair_refuses_an_empty_captions_file(cli, tiny_coco, tmp_path, content):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(content)
    _fails(cli, ["score-chair", captions, "--gt", tiny_coco.instances], "no captions to score")
    assert not (tmp_path / "captions_chair.json").exists()


def test_an_empty_ground_truth_mapping_is_refused(cli, tmp_path):
    captions, gt = tmp_path / "c.jsonl", tmp_path / "gt.json"
    captions.write_text('{"image_id": 1, "caption": "A dog."}\n')
    gt.write_text("{}")
    _fails(cli, ["score-chair", captions, "--gt-json", gt], "the ground-truth mapping is empty")


def test_an_empty_image_list_is_refused(cli, tiny_coco, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("\n")
    _fails(cli, ["chair", "--model", "fake/a", "--images", tiny_coco.images, "--annotations", tiny_coco.root,
                 "--image-list", ids], "no image ids")


@pytest.mark.parametrize("command", ["chair", "pope"])
def test_n_zero_is_refused(cli, tiny_coco, command):
    _fails(cli, [command, "--model", "fake/a", "--images", tiny_coco.images, "--annotations", tiny_coco.root,
                 "-n", "0"], "-n")


def test_an_empty_pope_question_file_is_refused(cli, tiny_coco, tmp_path):
    questions = tmp_path / "coco_pope_random.json"
    questions.write_text("")
    _fails(cli, ["pope", "--model", "fake/a", "--images", tiny_coco.images, "--questions", questions],
           "no questions")
