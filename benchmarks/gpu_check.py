"""The whole GPU validation in one command (`make gpu-check`), for the rare short GPU loan.

1. Kernel checks: the fused Triton kernels in fp16 and bf16 against the fp32 PyTorch reference
   (`kernels/reference.py`, on the same rounded inputs) at LLaVA-1.5-7B attention shapes
   (32 heads, head_dim 128; 600-2,900 keys; batch 1-8, left-padded rows; one grouped-query
   shape), for every combination of the five edit flags (32), prefill and decode. The shapes
   are chosen to reach every launch variant: split and unsplit VAR rows, decode with one split
   (no reduction) and with several, GQA decode. Tolerances (max |error| against the
   reference): fp16 atol = rtol = 1e-2, bf16 3e-2 (fp16/bf16 tiles feed the tensor cores and p
   is rounded before P·V); read-out atol 1e-4, rtol 1e-2.
   The checks run in worker processes (one CUDA context each) so that Triton compiles the
   ~300 kernel variants in parallel on the machine's cores.
2. `benchmarks/attention.py --quick`: Triton vs SDPA (flash) vs fp16 eager.
3. `benchmarks/interventions.py --model random-llava-1.5-7b --device cuda --dtype float16`.
4. `benchmarks/eval_device.py`: `lvlm eval chair` on the shapes model on the CPU and on CUDA
   (`--batch-size auto`): items/s of each, and a failure if a report or run fingerprint does not
   record the device and dtype the run was given.
5. `pytest tests/kernels` on CUDA, when pytest is installed and the time budget allows.

Everything goes to a Markdown file under docs/ (default docs/gpu-check.md) with the GPU's name,
then the command exits non-zero if a check failed. Needs torch, triton and transformers only
(no Ray, no network, no pytest). Without a GPU it runs in a dry mode: it says which CUDA parts
it skips, runs the same check harness on the Triton interpreter at tiny shapes (plain and all
flags), and writes nothing unless --out is given.

    python benchmarks/gpu_check.py                 # on a GPU machine (about 5-8 min on one H100)
    python benchmarks/gpu_check.py --dry-run       # anywhere: the CPU part only
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also in the spawned workers, which import this module
FLAGS = ("head_scale", "logit_boost", "sink_redist", "key_drop", "readout")
COMBOS = [tuple(f for f, on in zip(FLAGS, bits) if on) for bits in itertools.product((False, True), repeat=5)]
TOL = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-4}
READOUT_TOL = dict(atol=1e-4, rtol=1e-2)
# (phase, B, H, Hkv, N): LLaVA-1.5-7B heads; batch rows b > 0 are left-padded
GPU_SHAPES = [
    ("prefill", 1, 32, 32, 640),  # a LLaVA prompt: 29 text rows after the image, whose VAR row
    #                               block (32 programs) is split over the keys
    ("prefill", 1, 32, 32, 2900),  # long text after the image: many VAR row blocks, unsplit
    ("prefill", 4, 32, 32, 1200),
    ("prefill", 8, 32, 32, 600),
    ("prefill", 2, 32, 8, 700),  # grouped-query attention
    ("decode", 1, 32, 32, 2900),  # several splits + reduction
    ("decode", 8, 32, 32, 600),  # one split, epilogue in the kernel
    ("decode", 8, 32, 32, 2900),
    ("decode", 2, 32, 8, 700),  # GQA: one program per key/value head serves 4 query heads
]
DRY_SHAPES = [("prefill", 2, 4, 2, 40), ("decode", 2, 4, 2, 40)]
IMAGE_START, IMAGE_TOKENS = 35, 576


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(phase, B, H, Hkv, N, flags, dtype, device, seed=0):
    """Inputs like a LLaVA prompt per row: BOS sink at the row's start, then system text, the
    image keys (4 of them visual sinks), the question; one dropped text key; row b > 0 padded."""
    import torch

    from lvlm_hallu.kernels.edits import KEY_DROP, KEY_SINK, KEY_VISUAL, AttentionEdits

    g = torch.Generator(device="cpu").manual_seed(seed)
    D = 128 if N > 64 else 16
    Tq = 1 if phase == "decode" else N
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    kv_start = torch.tensor([(37 * b) % 101 if N > 64 else b for b in range(B)], dtype=torch.int32)
    key_class = torch.zeros(B, N, dtype=torch.uint8)
    image_end = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        s = int(kv_start[b])
        img0 = s + (IMAGE_START if N > 64 else 2)
        n_img = min(IMAGE_TOKENS if N > 64 else 16, N - img0 - 4)
        key_class[b, s] = KEY_SINK
        key_class[b, img0 : img0 + n_img] = KEY_VISUAL
        key_class[b, img0 + torch.arange(4) * (n_img // 4)] |= KEY_SINK
        key_class[b, img0 + n_img + 1] |= KEY_DROP
        image_end[b] = img0 + n_img
        k[b, :, (key_class[b] & KEY_SINK) != 0] *= 2.5  # sinks draw attention
    fields = dict(key_class=key_class, key_drop="key_drop" in flags, readout="readout" in flags)
    if "head_scale" in flags:
        fields["head_scale"] = 0.5 + torch.rand(B, H, generator=g)
    if "logit_boost" in flags:
        fields["boost_alpha"] = 0.5 * torch.rand(B, H, generator=g)
    if "sink_redist" in flags:
        fields.update(
            sink_p=torch.tensor([0.4, 0.8, 0.0, 0.6]).repeat(B, H // 4),
            sink_rho=torch.full((B,), 0.5),
            sink_min_visual=torch.full((B,), 0.2),
            sink_query_start=image_end if phase == "prefill" else torch.zeros(B, dtype=torch.int32),
        )
    edits = AttentionEdits(**fields) if flags else None
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    if edits is not None:
        edits = AttentionEdits(**{n: (t.to(device) if isinstance(t, torch.Tensor) else t)
                                  for n, t in edits.__dict__.items()})
    return q, k, v, kv_start.to(device), edits, D**-0.5


def check_one(phase, B, H, Hkv, N, flags, dtype_name):
    """One kernel call against the fp32 reference: (max |o error|, readout error, ok)."""
    import torch

    from lvlm_hallu.kernels import reference
    from lvlm_hallu.kernels import triton_attention as ta

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    q, k, v, kv_start, edits, scale = build(phase, B, H, Hkv, N, flags, dtype, device)
    fn = ta.attention_decode if phase == "decode" else ta.attention_prefill
    o, r = fn(q, k, v, kv_start, scale=scale, edits=edits)
    o_ref, r_ref = reference.attention(q, k, v, kv_start, scale=scale, edits=edits)
    tol = TOL[dtype_name]
    err = (o.float() - o_ref.float()).abs()
    ok = bool((err <= tol + tol * o_ref.float().abs()).all()) and bool(torch.isfinite(o).all())
    r_err = float("nan")
    if r_ref is not None:
        r_err = float((r - r_ref).abs().max())
        ok = ok and bool(((r - r_ref).abs() <= READOUT_TOL["atol"] + READOUT_TOL["rtol"] * r_ref.abs()).all())
    elif r is not None:
        ok = False
    return float(err.max()), r_err, ok


def worker(jobs):
    """Runs in its own process (own CUDA context, own Triton compiles); returns result rows."""
    rows = []
    for job in jobs:
        try:
            rows.append((*job, *check_one(*job)))
        except Exception as e:  # a crash is a failed check, with its message in the table
            rows.append((*job, float("nan"), float("nan"), f"error: {type(e).__name__}: {e}"[:200]))
    return rows


def kernel_checks(shapes, dtypes, workers):
    import multiprocessing as mp

    jobs = [(phase, B, H, Hkv, N, flags, dt) for dt in dtypes for flags in COMBOS for (phase, B, H, Hkv, N) in shapes]
    log(f"kernel checks: {len(jobs)} calls ({len(COMBOS)} flag combinations x {len(shapes)} shapes x "
        f"{len(dtypes)} dtypes) in {workers} worker process(es)")
    # Each worker takes whole (dtype, flags) groups: the kernel variants of a group compile once,
    # in one process, while the other processes compile theirs.
    groups = [[j for j in jobs if (j[6], j[5]) == key] for key in dict.fromkeys((j[6], j[5]) for j in jobs)]
    slices = [[j for grp in groups[i::workers] for j in grp] for i in range(workers)]
    if workers == 1:
        return worker(jobs)
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(worker, slices)
    return [row for part in parts for row in part]


def check_table(rows) -> tuple[str, int]:
    """Markdown: one line per (phase, shape, dtype) with the worst error over the 32 combinations,
    then every failed call."""
    out = ["| phase | B | H | Hkv | keys | dtype | calls | max abs err (o) | max abs err (read-out) | failed |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row[0], *row[1:5], row[6]), []).append(row)
    failed = [row for row in rows if row[-1] is not True]
    for key, grp in groups.items():
        phase, B, H, Hkv, N, dt = key
        o_err = max((r[7] for r in grp), default=float("nan"))
        r_errs = [r[8] for r in grp if r[8] == r[8]]
        bad = sum(1 for r in grp if r[-1] is not True)
        out.append(f"| {phase} | {B} | {H} | {Hkv} | {N} | {dt} | {len(grp)} | {o_err:.2e} | "
                   f"{max(r_errs):.2e} | {bad} |" if r_errs else
                   f"| {phase} | {B} | {H} | {Hkv} | {N} | {dt} | {len(grp)} | {o_err:.2e} | - | {bad} |")
    if failed:
        out.append("\nFailed calls:\n")
        for r in failed:
            out.append(f"- {r[0]} B={r[1]} H={r[2]} Hkv={r[3]} N={r[4]} {r[6]} flags={'+'.join(r[5]) or 'plain'}: "
                       f"o err {r[7]:.2e}, read-out err {r[8]:.2e} {'' if r[-1] is False else r[-1]}")
    return "\n".join(out), len(failed)


def run_step(title, cmd, timeout):
    log(f"{title}: {' '.join(cmd)}")
    start = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)}
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        text, ok = p.stdout + (f"\n[stderr]\n{p.stderr[-3000:]}" if p.returncode else ""), p.returncode == 0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, ok = f"{out}\n[timed out after {timeout} s]", False
    log(f"{title}: {'done' if ok else 'FAILED'} in {time.time() - start:.0f} s")
    print(text, flush=True)
    return text, ok


# -- what the lent machine has -------------------------------------------------------------------
# The lent GPU machines' image (.library/device/KINDS.md, 2026-11): Python 3.12, torch 2.11,
# triton 3.6, transformers 5.17, no FastAPI/pydantic. The kernel checks need torch and triton only.
# The engine needs the transformers version pyproject.toml names (5.17's decoder layers call the
# cache `past_key_values`, and lvlm.engine refuses them), and the in-process load benchmark needs
# the service's web stack. `make gpu-wheels` downloads those wheels into .whl/ here; a device call
# that carries .whl gets them installed into a temporary folder by this script.
CARRIED = ("transformers", "fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection", "opentelemetry-api")  # with what they need beyond the image's packages
SERVING = ("fastapi", "starlette", "pydantic", "httpx", "prometheus_client")


def transformers_range() -> str:
    """The transformers specifier of pyproject.toml's dependencies (e.g. ">=5.24,<5.25")."""
    import re

    m = re.search(r'"transformers\s*([^";]*)', (ROOT / "pyproject.toml").read_text())
    return m.group(1).strip() if m else ""


