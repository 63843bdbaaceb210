"""Models and the generation engine: `lvlm.load(name)` returns a ready `Pipeline`."""

from lvlm_hallu.lvlm.errors import ImageError, LVLMError, PromptError, UnsupportedModelError
from lvlm_hallu.lvlm.types import Request, Result, Timings


def load(name_or_path=None, **kwargs):
    """See `lvlm.loader.load` (imported lazily so `lvlm.types` stays light)."""
    from lvlm_hallu.lvlm.loader import load as _load

    return _load(name_or_path, **kwargs)


__all__ = ["load", "Request", "Result", "Timings", "LVLMError", "ImageError", "PromptError", "UnsupportedModelError"]
