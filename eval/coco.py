"""COCO annotations for the hallucination metrics: loading, image lists, seeded sampling, id checks.

CHAIR (Rohrbach et al. 2018, arXiv:1809.02156) and POPE (Li et al. 2023, arXiv:2305.10355) both
read MSCOCO `instances_*.json` and `captions_*.json`; we load them with pycocotools (the field's
own reader) so our ground truth is the one every published number used. The papers' protocol
samples 500 val2014 images; here the sample is seeded and the seed recorded (docs/eval.md,
"Protocol used by papers"). Image ids are integers: a string id is rejected, never looked up as a
missing key (docs/eval.md, "Ground truth per image").
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pycocotools.coco import COCO

from lvlm_hallu.eval.errors import AnnotationError, ImageIdError

# File names used by the COCO 2014 release; --annotations DIR prefers these, then any other
# naming (val2017, the shapes world's test split ...): instances_*.json / captions_*.json.
INSTANCES_FILE = "instances_val2014.json"
CAPTIONS_FILE = "captions_val2014.json"
KINDS = ("instances", "captions")


def annotation_kind(dataset: Mapping) -> str | None:
    """"instances" (categories + annotations with category_id), "captions", or None."""
    anns = dataset.get("annotations") or []
    first = anns[0] if anns and isinstance(anns[0], dict) else {}
    if "caption" in first:
        return "captions"
    if "categories" in dataset and ("category_id" in first or not anns):
        return "instances"
    return None


def load_coco(path: str | Path, kind: str | None = None) -> COCO:
    """Load an instances or captions file with pycocotools (its progress prints are silenced).

    `kind` ("instances" or "captions") checks the file holds that kind of annotation, so a captions
    file given as ground-truth instances is an error naming both, not a wrong score.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"COCO annotation file not found: {path}")
    # pycocotools prints "loading annotations into memory..." to stdout; our CLI owns stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco = COCO(str(path))
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as err:
            raise AnnotationError(f"{path} is not a COCO annotation file: {err}") from err
    if "images" not in coco.dataset:
        raise AnnotationError(f"{path} is not a COCO annotation file: it has no 'images' list")
    if kind is not None:
        found = annotation_kind(coco.dataset)
        if found != kind:
            what = f"a COCO {found} file" if found else "neither an instances nor a captions file"
            raise AnnotationError(f"{path} is {what}; a COCO {kind} file ({kind}_*.json) is needed here")
    return coco


def _as_coco(source: COCO | str | Path) -> COCO:
    return source if isinstance(source, COCO) else load_coco(source)


def image_ids(coco: COCO) -> list[int]:
    """All image ids of a COCO file, sorted (the images list, annotated or not)."""
    return sorted(int(i) for i in coco.getImgIds())


def image_file_names(coco: COCO) -> dict[int, str]:
    """image id -> file name as recorded in the COCO file (e.g. COCO_val2014_000000000042.jpg)."""
    return {int(i): img["file_name"] for i, img in coco.imgs.items()}


def instance_categories(coco: COCO) -> dict[int, list[str]]:
    """image id -> category name of every instance annotation (repeats kept, order of the file).

    Every image of the file gets an entry, possibly empty: an image with no instances is a valid
    image with no instance objects, not an unknown id.
    """
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    out: dict[int, list[str]] = {int(i): [] for i in coco.getImgIds()}
    for ann in coco.dataset.get("annotations", []):
        cat = ann.get("category_id")
        if cat not in names:
            raise AnnotationError(f"annotation {ann.get('id')} has unknown category_id {cat}")
        out.setdefault(int(ann["image_id"]), []).append(names[cat])
    return out


def captions_by_image(coco: COCO) -> dict[int, list[str]]:
    """image id -> human captions (captions file), every image of the file present."""
    out: dict[int, list[str]] = {int(i): [] for i in coco.getImgIds()}
    for ann in coco.dataset.get("annotations", []):
        if "caption" not in ann:
            raise AnnotationError("captions file expected: an annotation has no 'caption' field")
        out.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    return out


def check_image_id(image_id: object) -> int:
    """Return `image_id` if it is an integer (bool excluded), else raise ImageIdError."""
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        hint = " (JSON ids must be numbers, not strings)" if isinstance(image_id, str) else ""
        raise ImageIdError(f"image id {image_id!r} is a {type(image_id).__name__}, not an integer{hint}")
    return image_id


