"""POPE for lmms-eval over local files: the shipped task definition, written next to its data.

lmms-eval's POPE task downloads its questions from the Hugging Face hub. The shapes model is
evaluated on POPE questions this project generates (eval/pope.py over the shapes world,
eval/world.py), so the project ships its own lmms-eval task (tasks/: one template, a task per
split, the group `pope_shapes`) whose prompt, answer parsing and metrics are lmms-eval's own POPE
functions and whose documents come from local JSON-lines files. `write_task` puts the shipped
YAML files and one such file per split into a folder, for `--include_path`:

    python -m lvlm_hallu.lmms_eval.pope --out DIR [-n 20] [--seed 0]     # built as `lvlm eval pope` builds them
    python -m lvlm_hallu.lmms_eval.pope --out DIR --questions Q1 ... --images IMAGES

Without --questions the splits are exactly those of `lvlm eval pope --model shapes -n N --seed S`
(same generated world, same sampling); with --questions the official-format files
({question_id, image, text, label}) that `lvlm eval pope` writes beside its answers, or any
others, so both tools ask the same questions of the same images. A document holds lmms-eval's
POPE fields (question_id, question, answer, category) and the image's absolute path.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from lvlm_hallu.eval.pope import SPLITS, PopeQuestion

TASKS_DIR = Path(__file__).with_name("tasks")
GROUP = "pope_shapes"


def task_name(split: str) -> str:
    return f"{GROUP}_{split}"


def doc(question: PopeQuestion, images_dir: Path, split: str) -> dict:
    """One lmms-eval POPE document (the hub dataset's field names) for a question of ours."""
    return {"question_id": question.question_id, "question": question.text, "answer": question.label,
            "category": split, "image": str((images_dir / question.image).resolve())}


def doc_to_visual(document: Mapping) -> list:
    """lmms-eval's `doc_to_visual` for these tasks: the image at the document's path, in RGB."""
    from PIL import Image

    with Image.open(document["image"]) as image:
        return [image.convert("RGB")]


def write_task(out: Path, splits: Mapping[str, Sequence[PopeQuestion]], images_dir: Path) -> list[str]:
    """The shipped task files and one documents file per split into `out`; the task names."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"POPE split(s) {', '.join(unknown)} have no shipped task; valid splits: {', '.join(SPLITS)}")
    out.mkdir(parents=True, exist_ok=True)
    for path in TASKS_DIR.iterdir():
        if path.suffix == ".yaml" or path.name.endswith("_yaml"):
            shutil.copyfile(path, out / path.name)
    for split in SPLITS:  # a split not asked for keeps no stale documents from an earlier run
        (out / f"{task_name(split)}.jsonl").unlink(missing_ok=True)
    for split, questions in splits.items():
        lines = (json.dumps(doc(q, images_dir, split)) + "\n" for q in questions)
        (out / f"{task_name(split)}.jsonl").write_text("".join(lines), encoding="utf-8")
    return [task_name(s) for s in splits]


def shapes_task(n: int | None, seed: int, questions: list[Path] | None, images: Path | None):
    """The PopeTask `lvlm eval pope --model shapes` asks with these options (eval/datasets.py)."""
    from lvlm_hallu.eval.datasets import pope_task, resolve_sources

    sources = resolve_sources("shapes", images, None, None, None, None, other_data=bool(questions),
                              world_images=None if n is None else 3 * n)
    task, _ = pope_task(sources, n, seed, questions, "lmms-eval", progress=False)
    return task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lvlm_hallu.lmms_eval.pope", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="task folder for lmms-eval's --include_path")
    parser.add_argument("-n", type=int, default=None, help="images per split (as lvlm eval pope -n)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample (as lvlm eval pope --seed)")
    parser.add_argument("--questions", type=Path, nargs="+", help="POPE question files instead of building them")
    parser.add_argument("--images", type=Path, help="folder of the images the question files name")
    args = parser.parse_args(argv)
    from lvlm_hallu.eval.errors import EvalError

    try:
        task = shapes_task(args.n, args.seed, args.questions, args.images)
        names = write_task(args.out, task.splits, task.images_dir)
    except (EvalError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    counts = ", ".join(f"{name} ({len(task.splits[s])})" for name, s in zip(names, task.splits, strict=True))
    print(f"wrote {args.out}: {counts}; run lmms-eval with --include_path {args.out} --tasks {GROUP}")


if __name__ == "__main__":
    main()
