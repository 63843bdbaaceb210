"""`lvlm inspect`: run one request without and with interventions and write the pictures.

Mounted by the root command (lvlm_hallu/cli.py); heavy imports happen inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)


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
    out: Path = typer.Option(Path("inspect"), "--out", "-o", help="output directory (PNGs, data.json, index.html)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="heat-map layers, e.g. '1,8,16' (default: 4 spread layers)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    dpi: int = typer.Option(90, "--dpi", help="resolution of the PNGs"),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
) -> None:
    """Write pictures of what each intervention sees and changes, with both answers, to one HTML page."""
    from lvlm_hallu import lvlm
    from lvlm_hallu.interventions import InterventionError
    from lvlm_hallu.lvlm.errors import LVLMError
    from lvlm_hallu.lvlm.inspection import check_writable, inspect, write

    try:
        spec = json.loads(interventions) if interventions.lstrip().startswith("[") else interventions
        check_writable(out)  # fail before loading a model
        pipe = lvlm.load(model, device=device, dtype=dtype)
        with console.status(f"inspecting {pipe.model_id} with {interventions}"):
            insp = inspect(pipe, image, prompt, spec, layers=_layers(layers), max_new_tokens=max_new_tokens)
            paths = write(insp, out, dpi=dpi)
    except (LVLMError, InterventionError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    print(f"without: {insp.baseline.text.strip()}")
    print(f"with {insp.interventions}: {insp.intervened.text.strip()}")
    for name, path in paths.items():
        console.print(f"[dim]{name}: {path}[/dim]")
