"""`lvlm eval` on each device: the CHAIR run a user starts, timed, with what its report records.

Runs `lvlm eval chair --model M --device D --dtype T` on the generated shapes world (no data
arguments) for each device in --devices, each in a fresh folder, and prints per device: items/s,
the batch size used (`--batch-size auto` by default, from the memory estimate), the device and
dtype the report and the run fingerprint record, and CHAIR_s. Exits 1 when a report or fingerprint
does not record the device and dtype asked for (issue 36: eval used to load on the CPU whatever
was asked). A step of `make gpu-check` (benchmarks/gpu_check.py).

    python benchmarks/eval_device.py --devices cpu,cuda --dtype float16 -n 32 --new-tokens 64
    python benchmarks/eval_device.py --devices cpu -n 4 --new-tokens 8     # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(model: str, device: str, dtype: str | None, n: int, tokens: int, batch: str, out: Path) -> dict:
    from typer.testing import CliRunner

    from lvlm_hallu.eval.cli import app

    args = ["chair", "--model", model, "-n", str(n), "--max-new-tokens", str(tokens), "--device", device,
            "--batch-size", batch, "--out", str(out), "--no-progress", *(["--dtype", dtype] if dtype else [])]
    start = time.perf_counter()
    res = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - start
    if res.exit_code != 0:
        raise SystemExit(f"lvlm eval {' '.join(args)} failed ({res.exit_code}):\n{res.output[-3000:]}")
    prov = json.loads((out / "chair_report.json").read_text())["provenance"]
    header = json.loads((out / "chair_none.jsonl").read_text().splitlines()[0])["fingerprint"]
    metrics = json.loads((out / "chair_report.json").read_text())["results"][0]["metrics"]
    return {"device": device, "seconds": seconds, "items_per_s": n / seconds, "batch": prov["extra"]["batch_size"],
            "report_device": prov["extra"].get("device"), "report_dtype": prov["dtype"],
            "fingerprint": header.get("placement"), "CHAIR_s": metrics["CHAIR_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--dtype", default=None, help="one dtype for every device [default: the device's default]")
    ap.add_argument("-n", type=int, default=32, help="images")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", default="auto")
    args = ap.parse_args()
    shared = next((p for p in (ROOT.parent / "shared" / "nltk_data", ROOT / "shared" / "nltk_data") if p.is_dir()), None)
    if shared is not None:
        os.environ.setdefault("NLTK_DATA", str(shared))
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="eval-device-") as tmp:
        os.environ.setdefault("LVLM_CACHE", str(Path(tmp) / "cache"))  # the shapes world and image hashes
        if args.model == "shapes":  # generated once, before any timing
            from lvlm_hallu.eval.world import shapes_world

            shapes_world(args.n)
        for device in args.devices.split(","):
            row = run_one(args.model, device, args.dtype, args.n, args.new_tokens, args.batch, Path(tmp) / device)
            want_dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
            good = (row["report_device"].startswith(device) and row["report_dtype"] == want_dtype
                    and row["fingerprint"] == {"device": device, "dtype": want_dtype, "device_map": None})
            ok = ok and good
            rows.append({**row, "recorded": "ok" if good else "MISMATCH"})
    print(f"{args.model}, {args.n} images, {args.new_tokens} new tokens, batch {args.batch}")
    print(f"{'device':8} {'s':>7} {'items/s':>8} {'batch':>5} {'report':>16} {'CHAIR_s':>8} recorded")
    for r in rows:
        print(f"{r['device']:8} {r['seconds']:7.1f} {r['items_per_s']:8.2f} {r['batch']:>5} "
              f"{r['report_device'] + '/' + r['report_dtype']:>16} {r['CHAIR_s']:8.2f} {r['recorded']}")
    if len(rows) == 2:
        print(f"speed-up {rows[1]['device']} / {rows[0]['device']}: {rows[1]['items_per_s'] / rows[0]['items_per_s']:.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
