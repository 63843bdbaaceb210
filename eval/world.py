"""Zero-setup data for the embedded model: the shapes world's test split, generated and cached.

`lvlm eval chair|pope|compare --model shapes` with no dataset arguments evaluates on held-out
scenes of the synthetic shapes world (lvlm/shapes/world.py, docs/shapes-model.md) in COCO format,
with the world's CHAIR synonym table. Scene i of a split depends only on (seed, split, i), so the
split is generated once per (seed, size) into `$LVLM_CACHE/shapes-world/` (default
`~/.cache/lvlm`) and reused; it is written to a temporary folder and renamed, so concurrent runs
never see half a split. The report records the split, seed, size and folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLIT = "test"
WORLD_IMAGES = 200  # generated at least this many (about a second); -n samples from them
DEFAULT_N = 20  # images per zero-setup run: a quick look on a CPU (pass -n for more)


@dataclass(frozen=True)
class World:
    """A generated split: images folder, COCO instances and captions files, synonym table."""

    root: Path
    images: Path
    instances: Path
    captions: Path
    synonyms: Path
    seed: int
    size: int
    detailed: bool = False

    def describe(self) -> dict[str, Any]:
        world = "detailed shapes world" if self.detailed else "shapes world"
        return {"generated": f"{world}, {SPLIT} split", "seed": self.seed, "images": self.size,
                "folder": str(self.root)}


def cache_root() -> Path:
    return Path(os.environ.get("LVLM_CACHE", Path.home() / ".cache" / "lvlm")) / "shapes-world"


def shapes_world(n_images: int = WORLD_IMAGES, seed: int | None = None, detailed: bool = False) -> World:
    """The test split with max(n_images, WORLD_IMAGES) scenes, generated on first use.

    `detailed`: the detailed world's scenes (lvlm/shapes/detail.py, docs/shapes-world.md), cached
    beside the basic world's under their own name."""
    from lvlm_hallu.lvlm.shapes import SPLITS, SYNONYMS_PATH, split_builder

    build_split = split_builder("detail" if detailed else "basic")
    seed = SPLITS[SPLIT][1] if seed is None else seed
    size = max(n_images, WORLD_IMAGES)
    root = cache_root() / f"{'detail-' if detailed else ''}{SPLIT}-seed{seed}-n{size}"
    instances = root / "annotations" / f"instances_{SPLIT}.json"
    captions = root / "annotations" / f"captions_{SPLIT}.json"
    if not (instances.is_file() and captions.is_file()):
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            build_split(tmp, SPLIT, size, seed)
            try:
                tmp.rename(root)
            except OSError:  # another run finished first: keep its copy
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return World(root, root / "images", instances, captions, Path(SYNONYMS_PATH), seed, size, detailed)
