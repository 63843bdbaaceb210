"""CHAIR and POPE tasks from command-line inputs, every input checked before any model loads.

Sources: COCO-format annotation files (explicit, or found in an `--annotations` folder under any
naming), an images folder, a synonym table; or, for `--model shapes` with no dataset argument,
the shapes world's test split generated on demand (eval/world.py). Checks, each a typed error with
a message instead of a traceback after hours of generation: annotation files exist and are of the
right kind (instances vs captions), every image file exists, `-n` is not combined with question
files, question files exist and name distinct splits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvlm_hallu.eval.errors import AnnotationError, EvalError
from lvlm_hallu.eval.world import DEFAULT_N, World, shapes_world

COCO_N = 500  # the papers' protocol: 500 random images


@dataclass(frozen=True)
class Sources:
    """Where a task's data comes from; `world` is set when it was generated (zero-setup)."""

    images: Path | None
    instances: Path | None
    captions: Path | None
    synonyms: Path | None
    world: World | None = None

    def describe(self) -> dict[str, Any]:
        if self.world is not None:
            return self.world.describe()
        return {k: str(v) for k, v in (("images", self.images), ("instances", self.instances),
                                      ("captions", self.captions)) if v is not None}


def resolve_sources(
    model: str,
    images: Path | None,
    annotations: Path | None,
    instances: Path | None,
    captions: Path | None,
    synonyms: Path | None,
    *,
    other_data: bool = False,
    world_images: int | None = None,
) -> Sources:
    """Explicit files win; `--model shapes` with no data arguments gets the generated shapes world.

    `other_data` says another data argument was given (--questions, --gt-json, --image-list), so
    the world is not generated behind the user's back; `world_images` is how many scenes the
    sample needs at least (the world has at least WORLD_IMAGES).
    """
    from lvlm_hallu.eval.coco import resolve_annotation_paths

    from lvlm_hallu.lvlm.shapes import EMBEDDED

    no_data = not any((images, annotations, instances, captions)) and not other_data
    if model in EMBEDDED and no_data:  # the test split of the world the embedded model was trained on
        world = shapes_world(world_images or DEFAULT_N, detailed=EMBEDDED[model][1] == "detail")
        return Sources(world.images, world.instances, world.captions, synonyms or world.synonyms, world)
    if synonyms is None and model in EMBEDDED:  # the embedded models name shapes, not COCO objects
        from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

        synonyms = Path(SYNONYMS_PATH)
    inst, caps = resolve_annotation_paths(annotations, instances, captions)
    return Sources(images, inst, caps, synonyms)


def synonyms_for(synonyms: Path | None, coco) -> Path | None:
    """The synonym table given, else the shapes world's for annotations the world wrote (their
    `info.description` says so, whatever model reads them: one trained with lvlm.shapes.train
    names shapes, not COCO objects), else None: the COCO table."""
    if synonyms is not None or coco is None:
        return synonyms
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH
    from lvlm_hallu.lvlm.shapes.world import DESCRIPTION_PREFIX

    info = coco.dataset.get("info") or {}
    return Path(SYNONYMS_PATH) if str(info.get("description", "")).startswith(DESCRIPTION_PREFIX) else None


def default_n(n: int | None, sources: Sources) -> int:
    if n is not None and n < 1:
        raise EvalError(f"-n must be at least 1, got {n} (an empty sample would score 0)")
    return n if n is not None else (DEFAULT_N if sources.world is not None else COCO_N)


def _need_images(sources: Sources) -> Path:
    if sources.images is None:
        raise EvalError("--images DIR is required to run a model (or use --model shapes with no data arguments)")
    if not sources.images.is_dir():
        raise AnnotationError(f"--images {sources.images}: not a folder")
    return sources.images


