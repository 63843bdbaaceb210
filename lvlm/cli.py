"""Model commands of the `lvlm` command line: generate, profile, bench, info.

These are plain functions with typer options; the root command (`lvlm_hallu/cli.py`, the top
floor that may import every package) mounts them next to `eval` and `serve`, so that `lvlm/`
never imports the evaluation or the service.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
import typer.core
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # an error stays one line at any terminal width

DEVICE_MAP_HELP = ("split the model across devices (accelerate): auto | balanced | sequential, a JSON object "
                   "{module: device} or a JSON file; see README 'Large models'")
MAX_MEMORY_HELP = "memory per device for --device-map, e.g. '0=20GiB,1=20GiB,cpu=64GiB'"
OFFLOAD_HELP = "folder for weights the device map offloads to disk"
DEVICE_HELP = "cpu, cuda, cuda:N, or auto: cuda when a GPU is available, else cpu (as `lvlm serve`)"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; a CUDA device on a machine without one,
    or a name torch does not know, is refused here (before any model loads)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise typer.BadParameter(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto",
                                 param_hint="'--device'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise typer.BadParameter(f"{device!r} but no CUDA GPU is available here (torch {torch.__version__}); "
                                     "use --device cpu", param_hint="'--device'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise typer.BadParameter(f"{device!r} but this machine has {torch.cuda.device_count()} GPU(s)",
                                     param_hint="'--device'")
    return device


def fail(err: BaseException) -> typer.Exit:
    """Print a caught error as one line on stderr; the caller raises the returned Exit (status 2)."""
    from rich.markup import escape

    console.print("[red]error:[/red] " + escape(" ".join(str(err).split())))
    return typer.Exit(2)


def presets_epilog() -> str:
    """The embedded model's paper and tuned values per method, for `lvlm generate --help`."""
    from lvlm_hallu.lvlm.profile import shipped_presets

    def show(values):
        return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in values.items()) if values else "none"

    lines = ["Presets on the embedded model (shapes): per method, what :paper and :tuned resolve to; "
             "its default is :tuned where a method has tuned values, else :paper."]
    for method, values in shipped_presets("shapes").items():
        lines.append(f"{method}: paper {show(values['paper'])}; tuned {show(values['tuned'])}")
    return "\n\n".join(lines)


class PresetsHelp(typer.core.TyperCommand):
    """A command whose help ends with `presets_epilog()`, computed only when help is shown."""

    def format_help(self, ctx, formatter):
        self.epilog = presets_epilog()
        return super().format_help(ctx, formatter)


def placement(device_map: Optional[str], max_memory: Optional[str], offload_folder: Optional[str]) -> dict:
    """The `lvlm.load` keywords of the --device-map/--max-memory/--offload-folder options."""
    from lvlm_hallu.lvlm.devices import parse_device_map, parse_max_memory

    out = {"device_map": parse_device_map(device_map), "max_memory": parse_max_memory(max_memory),
           "offload_folder": offload_folder}
    return {k: v for k, v in out.items() if v is not None}


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="user prompt"),
    image: Optional[str] = typer.Option(None, "--image", "-i", help="image file (omit for a text-only prompt)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="'shapes' (default), 'tiny-llava', hub id or path"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass, in (0, 1]"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    interventions: Optional[str] = typer.Option(None, "--interventions", help="preset such as 'vhr+var' or JSON list; per method :paper (published/scaled values) or :tuned "
                                                 "(`lvlm tune`), e.g. 'vhr:tuned+pai:paper' or '[{\"name\": \"vhr\", \"preset\": \"tuned\"}]'"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16, bfloat16 (default per device)"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="print tokens as they are decoded"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    offload_folder: Optional[str] = typer.Option(None, "--offload-folder", help=OFFLOAD_HELP),
) -> None:
    """Answer one prompt about one image and print the answer and timings."""
    from lvlm_hallu import lvlm
    from lvlm_hallu.interventions import InterventionError, resolve
    from lvlm_hallu.interventions.inputs import require_image
    from lvlm_hallu.lvlm.errors import LVLMError
    from lvlm_hallu.lvlm.pipeline import load_image

    from lvlm_hallu.lvlm.loader import _dtype

    if not 0.0 < top_p <= 1.0:
        raise typer.BadParameter(f"{top_p} is not in (0, 1]", param_hint="'--top-p'")
    try:
        spec = json.loads(interventions) if interventions and interventions.lstrip().startswith("[") else interventions
        configs = resolve(spec)
        require_image(configs, has_image=image is not None)  # before the load: refusing is instant
        kwargs = placement(device_map, max_memory, offload_folder)
        device = resolve_device(device) if not kwargs.get("device_map") else device
        _dtype(dtype, device)  # an unknown --dtype is refused before the load
        picture = load_image(image) if image else None  # a missing or unreadable image too
        pipe = lvlm.load(model, device=device, dtype=dtype, **kwargs)
        if image is None:
            console.print("[yellow]text-only prompt:[/yellow] no --image given, the model answers from the text alone")
        request = lvlm.Request(
            prompt=prompt,
            image=picture,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop),
            interventions=configs,
        )
        started = []  # the answer is printed without the tokenizer's leading space

        def printer(_row, delta):
            if not started:
                delta = delta.lstrip()
                started.append(bool(delta))
                if not delta:
                    started.clear()
                    return
            print(delta, end="", flush=True)

        printer = printer if stream and not as_json else None
        (result,) = pipe.generate([request], on_token=printer)
    except (LVLMError, InterventionError, OSError, ValueError) as err:
        raise fail(err) from None
    if as_json:
        out = {"model": pipe.model_id, "text": result.text.strip(), "finish_reason": result.finish_reason,
               "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
               "timings": {"prefill_ms": result.timings.prefill_ms, "decode_tokens_per_s": result.timings.decode_tokens_per_s},
               "intervention_report": result.report}
        print(json.dumps(out, indent=2, default=str))
        return
    if printer is None:
        print(result.text.strip())
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
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16, bfloat16 (default per device)"),
    refresh: bool = typer.Option(False, "--refresh", help="recompute even if a cached profile exists"),
    as_json: bool = typer.Option(False, "--json", help="only the profile as JSON on stdout (no status, no cache path)"),
) -> None:
    """Compute and cache a model's intervention profile (sink dimensions, sink counts per layer)."""
    import contextlib

    from lvlm_hallu import lvlm
    from lvlm_hallu.lvlm.profile import cache_path, load_or_compute

    from lvlm_hallu.lvlm.errors import LVLMError

    try:
        pipe = lvlm.load(model, device=resolve_device(device), dtype=dtype)
        with contextlib.nullcontext() if as_json else console.status(f"profiling {pipe.model_id}"):
            data = load_or_compute(pipe, refresh=refresh)
    except (LVLMError, OSError, ValueError) as err:
        raise fail(err) from None
    print(json.dumps(data, indent=2))
    if not as_json:
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
        known = sorted(p.stem for p in script.parent.glob("*.py")) if script.parent.is_dir() else []
        raise fail(f"no benchmark {what!r} (looked for {script}; benchmarks run from a source checkout"
                   + (f"; known: {', '.join(known)})" if known else ")"))
    sys.argv = [str(script), *(args or [])]
    runpy.run_path(str(script), run_name="__main__")


