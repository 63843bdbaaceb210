"""Reading changed answers (eval/changed.py): details files written as `lvlm eval compare` writes
them, from hand-written captions scored by the real CHAIR task."""

from __future__ import annotations

import json

import pytest

from lvlm_hallu.eval.changed import changed, main, render


@pytest.fixture
def compare_folder(tmp_path):
    """Four images holding a ball and a tree. `swap` trades image 2's absent car for a second ball
    (a repeat), fixes image 3's car with the tree and shortens image 4's answer to a third of it."""
    from lvlm_hallu.eval.chair import CaptionParser, GroundTruth, SynonymTable
    from lvlm_hallu.eval.compare import ChairTask

    ids = (1, 2, 3, 4)
    gt = GroundTruth({i: frozenset({"ball", "tree"}) for i in ids}, counts={i: {"ball": 1, "tree": 1} for i in ids})
    task = ChairTask({i: f"{i}.png" for i in ids}, gt,
                     CaptionParser(SynonymTable.from_lines(["ball, balls", "car, cars", "tree, trees"])))
    long = "There is a ball and a tree on the grass, and the sky above them is clear and blue today."
    answers = {"none": {1: "There is a ball and a tree.", 2: "There is a ball and a car.", 3: "There is a car.",
                        4: long},
               "swap": {1: "There is a ball and a tree.", 2: "There is a ball and a ball.", 3: "There is a tree.",
                        4: "There is a ball and a tree."}}
    for config, captions in answers.items():
        records = {str(i): {"key": str(i), "image_id": i, "answer": " " + c} for i, c in captions.items()}
        (tmp_path / f"chair_{config}_details.json").write_text(json.dumps(task.score(records)[1], default=str))
    return tmp_path


def test_changed_answers_and_which_way_each_moved(compare_folder):
    res = changed(compare_folder, "swap")
    assert res["changed"] == [2, 3, 4] and res["images"] == 4  # image 1 is the same answer
    assert res["tallies"] == {"fewer hallucinated": 2, "more hallucinated": 0, "same hallucinated": 1,
                              "more repeats": 1, "fewer repeats": 0, "shorter by over 20 %": 1,
                              "more recalled": 1, "fewer recalled": 0}
    base, swap = res["answers"][2]
    assert base.hallucinated == {"car"} and swap.hallucinated == frozenset() and swap.repeats == ("ball",)
    text = render(res, k=2)
    assert "3 of 4 answers differ from none's" in text and "image 2: present ball, tree" in text
    assert "image 4" not in text and "There is a ball and a ball." in text


def test_a_missing_configuration_names_those_there(compare_folder, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(compare_folder), "vhr"])
    assert exit_.value.code == 2 and "configurations there: none, swap" in capsys.readouterr().err


def test_a_configuration_is_found_by_its_report_name(compare_folder):
    """compare names the file after the configuration with characters outside [A-Za-z0-9_.+-]
    replaced ("vhr:tuned" -> chair_vhr_tuned_details.json); the report shows "vhr:tuned"."""
    (compare_folder / "chair_vhr_tuned_details.json").write_bytes((compare_folder / "chair_swap_details.json").read_bytes())
    assert changed(compare_folder, "vhr:tuned")["changed"] == changed(compare_folder, "swap")["changed"] == [2, 3, 4]