def stack_problems() -> dict[str, str]:
    """{"engine": why, "serving": why} for what this Python lacks; empty when it has everything."""
    import importlib.util

    problems = {}
    try:
        import transformers
        from packaging.specifiers import SpecifierSet

        spec = transformers_range()
        if spec and transformers.__version__ not in SpecifierSet(spec):
            problems["engine"] = f"transformers {transformers.__version__} is outside pyproject.toml's {spec}"
    except ImportError as e:
        problems["engine"] = f"cannot import {e.name}"
    missing = [m for m in SERVING if importlib.util.find_spec(m) is None]
    if missing:
        problems["serving"] = f"missing {', '.join(missing)}"
    return problems


def wheel_list() -> list[str]:
    """`name==version` of the packages `make gpu-wheels` downloads: this environment's versions."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in CARRIED]


def use_carried_wheels(wheels: Path) -> dict[str, str]:
    """When this Python lacks what the engine or the load benchmark needs and `wheels` holds
    wheels, install them into a temporary folder and run this script again with it first on
    PYTHONPATH (once: LVLM_GPU_SITE marks the second run). Returns what is still missing."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    problems = stack_problems()
    if not problems or not found or os.environ.get("LVLM_GPU_SITE"):
        return problems
    import tempfile

    site = Path(tempfile.gettempdir()) / "lvlm-gpu-site"
    log(f"{'; '.join(problems.values())}: installing {len(found)} carried wheel(s) from {wheels} into {site}")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)],
                       capture_output=True, text=True)
    if p.returncode:
        log(f"pip could not install the carried wheels (the engine steps will be skipped):\n{p.stderr[-2000:]}")
        return problems
    path = os.pathsep.join(x for x in (str(site), str(ROOT), os.environ.get("PYTHONPATH")) if x)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONPATH": path, "LVLM_GPU_SITE": str(site)})