def validate_image_ids(ids: Iterable[object], known: Iterable[int] | Mapping[int, object]) -> list[int]:
    """Check that every id is an integer present in `known`; return them as a list (order kept)."""
    known_set = set(known.keys() if isinstance(known, Mapping) else known)
    out = [check_image_id(i) for i in ids]
    missing = [i for i in out if i not in known_set]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ImageIdError(f"{len(missing)} image id(s) not in the ground truth: {shown}")
    return out


def sample_image_ids(ids: Sequence[int], n: int, seed: int) -> list[int]:
    """`n` ids drawn without replacement with `random.Random(seed)`, from the sorted id list.

    Sorting first makes the sample depend only on the set of ids and the seed, not on file order.
    """
    pool = sorted(set(check_image_id(i) for i in ids))
    if n > len(pool):
        raise AnnotationError(f"cannot sample {n} images from {len(pool)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return random.Random(seed).sample(pool, n)


def read_utf8_text(path: str | Path) -> str:
    """A text file's contents, or an AnnotationError if it is not UTF-8. Split JSON lines on "\n" only
    (`str.splitlines` would also cut a JSON record at a raw U+2028 inside a string)."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err})") from err


def read_image_list(path: str | Path) -> list[int]:
    """Image ids from a JSON list or a text file with one id per line."""
    text = read_utf8_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            ids = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ImageIdError(f"{path}: not a JSON list of image ids: {err}") from err
        if not isinstance(ids, list):
            raise ImageIdError(f"{path}: not a JSON list of image ids")
    else:
        ids = []
        for n, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line:
                continue
            try:
                ids.append(int(line))
            except ValueError as err:
                raise ImageIdError(f"{path}:{n}: {line!r} is not an integer image id") from err
    if not ids:
        raise ImageIdError(f"{path}: no image ids")
    return [check_image_id(i) for i in ids]


def write_image_list(path: str | Path, ids: Sequence[int]) -> None:
    from lvlm_hallu.eval.report import atomic_write_text

    atomic_write_text(path, "".join(f"{check_image_id(i)}\n" for i in ids))


def image_ids_hash(ids: Iterable[int]) -> str:
    """sha256 of the sorted ids (comma-joined): the same image set gives the same hash."""
    joined = ",".join(str(i) for i in sorted(ids))
    return hashlib.sha256(joined.encode()).hexdigest()


def _find(root: Path, kind: str) -> Path | None:
    """The `kind` file of an annotations folder: the 2014 name, else the only `kind`_*.json."""
    for folder in (root, root / "annotations"):
        preferred = folder / (INSTANCES_FILE if kind == "instances" else CAPTIONS_FILE)
        if preferred.is_file():
            return preferred
        found = sorted(folder.glob(f"{kind}_*.json"))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise AnnotationError(f"{folder} holds several {kind} files ({names}); choose one with --{kind}")
        if found:
            return found[0]
    return None


def resolve_annotation_paths(
    annotations: str | Path | None, instances: str | Path | None, captions: str | Path | None
) -> tuple[Path | None, Path | None]:
    """Explicit --instances/--captions win; otherwise look in --annotations DIR (or DIR/annotations)
    for instances_*.json / captions_*.json: the 2014 names first, then any single other naming
    (val2017, the shapes world's test split). A folder with neither is an error."""
    inst = Path(instances) if instances else None
    caps = Path(captions) if captions else None
    if annotations:
        root = Path(annotations)
        if not root.is_dir():
            raise AnnotationError(f"--annotations {root}: not a folder")
        inst = inst or _find(root, "instances")
        caps = caps or _find(root, "captions")
        if inst is None and caps is None:
            raise AnnotationError(
                f"--annotations {root}: no instances_*.json or captions_*.json in it or in its annotations/ folder"
            )
    return inst, caps


def check_image_files(files: Iterable[str | Path], what: str = "image") -> None:
    """Raise AnnotationError listing the missing, then the unreadable files (all of them are
    checked before any model runs, so a truncated download does not stop a run midway)."""
    from PIL import Image, UnidentifiedImageError

    def shown(paths: list[str]) -> str:  # the first five names
        return ", ".join(Path(m).name for m in paths[:5]) + (" ..." if len(paths) > 5 else "")

    files = list(files)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        folders = sorted({str(Path(m).parent) for m in missing})
        raise AnnotationError(
            f"{len(missing)} of {len(files)} {what} files are missing (in {', '.join(folders[:3])}): {shown(missing)}; "
            "check --images"
        )
    unreadable = []
    for f in files:
        try:
            with Image.open(f) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            unreadable.append(str(f))
    if unreadable:
        raise AnnotationError(f"{len(unreadable)} of {len(files)} {what} files are not readable images: {shown(unreadable)}")
