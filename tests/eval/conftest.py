"""Fixtures for the evaluation tests: NLTK data, a shared CHAIR parser, a tiny COCO-format dataset."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _point_nltk_at_shared_data() -> None:
    # The Makefile exports NLTK_DATA=../shared/nltk_data; a bare `pytest` gets the same folder.
    import nltk

    shared = REPO.parent / "shared" / "nltk_data"
    if not os.environ.get("NLTK_DATA") and shared.is_dir() and str(shared) not in nltk.data.path:
        nltk.data.path.insert(0, str(shared))


_point_nltk_at_shared_data()


@pytest.fixture(scope="session")
def parser():
    from lvlm_hallu.eval.chair import CaptionParser

    return CaptionParser()


@dataclass(frozen=True)
class TinyCoco:
    root: Path
    instances: Path
    captions: Path
    images: Path


CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 62, "name": "chair", "supercategory": "furniture"},
    {"id": 67, "name": "dining table", "supercategory": "furniture"},
    {"id": 70, "name": "toilet", "supercategory": "furniture"},
]


def write_tiny_coco(root: Path) -> TinyCoco:
    """Three images: 1 (person, dog; captions add a table), 2 (cat), 3 (toilet, no captions' extras)."""
    from PIL import Image

    images_dir = root / "val2014"
    images_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for imid, color in [(1, "red"), (2, "green"), (3, "blue")]:
        name = f"COCO_val2014_{imid:012d}.jpg"
        Image.new("RGB", (8, 8), color).save(images_dir / name)
        images.append({"id": imid, "file_name": name, "width": 8, "height": 8})
    bbox = [0, 0, 4, 4]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox, "area": 16, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 18, "bbox": bbox, "area": 16, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 18, "bbox": bbox, "area": 16, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 17, "bbox": bbox, "area": 16, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 70, "bbox": bbox, "area": 16, "iscrowd": 0},
    ]
    caps = [
        {"id": 11, "image_id": 1, "caption": "A man and his dog sit at a table."},
        {"id": 12, "image_id": 1, "caption": "Two dogs near a person."},
        {"id": 21, "image_id": 2, "caption": "A kitten sleeps."},
        {"id": 31, "image_id": 3, "caption": "A toilet with the seat up."},
    ]
    instances = root / "instances_val2014.json"
    captions = root / "captions_val2014.json"
    instances.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    captions.write_text(json.dumps({"images": images, "annotations": caps}))
    return TinyCoco(root, instances, captions, images_dir)


@pytest.fixture
def tiny_coco(tmp_path) -> TinyCoco:
    return write_tiny_coco(tmp_path / "coco")


@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory) -> Path:
    """40 shapes-world test scenes in COCO format: images/ and annotations/{instances,captions}_test.json."""
    from lvlm_hallu.lvlm.shapes import build_split

    root = tmp_path_factory.mktemp("shapes-coco")
    build_split(root, "test", 40)
    return root
