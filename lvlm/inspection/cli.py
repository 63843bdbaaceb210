"""`lvlm inspect`: run one request without and with interventions and write the pictures.

Mounted by the root command (lvlm_hallu/cli.py); heavy imports happen inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # an error stays one line at any width


def _layers(text: Optional[str]) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"--layers takes comma-separated layer numbers, got {text!r}") from None


def command(
    prompt: str = typer.Option(..., "--prompt", "-p", help="user prompt"),
    image: Optional[str] = typer.Option(None, "--image", "-i", help="image file (omit for a text-only prompt)"),
    interventions: str = typer.Option("none", "--interventions", help="preset such as 'vhr+var' or a JSON list"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="'shapes' (default), 'tiny-llava', hub id or path"),
    out: Path = typer.Option(Path("runs/inspect"), "--out", "-o",
                             help="output directory (PNGs, data.json, index.html); runs/ is ignored by git"),
    layers: Optional[str] = typer.Option(None, "--layers", help="heat-map layers, e.g. '1,8,16' (default: 4 spread layers)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1),
    dpi: int = typer.Option(90, "--dpi", min=10, help="resolution of the PNGs"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto: cuda when a GPU is available"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16, bfloat16 (default per device)"),
    as_json: bool = typer.Option(False, "--json", help="print both answers and the written files as JSON"),
) -> None:
    """Write pictures of what each intervention sees and changes, with both answers, to one HTML page."""
    from lvlm_hallu import lvlm
    from lvlm_hallu.interventions import InterventionError
    from lvlm_hallu.lvlm.errors import LVLMError
    from lvlm_hallu.lvlm.inspection import check_writable, inspect, write

    from lvlm_hallu.interventions import resolve
    from lvlm_hallu.lvlm.cli import fail, resolve_device
    from lvlm_hallu.lvlm.pipeline import load_image

    try:
        spec = json.loads(interventions) if interventions.lstrip().startswith("[") else interventions
        chosen = _layers(layers)  # fail before loading a model: layers that are not numbers,
        resolve(spec)  # an unknown method or parameter,
        check_writable(out)  # an output folder that cannot be written,
        if image is not None:
            load_image(image)  # an image that cannot be read,
        device = resolve_device(device)  # a device this machine lacks
        pipe = lvlm.load(model, device=device, dtype=dtype)
        with console.status(f"inspecting {pipe.model_id} with {interventions}"):
            insp = inspect(pipe, image, prompt, spec, layers=chosen, max_new_tokens=max_new_tokens)
            paths = write(insp, out, dpi=dpi)
    except (LVLMError, InterventionError, OSError, ValueError) as err:
        raise fail(err) from None
    if as_json:
        print(json.dumps({"without": insp.baseline.text.strip(), "with": insp.intervened.text.strip(),
                          "interventions": str(insp.interventions),
                          "files": {name: str(path) for name, path in paths.items()}}, indent=2))
        return
    print(f"without: {insp.baseline.text.strip()}")
    print(f"with {insp.interventions}: {insp.intervened.text.strip()}")
    for name, path in paths.items():
        console.print(f"[dim]{name}: {path}[/dim]")