def chair_task(
    sources: Sources,
    n: int | None,
    seed: int,
    image_list: Path | None,
    gt_json: Path | None,
    short_caption: bool,
    prompt: str,
):
    """A ChairTask on a seeded sample (or `image_list`) of the annotated images."""
    from lvlm_hallu.eval.chair import CaptionParser, ground_truth_from_coco, ground_truth_from_json, load_synonyms
    from lvlm_hallu.eval.coco import (
        check_image_files,
        image_file_names,
        image_ids,
        load_coco,
        read_image_list,
        sample_image_ids,
        validate_image_ids,
    )
    from lvlm_hallu.eval.compare import ChairTask

    if sources.instances is None and sources.captions is None:
        raise EvalError("CHAIR needs --instances and/or --captions (or --annotations DIR) for the image list")
    images = _need_images(sources)
    if image_list is not None and n is not None:
        raise EvalError("-n samples images; --image-list fixes them: give one of the two")
    if image_list is not None and not image_list.is_file():
        raise AnnotationError(f"--image-list {image_list}: file not found")
    inst = load_coco(sources.instances, "instances") if sources.instances else None
    caps = load_coco(sources.captions, "captions") if sources.captions else None
    listing = inst if inst is not None else caps
    parser = CaptionParser(load_synonyms(synonyms_for(sources.synonyms, listing)))
    names = image_file_names(listing)
    if image_list is not None:
        ids = validate_image_ids(read_image_list(image_list), names)
    else:
        ids = sample_image_ids(image_ids(listing), default_n(n, sources), seed)
    if gt_json is not None:
        gt = ground_truth_from_json(gt_json)
    else:
        gt = ground_truth_from_coco(inst, caps, parser=parser, image_ids=ids)
        gt = dataclasses.replace(gt, source=" + ".join(str(p) for p in (sources.instances, sources.captions) if p))
    files = {i: str(images / names[i]) for i in ids}
    check_image_files(files.values())
    return ChairTask(files, gt, parser, prompt=prompt, short_caption=short_caption)


def _question_files(questions: list[Path]) -> dict[str, Path]:
    from lvlm_hallu.eval.pope import SPLITS

    files: dict[str, Path] = {}
    for q in questions:
        if not Path(q).is_file():
            raise AnnotationError(f"POPE question file not found: {q}")
        stem = Path(q).stem
        split = next((s for s in SPLITS if s in stem), stem)
        if split in files:
            raise AnnotationError(f"two question files for the {split!r} split: {files[split]} and {q}")
        files[split] = Path(q)
    return files


def pope_task(
    sources: Sources,
    n: int | None,
    seed: int,
    questions: list[Path] | None,
    parser_name: str,
    *,
    progress: bool = True,
):
    """(PopeTask, built) from question files, or built from the annotations (`built` = True)."""
    from lvlm_hallu.eval.coco import check_image_files
    from lvlm_hallu.eval.compare import PopeTask
    from lvlm_hallu.eval.pope import get_parser

    get_parser(parser_name)
    if questions:
        if n is not None:
            raise EvalError("-n samples images to build POPE questions; --questions files fix them: drop -n")
        images = _need_images(sources)
        task = PopeTask.from_files(_question_files(questions), images, parser=parser_name)
        built = False
    else:
        if sources.instances is None:
            raise EvalError("POPE needs --questions files or an instances file (--instances / --annotations)")
        images = _need_images(sources)
        splits = build_from_annotations(sources, default_n(n, sources), seed, progress=progress)
        task = PopeTask(splits, images, parser=parser_name)
        built = True
    check_image_files(sorted({it.image for it in task.items()}))
    return task, built


def build_from_annotations(sources: Sources, n: int, seed: int, *, progress: bool = True):
    """The three splits from instances + mined captions; only the sampled images' captions are mined."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from lvlm_hallu.eval.chair import CaptionParser, MinedObjects, load_synonyms
    from lvlm_hallu.eval.coco import image_file_names, load_coco
    from lvlm_hallu.eval.pope import build_splits

    coco = load_coco(sources.instances, "instances")
    caps = load_coco(sources.captions, "captions") if sources.captions else None
    parser = CaptionParser(load_synonyms(synonyms_for(sources.synonyms, coco)))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), disable=not progress, transient=True) as bar:
        job = bar.add_task("POPE: reading the objects of sampled images", total=None)
        objects = MinedObjects(coco, caps, parser, on_mine=lambda _id: bar.advance(job))
        return build_splits(objects, n_images=n, seed=seed, image_names=image_file_names(coco))
