"""lmms-eval integration: our engine as an lmms-eval model, and POPE tasks over local files.

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval, the optional extra `lmms-eval`) finds
external models through the Python entry-point group `lmms_eval.models`; pyproject.toml points
it at `manifest` below, so `python -m lmms_eval --model lvlm_hallu --model_args
pretrained=shapes,interventions=vhr+pai` runs `model.LVLMHallu` (our engine, batching and
interventions) with nothing copied into lmms-eval's tree. External tasks come in through
lmms-eval's `--include_path`: `python -m lvlm_hallu.lmms_eval.pope --out DIR` writes the shipped
POPE task definition (tasks/) next to local shapes-world question files. docs/ecosystem.md.

Nothing here imports lmms-eval at import time except `model` (which subclasses its `lmms`).
"""

from __future__ import annotations

MODEL_ID = "lvlm_hallu"  # the name after lmms-eval's --model


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest naming our model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="lvlm_hallu.lmms_eval.model.LVLMHallu")
