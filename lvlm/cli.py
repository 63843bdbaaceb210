"""Model commands of the `lvlm` command line: generate, profile, bench.

These are plain functions with typer options; the root command (`lvlm_hallu/cli.py`, the top
floor that may import every package) mounts them next to `eval` and `serve`, so that `lvlm/`
never imports the evaluation or the service.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="user prompt"),
    image: Optional[str] = typer.Option(None, "--image", "-i", help="image file (omit for a text-only prompt)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="'shapes' (default), 'tiny-llava', hub id or path"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    interventions: Optional[str] = typer.Option(None, "--interventions", help="preset such as 'vhr+var' or JSON list"),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="print tokens as they are decoded"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Answer one prompt about one image and print the answer and timings."""
    import lvlm
    from interventions import InterventionError, resolve
    from lvlm.errors import LVLMError
    from lvlm.pipeline import load_image

    try:
        spec = json.loads(interventions) if interventions and interventions.lstrip().startswith("[") else interventions
        configs = resolve(spec)
        pipe = lvlm.load(model, device=device, dtype=dtype)
        request = lvlm.Request(
            prompt=prompt,
            image=load_image(image) if image else None,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop),
            interventions=configs,
        )
        printer = (lambda _row, delta: print(delta, end="", flush=True)) if stream and not as_json else None
        (result,) = pipe.generate([request], on_token=printer)
    except (LVLMError, InterventionError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if as_json:
        out = {"model": pipe.model_id, "text": result.text, "finish_reason": result.finish_reason,
               "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
               "timings": {"prefill_ms": result.timings.prefill_ms, "decode_tokens_per_s": result.timings.decode_tokens_per_s},
               "intervention_report": result.report}
        print(json.dumps(out, indent=2, default=str))
        return
    if printer is None:
        print(result.text)
    else:
        print()
    t = result.timings
    console.print(
        f"[dim]{pipe.model_id} | prompt {result.prompt_tokens} tok | prefill {t.prefill_ms:.1f} ms | "
        f"{result.completion_tokens} tok at {t.decode_tokens_per_s:.1f} tok/s | {result.finish_reason} | "
        f"attention: {result.report.get('attention_backend')}[/dim]"
    )


def profile(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="'shapes' (default), hub id or path"),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    refresh: bool = typer.Option(False, "--refresh", help="recompute even if a cached profile exists"),
) -> None:
    """Compute and cache a model's intervention profile (sink dimensions, sink counts per layer)."""
    import lvlm
    from lvlm.profile import cache_path, load_or_compute

    pipe = lvlm.load(model, device=device, dtype=dtype)
    with console.status(f"profiling {pipe.model_id}"):
        data = load_or_compute(pipe, refresh=refresh)
    print(json.dumps(data, indent=2))
    console.print(f"[dim]cached at {cache_path(pipe)}[/dim]")


def bench(
    what: str = typer.Argument("interventions", help="interventions | attention | load"),
    args: list[str] = typer.Argument(None, help="arguments passed to the benchmark script"),
) -> None:
    """Run a benchmark script from benchmarks/ (prints side-by-side ratios)."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{what}.py"
    if not script.exists():
        console.print(f"[red]error:[/red] no benchmark {what!r} (looked for {script}; benchmarks run from a source checkout)")
        raise typer.Exit(2)
    sys.argv = [str(script), *(args or [])]
    runpy.run_path(str(script), run_name="__main__")
