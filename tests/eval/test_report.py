"""Reports and comparisons: JSON with provenance, Markdown, PNG, atomic writes; the CLI on tiny data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from lvlm_hallu.eval.compare import ChairTask, PopeTask, answer_executor, compare, config_name
from lvlm_hallu.eval.pope import PopeQuestion
from lvlm_hallu.eval.report import ConfigResult, Provenance, Report, atomic_write_text, write_report
from lvlm_hallu.eval.runner import local_answer, split_spec
from lvlm_hallu.lvlm.types import Result

PROVENANCE_FIELDS = {
    "benchmark",
    "model_id",
    "model_revision",
    "dtype",
    "processor",
    "prompt",
    "decoding",
    "seed",
    "image_ids_hash",
    "n_images",
    "question_file_hash",
    "ground_truth",
    "metric_flavour",
    "options",
    "attention_backend",
    "package_version",
    "created_at",
}

CAPTIONS = {  # image id -> caption without / with hallucinations
    1: ("A man with a dog at a table.", "A man with a dog and a cat at a table."),
    2: ("An animal sleeps.", "A cat on a couch next to a dog."),
    3: ("A toilet.", "A toilet."),
}


@dataclass(frozen=True)
class FakeVHR:
    """Stands in for a registered intervention config (the registry is not under test here)."""

    alpha: float = 0.5
    name: ClassVar[str] = "vhr"


def fake_resolve(spec):
    return tuple(FakeVHR() for name in spec.split("+") if name == "vhr")


class CaptionModel:
    """Fake pipeline: the "vhr" configuration removes the hallucinated objects."""

    def __init__(self):
        self.calls = 0

    def info(self):
        return {"model_id": "fake/captioner", "dtype": "float32", "attention_backend": "sdpa", "family": "llava"}

    def generate(self, requests):
        self.calls += len(requests)
        out = []
        for r in requests:
            imid = {"red": 1, "green": 2, "blue": 3}[_color(r.image)]
            on = {getattr(c, "name", c) for c in r.interventions}
            text = CAPTIONS[imid][0 if "vhr" in on else 1]
            out.append(Result(text=text, token_ids=[], finish_reason="stop", prompt_tokens=0))
        return out


def _color(img):
    r, g, b = img.getpixel((0, 0))
    return "red" if r > 200 else "green" if g > 100 else "blue"


@pytest.fixture
def chair_task(parser, tiny_coco):
    from lvlm_hallu.eval.chair import ground_truth_from_coco

    gt = ground_truth_from_coco(tiny_coco.instances, tiny_coco.captions, parser=parser)
    files = {i: str(tiny_coco.images / f"COCO_val2014_{i:012d}.jpg") for i in (1, 2, 3)}
    return ChairTask(files, gt, parser)


def test_compare_chair_writes_report(chair_task, tmp_path):
    model = CaptionModel()
    execute = answer_executor(lambda spec: local_answer(model, interventions=spec, max_new_tokens=32), progress=False)
    prov = Provenance(
        model_id="fake/captioner",
        model_revision="abc123",
        dtype="float32",
        decoding={"max_new_tokens": 32},
        seed=0,
        attention_backend="sdpa",
    )
    report, paths = compare(chair_task, ["none", "vhr"], execute, tmp_path, prov)
    none, vhr = report.results
    # none: image 1 cat hallucinated, image 2 couch + dog -> 3 of 8 mentions, 2 of 3 captions
    assert none.metrics["CHAIR_i"] == pytest.approx(100 * 3 / 8)
    assert none.metrics["CHAIR_s"] == pytest.approx(100 * 2 / 3)
    assert vhr.metrics["CHAIR_i"] == 0 and vhr.metrics["CHAIR_s"] == 0
    # GT: {person, dog, dining table} + {cat} + {toilet}; "vhr" misses the cat
    assert vhr.metrics["Recall"] == pytest.approx(100 * 4 / 5) and none.metrics["Recall"] == 100
    data = json.loads(paths.json.read_text())
    assert PROVENANCE_FIELDS <= set(data["provenance"])
    p = data["provenance"]
    assert (p["benchmark"], p["model_id"], p["model_revision"], p["attention_backend"]) == (
        "chair",
        "fake/captioner",
        "abc123",
        "sdpa",
    )
    assert p["prompt"] == "Please describe this image in detail." and p["n_images"] == 3
    assert p["metric_flavour"] == "nltk-pos-wordnet" and p["options"]["short_caption"] is False
    assert len(p["image_ids_hash"]) == 64 and p["package_version"]
    assert [r["interventions"] for r in data["results"]] == ["none", "vhr"]
    md = paths.markdown.read_text()
    assert "| configuration | CHAIR_s | CHAIR_i | Recall | Len |" in md
    assert "| vhr | 0.00 | 0.00 | 80.00 |" in md
    assert paths.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    details = json.loads((tmp_path / "chair_none_details.json").read_text())
    assert details["most_hallucinated"] == [["cat", 1], ["couch", 1], ["dog", 1]]
    assert details["captions"][1]["hallucinated"] == [["couch", "couch"], ["dog", "dog"]]
    # resumable per configuration: a second comparison generates nothing new
    calls = model.calls
    compare(chair_task, ["none", "vhr"], execute, tmp_path, prov)
    assert model.calls == calls
    assert not list(tmp_path.glob(".*.tmp"))


def test_compare_pope(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    questions = [
        PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes"),
        PopeQuestion(2, "a.jpg", "Is there a cat in the image?", "no"),
    ]
    task = PopeTask({"random": questions, "popular": questions}, tmp_path)

    class YesModel:
        def generate(self, requests):
            assert requests[0].prompt.endswith("\nAnswer the question using a single word or phrase.")
            return [Result(text="Yes.", token_ids=[], finish_reason="stop", prompt_tokens=0) for _ in requests]

    execute = answer_executor(lambda spec: local_answer(YesModel(), interventions=spec), progress=False)
    report, paths = compare(task, ["none"], execute, tmp_path / "out", Provenance())
    m = report.results[0].metrics
    assert m["random Acc"] == 50 and m["random Yes"] == 100 and m["POPE (mean F1)"] == pytest.approx(100 * 2 / 3)
    p = json.loads(paths.json.read_text())["provenance"]
    assert set(p["question_file_hash"]) == {"random", "popular"} and p["metric_flavour"] == "pope/parser=pope"


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    import os

    target = tmp_path / "r.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new" * 1000)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the temp file was removed


def test_write_report_without_results(tmp_path):
    report = Report(Provenance(benchmark="chair"), ())
    paths = write_report(report, tmp_path)
    assert paths.png is None and json.loads(paths.json.read_text())["results"] == []
    assert config_name(None) == "none" and config_name([{"name": "vhr"}, "var"]) == "vhr+var"
    assert ConfigResult("x", "x", {"a": 1.0}).metrics["a"] == 1.0


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_score_chair(tiny_coco, tmp_path):
    from lvlm_hallu.eval.cli import app

    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image_id": i, "caption": CAPTIONS[i][1]}) + "\n" for i in (1, 2, 3)))
    out = tmp_path / "scores.json"
    res = CliRunner().invoke(
        app,
        [
            "score-chair",
            str(caps),
            "--gt",
            str(tiny_coco.instances),
            "--captions-gt",
            str(tiny_coco.captions),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "CHAIR_i" in res.output
    data = json.loads(out.read_text())
    assert data["metrics"]["CHAIR_i"] == pytest.approx(100 * 3 / 8)
    assert len(data["captions"]) == 3
    # beside CHAIR: cat, couch and dog hallucinated over 3 captions; no repeats; 11 + 9 + 2 words
    assert data["caption_metrics"] == pytest.approx({"Halluc/cap": 1.0, "CHAIR_i distinct": 100 * 3 / 8,
                                                     "Repeat %": 0.0, "Overcount %": 0.0,
                                                     "Halluc or repeat %": 100 * 2 / 3, "Words": 22 / 3})
    assert len(data["mentions"]["captions"]) == 3 and "Repeat %" in res.output
    # instances only: the table (mined from human captions) is now a hallucination too
    res = CliRunner().invoke(app, ["score-chair", str(caps), "--gt", str(tiny_coco.instances), "--out", str(out)])
    assert json.loads(out.read_text())["metrics"]["CHAIR_i"] == pytest.approx(100 * 4 / 8)
    caps.write_text(json.dumps({"image_id": "1", "caption": "A dog."}) + "\n")
    res = CliRunner().invoke(app, ["score-chair", str(caps), "--gt", str(tiny_coco.instances)])
    assert res.exit_code == 2 and "not an integer" in res.output


def test_cli_chair_runs_a_model(tiny_coco, tmp_path, monkeypatch):
    from lvlm_hallu.eval import cli

    model = CaptionModel()
    monkeypatch.setattr(cli, "_load_model", lambda name: model)
    # the interventions registry is not under test here: a fake resolve stands in for it
    monkeypatch.setattr(cli, "_resolver", lambda: fake_resolve)
    args = [
        "chair",
        "--model",
        "fake/captioner",  # not a readable checkpoint: no context fitting, no digests
        "--images",
        str(tiny_coco.images),
        "--annotations",
        str(tiny_coco.root),
        "-n",
        "3",
        "--interventions",
        "vhr",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "run" / "chair_report.json").read_text())
    assert data["results"][0]["metrics"]["CHAIR_i"] == 0
    assert data["provenance"]["decoding"] == {"max_new_tokens": 512, "temperature": 0.0}
    assert model.calls == 3
    assert data["results"][0]["details"]["interventions_resolved"] == [{"name": "vhr", "alpha": 0.5}]
    p = data["provenance"]
    assert (p["model_id"], p["dtype"], p["attention_backend"], p["extra"]["family"]) == (
        "fake/captioner",
        "float32",
        "sdpa",
        "llava",
    )
    assert p["extra"]["dataset"]["instances"] == str(tiny_coco.instances)  # found in --annotations
    assert p["fingerprint"]["fields"]["model"] == {
        "id": "fake/captioner", "revision": None, "config_sha256": None, "weights_sha256": None}


def test_cli_compare_pope_with_question_files(tmp_path, monkeypatch):
    from PIL import Image

    from lvlm_hallu.eval import cli
    from lvlm_hallu.eval.pope import write_questions

    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    qs = [
        PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes"),
        PopeQuestion(2, "a.jpg", "Is there a cat in the image?", "no"),
    ]
    write_questions(tmp_path / "coco_pope_adversarial.json", qs)

    class Model:  # says yes unless "var" is on
        def generate(self, requests):
            return [
                Result(
                    text="No" if "var" in {c if isinstance(c, str) else c["name"] for c in r.interventions} else "Yes",
                    token_ids=[],
                    finish_reason="stop",
                    prompt_tokens=0,
                )
                for r in requests
            ]

    monkeypatch.setattr(cli, "_load_model", lambda name: Model())
    monkeypatch.setattr(cli, "_resolver", lambda: lambda spec: tuple(split_spec(spec)))
    args = [
        "compare",
        "--model",
        "fake/yes-model",
        "--benchmark",
        "pope",
        "--config",
        "plain=none",
        "--config",
        'var-strong=[{"name": "var", "p": 0.6}]',
        "--images",
        str(tmp_path),
        "--questions",
        str(tmp_path / "coco_pope_adversarial.json"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "out" / "pope_report.json").read_text())
    assert [r["name"] for r in data["results"]] == ["plain", "var-strong"]
    assert data["results"][1]["interventions"] == [{"name": "var", "p": 0.6}]
    none, var = (r["metrics"] for r in data["results"])
    assert (none["adversarial Yes"], var["adversarial Yes"]) == (100, 0)
    assert data["provenance"]["decoding"]["max_new_tokens"] == 16
    assert "adversarial" in data["provenance"]["question_file_hash"]


class SwapModel(CaptionModel):
    """The "vhr" configuration trades each absent object for one more of a present one (issue 33)."""

    SWAP = {1: ("A man with a dog and a cat.", "A man with a dog and a dog and a dog."),  # two dogs in image 1
            2: ("A cat and a dog.", "A cat and a cat."),  # one cat in image 2
            3: ("Two toilets.", "A toilet.")}  # one toilet in image 3

    def generate(self, requests):
        out = []
        for r in requests:
            imid = {"red": 1, "green": 2, "blue": 3}[_color(r.image)]
            text = self.SWAP[imid][1 if any(getattr(c, "name", c) == "vhr" for c in r.interventions) else 0]
            out.append(Result(text=text, token_ids=[], finish_reason="stop", prompt_tokens=0))
        return out


def test_compare_chair_reports_the_caption_metrics_with_intervals(chair_task, tmp_path):
    """CHAIR_s falls to 0 while repeats rise: the report's JSON, Markdown and details say so."""
    model = SwapModel()
    execute = answer_executor(lambda spec: local_answer(model, interventions=spec, max_new_tokens=32), progress=False)
    report, paths = compare(chair_task, ["none", "vhr"], execute, tmp_path, Provenance(), resamples=400)
    none, vhr = report.results
    assert none.metrics["CHAIR_s"] == pytest.approx(100 * 2 / 3) and vhr.metrics["CHAIR_s"] == 0
    expected = {  # by hand: see SWAP; words exclude punctuation
        "none": {"Halluc/cap": 2 / 3, "Repeat %": 0.0, "Overcount %": 100 / 3, "Halluc or repeat %": 200 / 3,
                 "Words": 15 / 3, "CHAIR_i distinct": 100 * 2 / 6},
        "vhr": {"Halluc/cap": 0.0, "Repeat %": 200 / 3, "Overcount %": 0.0, "Halluc or repeat %": 200 / 3,
                "Words": 18 / 3, "CHAIR_i distinct": 0.0},
    }
    for result in report.results:
        assert {k: result.metrics[k] for k in expected[result.name]} == pytest.approx(expected[result.name])
    data = json.loads(paths.json.read_text())
    intervals = data["results"][1]["intervals"]
    assert intervals["Repeat %"]["diff"] == pytest.approx(200 / 3) and intervals["Words"]["diff"] == pytest.approx(1.0)
    assert intervals["Halluc or repeat %"]["diff"] == 0.0
    md = paths.markdown.read_text()
    assert "| Halluc/cap | CHAIR_i distinct | Repeat % | Overcount % | Halluc or repeat % | Words |" in md
    details = json.loads((tmp_path / "chair_vhr_details.json").read_text())
    reps = [[r[:2] for r in c["repetitions"]] for c in details["mentions"]["captions"]]
    assert reps == [[["dog", "dog"]], [["cat", "cat"]], []]
    claims = json.loads((tmp_path / "chair_none_details.json").read_text())["mentions"]["captions"][2]["count_claims"]
    assert claims == [["two", "toilet", 2, 1]]
