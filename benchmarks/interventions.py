"""Throughput of every intervention vs no intervention, measured side by side in one run.

For each configuration the same batch of requests is generated `--repeats` times (after one
warm-up); the table reports the median prefill time, decode tokens/s and their ratios to the
baseline, plus VTE's prefill speed-up. Run on CPU with the tiny model, or on a GPU at
LLaVA-1.5-7B shapes:

    python benchmarks/interventions.py                                  # tiny-llava, CPU
    python benchmarks/interventions.py --model random-llava-1.5-7b --device cuda --dtype float16 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvlm_hallu import lvlm  # noqa: E402
from lvlm_hallu.interventions import resolve  # noqa: E402


def configs(num_layers: int) -> dict[str, object]:
    half = num_layers // 2
    return {
        "none": None,
        "vhr": "vhr",
        "var": [{"name": "var", "sink_dims": [0, 1], "tau": 2.0}],  # forced sinks: the kernel path always runs
        "pai": "pai",
        "vhr+var+pai": [{"name": "vhr"}, {"name": "var", "sink_dims": [0, 1], "tau": 2.0}, {"name": "pai"}],
        f"vte k={half}": [{"name": "vte", "exit_layer": half}],
        f"vte k={half} masked": [{"name": "vte", "exit_layer": half, "emulate": True}],
        "vte default": "vte",  # the model's default exit (the embedded model: its tuned one)
    }


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def print_table(title: str, columns, cells) -> None:
    """A rich table when rich is installed, else plain text (GPU machines have torch only)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        for row in (columns, *cells):
            print("  ".join(x.rjust(w) for x, w in zip(row, widths)))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in cells:
        table.add_row(*row)
    Console(width=160).print(table)


def run(pipe, requests, repeats: int):
    pipe.generate(requests)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        results = pipe.generate(requests)
        prefill.append(results[0].timings.prefill_ms)
        tokens = sum(r.timings.decode_tokens for r in results)
        ms = max(r.timings.decode_ms for r in results)
        decode.append(1000.0 * tokens / ms if ms else 0.0)
    return statistics.median(prefill), statistics.median(decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="random-llava-1.5-7b only: keep this many 7B-shaped layers (CPU-sized runs)")
    ap.add_argument("--only", default=None, help="comma-separated config names to run (default: all)")
    args = ap.parse_args()

    pipe = lvlm.load(args.model, device=args.device, dtype=args.dtype, text_layers=args.text_layers)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(args.batch)]
    rows = []
    base = None
    chosen = configs(pipe.facts.num_layers)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    for name, spec in chosen.items():
        requests = [
            lvlm.Request("Please describe this image in detail.", im, max_new_tokens=args.new_tokens,
                         interventions=resolve(spec), ignore_eos=True)  # same token count for every config
            for im in images
        ]
        prefill_ms, tok_s = run(pipe, requests, args.repeats)
        base = base or (prefill_ms, tok_s)
        rows.append({"config": name, "prefill_ms": prefill_ms, "decode_tok_s": tok_s,
                     "prefill_speedup": base[0] / prefill_ms, "decode_ratio": tok_s / base[1]})

    layers = f"{pipe.facts.num_layers} layers, " if args.text_layers else ""
    title = (f"{args.model} ({layers}{pipe.model.dtype}) on {machine(args.device)} | batch {args.batch}, "
             f"{args.new_tokens} new tokens, attention backend {pipe.engine.attention_backend}")
    columns = ("config", "prefill ms", "prefill speed-up", "decode tok/s", "decode vs none")
    cells = [(r["config"], f"{r['prefill_ms']:.1f}", f"{r['prefill_speedup']:.2f}x", f"{r['decode_tok_s']:.1f}",
              f"{r['decode_ratio']:.2f}x") for r in rows]
    print_table(title, columns, cells)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.device), "args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