# -- the steps after the kernel checks, in priority order ------------------------------------------
@dataclass(frozen=True)
class Step:
    name: str
    title: str
    gpu: tuple[str, ...]  # arguments after the Python executable, on the GPU
    cap_s: int  # the most it may take of the budget
    dry: tuple[str, ...] | None = None  # a small CPU run of the same script (dry run), if any
    needs: tuple[str, ...] = ()  # "engine", "serving"


STEPS = (
    Step("attention", "benchmarks/attention.py --quick (#14: Triton vs SDPA-flash vs fp16 eager)",
         ("benchmarks/attention.py", "--quick"), 240),
    Step("interventions", "benchmarks/interventions.py (#14: random-llava-1.5-7b, fp16, batch 8)",
         ("benchmarks/interventions.py", "--model", "random-llava-1.5-7b", "--device", "cuda", "--dtype", "float16",
          "--batch", "8", "--new-tokens", "32", "--repeats", "2"), 300,
         ("benchmarks/interventions.py", "--model", "tiny-llava", "--batch", "2", "--new-tokens", "4", "--repeats", "1"),
         ("engine",)),
    Step("decode", "benchmarks/decode.py (#13: step time from token 16 to 512 at 576 image tokens; engine vs "
         "generate at batch 1 and 8; random-llava-1.5-7b, fp16)",
         ("benchmarks/decode.py", "--model", "random-llava-1.5-7b", "--device", "cuda", "--dtype", "float16"), 180,
         ("benchmarks/decode.py", "--width", "64", "--layers", "1", "--new-tokens", "20", "--throughput-tokens", "4",
          "--batches", "1,2", "--repeats", "1"),
         ("engine",)),
    Step("load", "benchmarks/load.py --in-process (#13: static vs continuous batching, shapes model on the GPU, "
         "mixed interventions, answers of 64-128 tokens)",
         ("benchmarks/load.py", "--in-process", "--model", "shapes", "--device", "cuda", "--schedulers",
          "static,continuous,static,continuous", "--concurrency", "32,8", "--requests", "64", "--answer-tokens",
          "64-128"), 240,
         ("benchmarks/load.py", "--in-process", "--model", "tiny-llava", "--schedulers", "static,continuous",
          "--concurrency", "4", "--requests", "6", "--answer-tokens", "2-5"),
         ("engine", "serving")),
    Step("eval", "benchmarks/eval_device.py (#36: lvlm eval chair on cpu and cuda, shapes model, batch auto: items/s, "
         "and the device and dtype its report and fingerprint record)",
         ("benchmarks/eval_device.py", "--devices", "cpu,cuda", "-n", "32", "--new-tokens", "64"), 240,
         ("benchmarks/eval_device.py", "--devices", "cpu", "-n", "4", "--new-tokens", "8"),
         ("engine",)),
    Step("tests", "pytest tests/kernels (CUDA)",
         ("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"), 600, None, ("engine", "pytest")),
)


