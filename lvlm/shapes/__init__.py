"""The embedded default model and its synthetic shapes world (docs/shapes-model.md).

`MODEL_DIR` holds a Hugging Face LLaVA checkpoint (LlavaForConditionalGeneration + LlavaProcessor)
trained by `python -m lvlm_hallu.lvlm.shapes.train`; `SYNONYMS_PATH` is the CHAIR synonym table of the
world's object words; the world API generates seeded scenes with COCO annotations.
"""

from importlib import import_module
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
DETAIL_MODEL_DIR = ASSETS / "model-detail"
SYNONYMS_PATH = ASSETS / "synonyms.txt"
# The embedded models by name: their folder and the world they were trained on ("basic": world.py,
# one-sentence captions, docs/shapes-model.md; "detail": detail.py, 40-120 word descriptions,
# docs/shapes-world.md).
EMBEDDED: dict[str, tuple[Path, str]] = {"shapes": (MODEL_DIR, "basic"), "shapes-detail": (DETAIL_MODEL_DIR, "detail")}


def embedded_dir(name: str) -> Path | None:
    """The folder of the embedded model `name`, or None if `name` is not one of EMBEDDED."""
    return EMBEDDED[name][0] if name in EMBEDDED else None


_WORLD_MODULES = {"basic": "world", "detail": "detail"}  # EMBEDDED's world names -> their modules


def split_builder(world_name: str):
    """`build_split(out, split, n, seed=None)` of a world named as in EMBEDDED ("basic" or "detail")."""
    return import_module(f"{__name__}.{_WORLD_MODULES[world_name]}").build_split


def missing_message(name: str) -> str:
    """Why the embedded model `name` cannot load: its folder has no weights, and how to make them."""
    folder, world_name = EMBEDDED[name]
    how = ("train it with `python -m lvlm_hallu.lvlm.shapes.train`" if world_name == "basic"
           else "train it as docs/shapes-world.md says")
    return f"the embedded model {name!r} is missing at {folder}; {how}"

# The world's names are read from lvlm.shapes.world on first use (PEP 562), not imported here:
# `python -m lvlm_hallu.lvlm.shapes.world` (and .train) would otherwise find the module already imported by
# this package and warn that running it may be unpredictable.
_WORLD_NAMES = frozenset({
    "CATEGORIES", "CATEGORY_IDS", "IMAGE_SIZE", "PAIRS", "PARTNER", "SPLITS", "Instance", "Scene",
    "build_split", "make_scene",
})


def __getattr__(name: str) -> Any:
    if name in _WORLD_NAMES:
        return getattr(import_module("lvlm_hallu.lvlm.shapes.world"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ASSETS", "DETAIL_MODEL_DIR", "EMBEDDED", "MODEL_DIR", "SYNONYMS_PATH", "embedded_dir", "missing_message", "split_builder", *sorted(_WORLD_NAMES)]
