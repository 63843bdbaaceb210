"""The embedded default model and its synthetic shapes world (docs/shapes-model.md).

`MODEL_DIR` holds a Hugging Face LLaVA checkpoint (LlavaForConditionalGeneration + LlavaProcessor)
trained by `python -m lvlm.shapes.train`; `SYNONYMS_PATH` is the CHAIR synonym table of the
world's object words; the world API generates seeded scenes with COCO annotations.
"""

from pathlib import Path

from lvlm.shapes.world import (
    CATEGORIES,
    CATEGORY_IDS,
    IMAGE_SIZE,
    PAIRS,
    PARTNER,
    SPLITS,
    Instance,
    Scene,
    build_split,
    make_scene,
)

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
SYNONYMS_PATH = ASSETS / "synonyms.txt"

__all__ = [
    "ASSETS", "MODEL_DIR", "SYNONYMS_PATH", "CATEGORIES", "CATEGORY_IDS", "IMAGE_SIZE", "PAIRS",
    "PARTNER", "SPLITS", "Instance", "Scene", "build_split", "make_scene",
]
