"""The inspection API: `inspect` runs and collects, `write` draws and writes (package docstring)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lvlm_hallu.lvlm.inspection.figures import pictures
from lvlm_hallu.lvlm.inspection.grids import InspectError
from lvlm_hallu.lvlm.inspection.page import check_writable
from lvlm_hallu.lvlm.inspection.page import write as write_page
from lvlm_hallu.lvlm.inspection.trace import Inspection, collect


def inspect(pipe: Any, image: Any, prompt: str, interventions: Any = "none", *,
            layers: tuple[int, ...] | None = None, max_new_tokens: int = 32) -> Inspection:
    """Run the request without and with `interventions` (a spec for `interventions.resolve`)
    and collect the data of every picture. `image` is a path, bytes, a PIL image, or None for a
    text-only prompt (then only methods that act without an image, none today, may be named:
    `interventions.inputs.require_image`)."""
    from lvlm_hallu.interventions import resolve
    from lvlm_hallu.interventions.inputs import require_image
    from lvlm_hallu.lvlm.errors import ImageError, LVLMError
    from lvlm_hallu.lvlm.pipeline import load_image
    from lvlm_hallu.lvlm.types import Request

    configs = resolve(interventions)
    spec = interventions if isinstance(interventions, str) else "+".join(c.name for c in configs)
    require_image(configs, image is not None)  # every method acts on the image's tokens
    if isinstance(image, (list, tuple)):
        raise ImageError(f"an inspection takes one image, got {len(image)}")
    if image is not None:
        image = load_image(image)
    request = Request(prompt, image, max_new_tokens=max_new_tokens, interventions=configs)
    try:
        pipe.prepare([request])
    except LVLMError:
        raise
    except (ValueError, RuntimeError, IndexError, TypeError) as err:
        if image is None:
            raise
        raise ImageError(f"the {pipe.adapter.family} processor cannot take this {image.width}x{image.height} "
                         f"image: {err}") from err
    return collect(pipe, request, spec or "none", layers=layers)


def write(insp: Inspection, out: str | Path, *, dpi: int = 90) -> dict[str, Path]:
    """Draw every picture and write PNGs, data.json and index.html into `out`."""
    check_writable(out)
    return write_page(insp, pictures(insp), out, dpi=dpi)
