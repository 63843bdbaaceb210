"""lvlm_hallu/lmms_eval/pope.py: the shipped lmms-eval POPE task written beside local question files.

Runs without lmms-eval installed: the task folder's files, its documents against our questions,
and that the YAML hands prompt, parsing and metrics to lmms-eval's own POPE functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lvlm_hallu.eval.pope import PROMPT_SUFFIX, SPLITS, PopeQuestion, write_questions
from lvlm_hallu.lmms_eval import pope as task

LMMS_POPE = "lmms_eval.tasks.pope.utils."


class _Loader(yaml.SafeLoader):
    """Reads `!function a.b.c` as the string "a.b.c" (lmms-eval imports it; we only look)."""


_Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def questions(n_images: int, image: str) -> list[PopeQuestion]:
    out = []
    for i in range(n_images):
        out += [PopeQuestion(2 * i + 1, image, "Is there a sun in the image?", "yes"),
                PopeQuestion(2 * i + 2, image, "Is there an apple in the image?", "no")]
    return out


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(folder / "scene_1.png")
    Image.new("L", (8, 6), 77).save(folder / "gray_2.png")  # a grayscale file: doc_to_visual gives RGB
    return folder


def test_write_task_puts_the_shipped_yaml_and_one_document_file_per_split(tmp_path, images):
    splits = {s: questions(2, "scene_1.png") for s in SPLITS}
    names = task.write_task(tmp_path / "t", splits, images)
    assert names == ["pope_shapes_random", "pope_shapes_popular", "pope_shapes_adversarial"]
    written = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert written == sorted(["_pope_shapes_template_yaml", "pope_shapes.yaml",
                              *(f"pope_shapes_{s}.yaml" for s in SPLITS), *(f"pope_shapes_{s}.jsonl" for s in SPLITS)])
    docs = [json.loads(line) for line in (tmp_path / "t" / "pope_shapes_popular.jsonl").read_text().splitlines()]
    assert docs[1] == {"question_id": 2, "question": "Is there an apple in the image?", "answer": "no",
                       "category": "popular", "image": str((images / "scene_1.png").resolve())}
    assert len(docs) == 4 and [d["answer"] for d in docs] == ["yes", "no", "yes", "no"]


def test_each_split_task_reads_its_file_beside_it_and_the_group_lists_them(tmp_path, images):
    task.write_task(tmp_path, {s: questions(1, "scene_1.png") for s in SPLITS}, images)
    for split in SPLITS:
        config = load(tmp_path / f"pope_shapes_{split}.yaml")
        assert config["task"] == f"pope_shapes_{split}" and config["include"] == "_pope_shapes_template_yaml"
        assert (tmp_path / config["dataset_kwargs"]["data_files"]["test"]).is_file()
    assert load(tmp_path / "pope_shapes.yaml") == {"group": "pope_shapes",
                                                   "task": [f"pope_shapes_{s}" for s in SPLITS]}


def test_prompt_parsing_and_metrics_are_lmms_evals_own_pope_functions(tmp_path):
    template = load(task.TASKS_DIR / "_pope_shapes_template_yaml")
    assert template["dataset_path"] == "json" and template["output_type"] == "generate_until"
    assert template["doc_to_text"] == "!function " + LMMS_POPE + "pope_doc_to_text"
    assert template["process_results"] == "!function " + LMMS_POPE + "pope_process_results"
    metrics = {m["metric"]: m["aggregation"] for m in template["metric_list"]}
    assert metrics == {f"pope_{m}": f"!function {LMMS_POPE}pope_aggregate_{m}"
                       for m in ("accuracy", "precision", "recall", "f1_score", "yes_ratio")}
    assert template["doc_to_visual"] == "!function lvlm_hallu.lmms_eval.pope.doc_to_visual"
    # the prompt lmms-eval builds (question + post_prompt) is `lvlm eval pope`'s, token budget too
    assert template["lmms_eval_specific_kwargs"]["default"] == {"pre_prompt": "", "post_prompt": PROMPT_SUFFIX}
    assert template["generation_kwargs"]["max_new_tokens"] == 16 and template["generation_kwargs"]["temperature"] == 0


def test_doc_to_visual_opens_the_documents_image_in_rgb(tmp_path, images):
    task.write_task(tmp_path / "t", {"random": questions(1, "gray_2.png")}, images)
    first = json.loads((tmp_path / "t" / "pope_shapes_random.jsonl").read_text().splitlines()[0])
    [image] = task.doc_to_visual(first)
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (77, 77, 77)


def test_a_rewrite_with_fewer_splits_leaves_no_stale_documents(tmp_path, images):
    task.write_task(tmp_path, {s: questions(1, "scene_1.png") for s in SPLITS}, images)
    task.write_task(tmp_path, {"random": questions(1, "scene_1.png")}, images)
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["pope_shapes_random.jsonl"]


def test_an_unknown_split_is_refused_by_name(tmp_path, images):
    with pytest.raises(ValueError, match="split.s. val have no shipped task; valid splits: random, popular, adv"):
        task.write_task(tmp_path, {"val": questions(1, "scene_1.png")}, images)


def test_the_command_reads_question_files_as_lvlm_eval_pope_writes_them(tmp_path, images, capsys):
    files = []
    for split in SPLITS:
        files.append(tmp_path / f"pope_{split}_questions.jsonl")
        write_questions(files[-1], questions(3, "scene_1.png"))
    task.main(["--out", str(tmp_path / "t"), "--questions", *map(str, files), "--images", str(images)])
    assert "pope_shapes_adversarial (6)" in capsys.readouterr().out
    docs = (tmp_path / "t" / "pope_shapes_adversarial.jsonl").read_text().splitlines()
    assert [json.loads(d)["question_id"] for d in docs] == [1, 2, 3, 4, 5, 6]


def test_the_command_fails_in_one_line_on_a_missing_question_file(tmp_path, images, capsys):
    with pytest.raises(SystemExit) as exit_:
        task.main(["--out", str(tmp_path / "t"), "--questions", str(tmp_path / "nope.jsonl"), "--images", str(images)])
    assert exit_.value.code == 2 and "nope.jsonl" in capsys.readouterr().err
