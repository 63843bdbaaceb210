"""What a request must carry for its interventions: an image, for every method registered today.

Each method acts on the image's tokens: VHR measures head divergence against an image-removed twin
(arXiv 2412.13949), VAR recycles attention from visual sinks to other image tokens (2503.03321),
PAI amplifies attention on image tokens (2407.21771), VTE removes them after an exit layer
(2411.19628) and CARVE crops the image (2509.06461). On a text-only prompt the first four would be
silent no-ops and CARVE would fail mid-batch, so a text-only request that names one is refused
before it joins a batch, by the service (400) and the command line alike, with the reason.

A future method that also acts on text-only prompts declares `needs_image = False` on its config.
"""

from __future__ import annotations

from typing import Any, Iterable

from lvlm_hallu.interventions.registry import InterventionError


def needs_image(config: Any) -> bool:
    return bool(getattr(type(config), "needs_image", True))


def require_image(configs: Iterable[Any], has_image: bool) -> None:
    """Raise InterventionError naming the methods that cannot act on a text-only prompt."""
    if has_image:
        return
    names = [getattr(c, "name", type(c).__name__) for c in configs if needs_image(c)]
    if names:
        verb = "acts" if len(names) == 1 else "act"
        raise InterventionError(
            f"{'+'.join(names)} {verb} on the image's tokens and this prompt is text-only: "
            "add an image, or drop the intervention", param="interventions")


__all__ = ["needs_image", "require_image"]
