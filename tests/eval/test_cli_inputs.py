"""Clear errors before any model loads, and the smaller points (issue 11, items 2, 3, 5, 6)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvlm_hallu.eval.chair import drop_incomplete_sentence, read_captions
from lvlm_hallu.eval.coco import resolve_annotation_paths
from lvlm_hallu.eval.errors import AnnotationError
from lvlm_hallu.lvlm.types import Result


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """eval.cli whose model must never load (every case here fails before it) unless allowed."""
    from lvlm_hallu.eval import cli

    def no_model(name):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "_load_model", no_model)
    monkeypatch.setattr(cli, "_resolver", lambda: lambda spec: ())
    monkeypatch.setattr(cli, "RUNS", tmp_path / "runs")
    return cli


def invoke(cli, *args):
    res = CliRunner().invoke(cli.app, [str(a) for a in args])
    return res.exit_code, res.output


def _fails(code_output, *needles):
    code, output = code_output
    assert code == 2, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, output


# ---------------------------------------------------------------------------------------------
# Item 5: every case


def test_missing_captions_file(cli, tiny_coco, tmp_path):
    _fails(invoke(cli, "score-chair", tmp_path / "nope.jsonl", "--gt", tiny_coco.instances),
           "captions file not found", "nope.jsonl")
    _fails(invoke(cli, "chair", "--model", "fake/m", "--images", tiny_coco.images, "--captions", tmp_path / "c.json"),
           "COCO annotation file not found")


def test_a_non_instances_file_as_gt(cli, tiny_coco, tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": "A dog."}) + "\n")
    _fails(invoke(cli, "score-chair", caps, "--gt", tiny_coco.captions),
           "is a COCO captions file; a COCO instances file (instances_*.json) is needed")
    _fails(invoke(cli, "score-chair", caps, "--gt", tiny_coco.instances, "--captions-gt", tiny_coco.instances),
           "is a COCO instances file; a COCO captions file")
    _fails(invoke(cli, "score-chair", caps, "--gt", caps), "is not a COCO annotation file")
    _fails(invoke(cli, "chair", "--model", "fake/m", "--images", tiny_coco.images, "--instances", tiny_coco.captions),
           "is a COCO captions file")


def test_missing_image_files_are_all_listed_up_front(cli, tiny_coco):
    for i in (1, 3):
        os.remove(tiny_coco.images / f"COCO_val2014_{i:012d}.jpg")
    _fails(invoke(cli, "chair", "--model", "fake/m", "--images", tiny_coco.images, "--annotations", tiny_coco.root,
                  "-n", "3"),
           "2 of 3 image files are missing", "COCO_val2014_000000000001.jpg", "COCO_val2014_000000000003.jpg")


def test_missing_images_of_pope_questions(cli, tmp_path):
    from lvlm_hallu.eval.pope import PopeQuestion, write_questions

    write_questions(tmp_path / "coco_pope_random.json", [PopeQuestion(1, "gone.jpg", "Is there a dog?", "yes")])
    _fails(invoke(cli, "pope", "--model", "fake/m", "--images", tmp_path, "--questions",
                  tmp_path / "coco_pope_random.json"), "1 of 1 image files are missing", "gone.jpg")
    _fails(invoke(cli, "pope", "--model", "fake/m", "--images", tmp_path, "--questions", tmp_path / "missing.json"),
           "POPE question file not found")


def test_null_captions_are_an_error_and_empty_ones_are_counted(cli, tiny_coco, tmp_path):
    caps = tmp_path / "caps.jsonl"
    rows = [{"image_id": 1, "caption": "A dog."}, {"image_id": 2, "caption": None}, {"image_id": 3, "caption": None}]
    caps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(invoke(cli, "score-chair", caps, "--gt", tiny_coco.instances),
           "2 record(s) have a null 'caption' (records 2, 3)")
    rows[1]["caption"] = rows[2]["caption"] = "  "
    caps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.json"
    code, output = invoke(cli, "score-chair", caps, "--gt", tiny_coco.instances, "--out", out)
    assert code == 0, output
    assert "empty captions: 2" in output
    data = json.loads(out.read_text())
    assert data["n_empty"] == 2 and data["n_captions"] == 3 and data["n_mentions"] == 1  # never the word "None"


def test_n_with_questions_is_refused(cli, tmp_path):
    from lvlm_hallu.eval.pope import PopeQuestion, write_questions

    write_questions(tmp_path / "coco_pope_random.json", [PopeQuestion(1, "a.jpg", "Is there a dog?", "yes")])
    _fails(invoke(cli, "pope", "--model", "fake/m", "--images", tmp_path, "--questions",
                  tmp_path / "coco_pope_random.json", "-n", "10"), "-n samples images to build POPE questions")


@pytest.mark.parametrize("naming", ["2014", "2017", "shapes"])
def test_annotations_folder_with_any_coco_naming(cli, tiny_coco, tmp_path, naming, monkeypatch):
    folder = tmp_path / f"ann{naming}"
    sub = folder / "annotations" if naming == "shapes" else folder  # the shapes world keeps annotations/
    sub.mkdir(parents=True)
    stem = {"2014": "val2014", "2017": "val2017", "shapes": "test"}[naming]
    shutil.copy(tiny_coco.instances, sub / f"instances_{stem}.json")
    shutil.copy(tiny_coco.captions, sub / f"captions_{stem}.json")
    found = resolve_annotation_paths(folder, None, None)
    assert found == (sub / f"instances_{stem}.json", sub / f"captions_{stem}.json")
    # and a model run finds them too and records them
    monkeypatch.setattr(cli, "_load_model", lambda name: DogModel())
    out = tmp_path / "out"
    code, output = invoke(cli, "chair", "--model", "fake/m", "--images", tiny_coco.images, "--annotations", folder,
                          "-n", "3", "--out", out, "--no-progress")
    assert code == 0, output
    dataset = json.loads((out / "chair_report.json").read_text())["provenance"]["extra"]["dataset"]
    assert dataset["instances"] == str(found[0]) and dataset["captions"] == str(found[1])


class DogModel:
    def generate(self, requests):
        return [Result(text="A dog.", token_ids=[], finish_reason="stop", prompt_tokens=0) for _ in requests]


def test_annotations_folder_that_is_ambiguous_or_empty(tiny_coco, tmp_path):
    shutil.copy(tiny_coco.instances, tmp_path / "instances_val2017.json")
    shutil.copy(tiny_coco.instances, tmp_path / "instances_train2017.json")
    with pytest.raises(AnnotationError, match="several instances files"):
        resolve_annotation_paths(tmp_path, None, None)
    assert resolve_annotation_paths(tmp_path, tiny_coco.instances, None)[0] == tiny_coco.instances
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AnnotationError, match="no instances_"):
        resolve_annotation_paths(empty, None, None)


def test_llava_style_logs_with_key_options(cli, tiny_coco, tmp_path):
    standard, llava = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    caps = {1: "A man with a dog and a cat.", 2: "A cat on a couch.", 3: "A toilet."}
    standard.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in caps.items()))
    llava.write_text("".join(json.dumps({"question_id": i, "prompt": "Describe.", "text": c, "answer_id": "x"}) + "\n"
                             for i, c in caps.items()))
    _fails(invoke(cli, "score-chair", llava, "--gt", tiny_coco.instances), "--image-id-key / --caption-key")
    code, _ = invoke(cli, "score-chair", standard, "--gt", tiny_coco.instances, "--out", tmp_path / "a.json")
    assert code == 0
    code, output = invoke(cli, "score-chair", llava, "--gt", tiny_coco.instances, "--out", tmp_path / "b.json",
                          "--image-id-key", "question_id", "--caption-key", "text")
    assert code == 0, output
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert a["metrics"] == b["metrics"] and a["n_mentions"] == 6
    records = read_captions(llava, image_id_key="question_id", caption_key="text")
    assert [r.caption for r in records] == list(caps.values())


def test_help_and_errors_keep_square_brackets(cli, tmp_path):
    code, output = invoke(cli, "score-chair", "--help")
    assert code == 0 and "{image_id: [category]}" in output
    code, output = invoke(cli, "chair", "--help")
    assert "[default: 500; 20 on the generated shapes world]" in " ".join(output.split())
    bad = tmp_path / "gt.json"
    bad.write_text("[1, 2]")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": "A dog."}) + "\n")
    _fails(invoke(cli, "score-chair", caps, "--gt-json", bad), "expected a JSON object {image_id: [category, ...]}")


# ---------------------------------------------------------------------------------------------
# Item 3: max_new_tokens fitted to the context before loading; item 6: smaller points


def test_max_new_tokens_is_fitted_to_the_context_before_loading(shapes_coco):
    from transformers import AutoConfig

    from lvlm_hallu.eval.context import ContextError, fit_max_new_tokens
    from lvlm_hallu.lvlm.shapes import MODEL_DIR

    context = AutoConfig.from_pretrained(MODEL_DIR).text_config.max_position_embeddings
    image = str(next((shapes_coco / "images").iterdir()))
    tokens, warning = fit_max_new_tokens(10 * context, "shapes", ["Please describe this image in detail."], image)
    assert 0 < tokens < context and f"clamped to {tokens}" in warning
    longer, _ = fit_max_new_tokens(10 * context, "shapes", ["Please describe this image in detail, every part."], image)
    assert longer < tokens  # the longest prompt decides
    assert fit_max_new_tokens(8, "shapes", ["Describe."], image) == (8, None)
    with pytest.raises(ContextError, match="no room is left"):
        fit_max_new_tokens(8, "shapes", ["word " * context], image)
    assert fit_max_new_tokens(10**6, "not/a-cached-model", ["x"], image) == (10**6, None)  # the model decides


def test_cli_refuses_a_prompt_that_fills_the_context_before_loading(cli, shapes_coco):
    _fails(invoke(cli, "chair", "--model", "shapes", "--images", shapes_coco / "images", "--annotations", shapes_coco,
                  "-n", "2", "--prompt", "word " * 400), "no room is left to generate")


def test_short_caption_follows_the_reference_cut():
    assert drop_incomplete_sentence("A dog. Nice!") == "A dog."
    assert drop_incomplete_sentence("A dog sits. A cat on the") == "A dog sits."
    assert drop_incomplete_sentence("A dog sits.") == "A dog sits."
    assert drop_incomplete_sentence("Wow! A dog") == ""


def test_report_files_are_world_readable(tmp_path):
    from lvlm_hallu.eval.report import Provenance, Report, write_report

    old = os.umask(0o077)  # even under a strict umask
    try:
        paths = write_report(Report(Provenance(benchmark="x"), ()), tmp_path)
    finally:
        os.umask(old)
    for p in (paths.json, paths.markdown):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_progress_bars_name_benchmark_configuration_and_split(tmp_path):
    from PIL import Image

    from lvlm_hallu.eval.compare import PopeTask, compare
    from lvlm_hallu.eval.pope import PopeQuestion
    from lvlm_hallu.eval.report import Provenance

    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    qs = [PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes"),
          PopeQuestion(2, "a.jpg", "Is there a cat in the image?", "no")]
    task = PopeTask({"random": qs, "adversarial": qs}, tmp_path)
    seen = []

    def execute(items, path, spec, description=None):
        seen.append((description, len(items)))
        return {it.key: {"key": it.key, **it.meta, "answer": "Yes"} for it in items}

    compare(task, ["none", "vhr"], execute, tmp_path / "out", Provenance(), charts=False)
    assert seen == [("pope none random", 2), ("pope none adversarial", 2), ("pope vhr random", 2),
                    ("pope vhr adversarial", 2)]


def test_pope_console_and_markdown_show_precision_recall_and_unparseable(cli, tmp_path, monkeypatch):
    from PIL import Image

    from lvlm_hallu.eval.pope import PopeQuestion, write_questions

    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    qs = [PopeQuestion(i + 1, "a.jpg", f"Is there a thing {i} in the image?", "yes" if i % 2 else "no")
          for i in range(4)]
    write_questions(tmp_path / "coco_pope_random.json", qs)

    class Model:  # one unparseable answer of four
        def generate(self, requests):
            texts = {"0": "I cannot tell.", "1": "Yes", "2": "No", "3": "Yes"}
            return [Result(text=texts[r.prompt.split(" in the")[0][-1]], token_ids=[], finish_reason="stop",
                           prompt_tokens=0) for r in requests]

    monkeypatch.setattr(cli, "_load_model", lambda name: Model())
    code, output = invoke(cli, "pope", "--model", "fake/m", "--images", tmp_path, "--questions",
                          tmp_path / "coco_pope_random.json", "--out", tmp_path / "out", "--no-progress")
    assert code == 0, output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in output.splitlines()
            if line.count("│") == 3}
    # answers: q0 (no) unclear -> yes (FP), q1 yes TP, q2 no TN, q3 yes TP: P = 2/3, R = 1
    assert rows["random Prec"] == "66.67" and rows["random Rec"] == "100.00" and rows["random unparseable"] == "1"
    md = (tmp_path / "out" / "pope_report.md").read_text()
    assert "| configuration | random Acc | random Prec | random Rec | random F1 | random Yes | POPE (mean F1) | " \
           "random unparseable |" in md
    assert "| none | 75.00 | 66.67 | 100.00 | 80.00 | 75.00 | 80.00 | 1 |" in md


def test_zero_setup_sources_generate_and_cache_the_shapes_world(tmp_path, monkeypatch):
    from lvlm_hallu.eval.datasets import COCO_N, default_n, resolve_sources
    from lvlm_hallu.eval.world import DEFAULT_N, WORLD_IMAGES
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    src = resolve_sources("shapes", None, None, None, None, None)
    assert src.world is not None and src.world.size == WORLD_IMAGES
    assert len(list(src.images.iterdir())) == WORLD_IMAGES and src.synonyms == SYNONYMS_PATH
    assert src.describe() == {"generated": "shapes world, test split", "seed": src.world.seed,
                              "images": WORLD_IMAGES, "folder": str(src.world.root)}
    stamp = src.instances.stat().st_mtime_ns
    assert resolve_sources("shapes", None, None, None, None, None).instances.stat().st_mtime_ns == stamp  # cached
    assert default_n(None, src) == DEFAULT_N and default_n(7, src) == 7
    bigger = resolve_sources("shapes", None, None, None, None, None, world_images=WORLD_IMAGES + 10)
    assert bigger.world.size == WORLD_IMAGES + 10
    # another data argument, or another model: never generated behind the user's back
    assert resolve_sources("shapes", None, None, None, None, None, other_data=True).world is None
    coco = resolve_sources("llava-hf/llava-1.5-7b-hf", tmp_path, None, None, None, None)
    assert coco.world is None and coco.synonyms is None and default_n(None, coco) == COCO_N


def test_shapes_world_annotations_get_the_shapes_synonyms_whatever_the_model(cli, shapes_coco, tiny_coco, tmp_path):
    """A model trained with lvlm.shapes.train, loaded by path, names shapes: the world's own files say
    which synonym table reads them (before, every category was 'not in the synonym table')."""
    from pycocotools.coco import COCO

    from lvlm_hallu.eval.datasets import synonyms_for
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

    inst = shapes_coco / "annotations" / "instances_test.json"
    world = COCO(str(inst))
    image_id = sorted(world.getImgIds())[0]
    present = sorted({world.cats[a["category_id"]]["name"] for a in world.loadAnns(world.getAnnIds(imgIds=image_id))})
    assert synonyms_for(None, world) == Path(SYNONYMS_PATH)
    assert synonyms_for(tmp_path / "mine.txt", world) == tmp_path / "mine.txt"  # an explicit table wins
    assert synonyms_for(None, COCO(str(tiny_coco.instances))) is None  # COCO data keeps the COCO table
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": image_id, "caption": f"There is a {present[0]}."}) + "\n")
    out = tmp_path / "scores.json"
    code, output = invoke(cli, "score-chair", caps, "--gt", inst, "--out", out)
    assert code == 0, output
    data = json.loads(out.read_text())
    assert data["n_mentions"] == 1 and data["chair_s"] == 0.0


def test_unreadable_images_bad_image_lists_and_bad_text_are_clear_errors(cli, tiny_coco, tmp_path):
    (tiny_coco.images / "COCO_val2014_000000000002.jpg").write_bytes(b"")  # a truncated download
    _fails(invoke(cli, "chair", "--model", "fake/m", "--images", tiny_coco.images, "--annotations", tiny_coco.root,
                  "-n", "3"),
           "1 of 3 image files are not readable images", "COCO_val2014_000000000002.jpg")
    bad_list = tmp_path / "ids.json"
    bad_list.write_text("[1, 2")
    _fails(invoke(cli, "chair", "--model", "fake/m", "--images", tiny_coco.images, "--annotations", tiny_coco.root,
                  "--image-list", bad_list), "not a JSON list of image ids")
    latin1 = tmp_path / "caps.jsonl"
    latin1.write_bytes(json.dumps({"image_id": 1, "caption": "A caf\u00e9."}, ensure_ascii=False).encode("latin-1") + b"\n")
    _fails(invoke(cli, "score-chair", latin1, "--gt", tiny_coco.instances), "not UTF-8 text")


def test_a_raw_line_separator_inside_a_caption_stays_one_record(tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_bytes(json.dumps({"image_id": 1, "caption": "A dog.\u2028A cat."}, ensure_ascii=False).encode() + b"\n")
    assert [r.caption for r in read_captions(caps)] == ["A dog.\u2028A cat."]


def test_a_server_that_cannot_be_reached_is_an_error_and_runs_of_other_configs_get_other_folders(cli, tiny_coco):
    dead = "http://127.0.0.1:9"  # the discard port: connection refused
    for interventions in ("vhr", "var"):
        code, output = invoke(cli, "chair", "--server", dead, "--model", "fake/m", "--images", tiny_coco.images,
                              "--annotations", tiny_coco.root, "-n", "2", "--interventions", interventions,
                              "--no-progress")
        _fails((code, output), f"the service at {dead} refused a request or could not be reached",
               "the same command resumes")
    folders = sorted(p.name for p in cli.RUNS.iterdir())  # claimed with --server before answering
    assert len(folders) == 2, folders  # one folder: the second run's report would overwrite the first's


def test_resamples_must_be_positive(cli, tiny_coco):
    code, output = invoke(cli, "compare", "--benchmark", "chair", "--model", "fake/m", "--images", tiny_coco.images,
                          "--annotations", tiny_coco.root, "-n", "2", "--resamples", "0")
    assert code == 2 and "--resamples" in output and "Traceback" not in output


@pytest.mark.parametrize("level", ["95", "0", "1"])
def test_a_level_outside_zero_one_is_a_clear_error_before_loading(cli, tiny_coco, level):
    _fails(invoke(cli, "compare", "--benchmark", "chair", "--model", "fake/m", "--images", tiny_coco.images,
                  "--annotations", tiny_coco.root, "-n", "2", "--level", level),
           "--level", "strictly between 0 and 1")
