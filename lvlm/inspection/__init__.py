"""Look inside one request: pictures of what each intervention sees and changes.

    insp = inspect(pipe, image, prompt, "vhr+var")   # two runs: without and with the interventions
    for picture in pictures(insp): picture.figure, picture.data
    write(insp, "out/")                              # PNGs, data.json, index.html

The data comes from what the engine computes anyway: the kernels' READOUT of every layer at
prefill, the key classes where VAR marks sinks, VHR's divergences and the intervention report,
CARVE's contrast map (trace.py). Patch grids come from the model family (grids.py); the
pictures are in figures.py and the page in page.py. `lvlm inspect` is the command (cli.py).
"""

from __future__ import annotations

import importlib

# name -> module; imported on first use, so that mounting the command (lvlm_hallu/cli.py) does
# not import matplotlib and torch
_EXPORTS = {
    "inspect": "api", "write": "api",
    "pictures": "figures", "Picture": "figures", "PICTURES": "figures",
    "Inspection": "trace", "Trace": "trace", "collect": "trace", "default_layers": "trace",
    "PatchGrid": "grids", "patch_grid": "grids", "GRIDS": "grids", "GridError": "grids", "InspectError": "grids",
    "check_writable": "page",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lvlm.inspection' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lvlm_hallu.lvlm.inspection.{module}"), name)
