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
SYNONYMS_PATH = ASSETS / "synonyms.txt"

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


__all__ = ["ASSETS", "MODEL_DIR", "SYNONYMS_PATH", *sorted(_WORLD_NAMES)]