def run_steps(steps, dry: bool, budget_s: float, start: float, problems: dict[str, str]) -> tuple[list[str], bool]:
    """Each step in turn within what is left of the budget; a step whose needs this Python lacks
    is skipped with the reason (and counts as not passed)."""
    import importlib.util

    sections, ok = [], True
    for step in steps:
        argv = step.dry if dry else step.gpu
        if argv is None:
            continue
        why = [problems[n] for n in step.needs if n in problems]
        if "pytest" in step.needs and importlib.util.find_spec("pytest") is None:
            why.append("pytest is not installed")
        left = budget_s - (time.time() - start) - 15
        if not why and left < 60:
            why.append(f"only {max(0, left):.0f} s of the budget left (run it alone: --only {step.name})")
        if why:
            log(f"skipping {step.name}: {'; '.join(why)}")
            sections.append(f"## {step.title}\n\nSkipped: {'; '.join(why)}.")
            ok = False
            continue
        text, step_ok = run_step(step.name, [sys.executable, *argv], int(min(step.cap_s, left)))
        sections.append(f"## {step.title}{' (dry run: small CPU version)' if dry else ''}\n\n```\n"
                        + text.strip()[-6000:] + "\n```")
        ok = ok and step_ok
    return sections, ok


def main() -> int:
    names = ["kernels", *(s.name for s in STEPS)]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="skip the CUDA parts (automatic without a GPU)")
    ap.add_argument("--out", type=Path, default=None, help="Markdown file (default on a GPU: docs/gpu-check.md)")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--only", default=",".join(names),
                    help=f"comma-separated parts to run, in this order: {', '.join(names)} (default: all)")
    ap.add_argument("--skip-benchmarks", action="store_true", help="the kernel checks only (same as --only kernels)")
    ap.add_argument("--budget-s", type=float, default=540, help="time limit of the whole command (each part gets "
                    "what the parts before it leave)")
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl",
                    help="wheels carried to the machine (`make gpu-wheels`), installed when this Python lacks them")
    ap.add_argument("--wheel-list", action="store_true", help="print the name==version of the wheels to carry, and exit")
    args = ap.parse_args()
    if args.wheel_list:
        print(" ".join(wheel_list()))
        return 0
    only = ["kernels"] if args.skip_benchmarks else [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := [n for n in only if n not in names]:
        ap.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    start = time.time()
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    problems = use_carried_wheels(args.wheels)
    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined (also in the workers)
    import transformers
    import triton

    device = torch.cuda.get_device_name(0) if not dry else f"no GPU ({platform.processor() or platform.machine()} CPU)"
    site = f" (carried wheels: {os.environ['LVLM_GPU_SITE']})" if os.environ.get("LVLM_GPU_SITE") else ""
    header = (f"# GPU check\n\n`make gpu-check` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on **{device}**; "
              f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"transformers {transformers.__version__}{site}.\n")
    log(header.splitlines()[-1])
    for part, why in problems.items():
        log(f"NOTE: the {part} steps will be skipped: {why}. Fix: `make gpu-wheels` on a machine with a package "
            f"index, then carry .whl (docs/kernels.md, 'A lent GPU').")
    sections = [header]
    ok = True
    if "kernels" in only and dry:
        log("DRY RUN: no CUDA device (or --dry-run). Skipping the CUDA kernel checks at LLaVA-1.5-7B shapes and "
            "the GPU benchmarks; running the check harness on the Triton interpreter at tiny shapes, and each "
            "benchmark script in a small CPU version, instead.")
        rows = []
        for phase, B, H, Hkv, N in DRY_SHAPES:
            for flags in [(), FLAGS]:
                rows += worker([(phase, B, H, Hkv, N, flags, "float16")])
        table, failed = check_table(rows)
        sections.append("## Kernel checks (dry run: interpreter, tiny shapes, plain and all flags)\n\n" + table)
        ok = failed == 0
    elif "kernels" in only:
        rows = kernel_checks(GPU_SHAPES, ["float16", "bfloat16"], max(1, args.workers))
        table, failed = check_table(rows)
        sections.append(f"## Kernel checks: Triton fp16/bf16 vs fp32 reference, every flag combination\n\n"
                        f"Tolerance: fp16 atol = rtol = {TOL['float16']}, bf16 {TOL['bfloat16']}; read-out "
                        f"atol {READOUT_TOL['atol']}, rtol {READOUT_TOL['rtol']}. {len(rows)} calls, "
                        f"{failed} failed.\n\n" + table)
        ok = failed == 0
        log(f"kernel checks: {len(rows) - failed}/{len(rows)} passed ({time.time() - start:.0f} s so far)")
    more, steps_ok = run_steps([s for s in STEPS if s.name in only], dry, args.budget_s, start, problems)
    sections += more
    ok = ok and steps_ok
    if dry:
        sections.append("\nCUDA parts skipped (dry run): kernel checks at 7B shapes, the GPU benchmarks at their "
                        "GPU sizes, pytest tests/kernels on CUDA.")
    sections.append(f"\nTotal {time.time() - start:.0f} s; {'all checks passed' if ok else 'SOME CHECKS FAILED'}.\n")
    out = args.out or (None if dry else ROOT / "docs" / "gpu-check.md")
    text = "\n\n".join(sections)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        log(f"wrote {out}")
    else:
        print(text)
        log("dry run: no results file written (pass --out to write one)")
    log(f"{'PASSED' if ok else 'FAILED'} in {time.time() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