def info(
    model: Optional[str] = typer.Argument(None, help="'shapes' (default), 'tiny-llava', hub id or path"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16, bfloat16 (default per device)"),
    device: str = typer.Option("auto", "--device", help="device whose free memory is the budget: " + DEVICE_HELP),
    tokens: Optional[int] = typer.Option(None, "--tokens", "-t", min=1, help="tokens per row (default: the model context)"),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", min=1, help="refuse (exit 2) unless this many rows fit"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP + " (the budget)"),
    offload_folder: Optional[str] = typer.Option(None, "--offload-folder", help=OFFLOAD_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the estimate as JSON"),
) -> None:
    """Memory estimate before loading: weights, KV cache per 1k tokens, the largest batch that fits."""
    from lvlm_hallu.lvlm import memory
    from lvlm_hallu.lvlm.errors import LVLMError
    from lvlm_hallu.lvlm.loader import _dtype, _first_device

    try:
        kwargs = placement(device_map, max_memory, offload_folder)
        if kwargs.get("device_map") is not None:
            device = _first_device(kwargs["device_map"], kwargs.get("max_memory"))
        else:
            device = resolve_device(device)
        torch_dtype = _dtype(dtype, device)
        est = memory.estimate(memory.config_for(model), dtype=torch_dtype)
        memory.check_load(est, device=device, **kwargs)
        places = memory.budget(device, kwargs.get("max_memory"), spread=kwargs.get("device_map") is not None)
        total = sum(places.values())
        n = tokens or est.max_context
        fits = est.largest_batch(total, n)
        if batch is not None:
            memory.check_batch(est, rows=batch, tokens=n, budget_bytes=total)
    except (LVLMError, FileNotFoundError, ValueError, OSError) as err:
        raise fail(err) from None
    out = {**est.as_dict(), "budget_bytes": places, "tokens_per_row": n, "largest_batch": fits}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    print(f"model        {model or 'default'} ({est.num_layers} decoder layers, {est.dtype})")
    print(f"parameters   {est.parameters / 1e6:,.1f} M = {memory.human(est.weight_bytes)} of weights")
    print(f"KV cache     {out['kv_bytes_per_1k_tokens'] / 2**20:,.2f} MiB per 1k tokens per row "
          f"(keys+values {1000 * est.kv_bytes_per_token / 2**20:,.2f} MiB, key classes {1000 * est.key_class_bytes_per_token / 2**10:,.1f} KiB)")
    print("budget       " + ", ".join(f"{k}: {memory.human(v)}" for k, v in places.items())
          + f" ({1 - memory.HEADROOM:.0%} usable)")
    print(f"batch        at most {fits} rows of {n} tokens")
