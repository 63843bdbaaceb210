"""Evaluation throughput over Ray model replicas: items/s with 1 and with 2 actors, side by side.

Captions shapes-world test images with the embedded shapes model through `eval.cluster.ClusterPool`
(batches scheduled by the driver, images shipped as bytes, one writer). Each actor takes one CPU and one torch
thread, so 2 actors on 2 cores should approach 2x; model loading and a warm-up batch are excluded
from the timing. Rounds alternate 1, 2, 1, 2 ... so a background load drifting during the run hits
both sides alike; the reported figure is the median over rounds.

    python benchmarks/eval_actors.py --images 32 --new-tokens 16 --batch 4 --rounds 3 [--check 1.6]

`--check R` exits 1 when 2 actors give less than R times the items/s of 1 actor.

Two things of the machine decide whether replicas can scale, and the header line reports both:
- Ray starts worker processes at nice 15 (`RAY_worker_niceness`); next to the driver and Ray's own
  daemons they then get little CPU on a busy machine. The benchmark sets it to 0, as Ray Jobs do.
- With the kernel's `sched_autogroup` on (desktop kernels, this VM), every process of one session
  shares one CPU slice: on a machine busy with other sessions, N replicas started from one shell
  get one session's share between them, whatever the core count. Ray's workers lead their own
  process groups and cannot leave the session, so run the benchmark on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet ray.init starts below


def autogroup_enabled() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def load_model(model: str):
    import torch

    from lvlm_hallu import lvlm

    torch.set_num_threads(1)  # one core per replica: scaling comes from replicas, not threads
    return lvlm.load(model)


def make_items(folder: Path, n: int, prompt: str) -> list:
    from lvlm_hallu.eval.runner import Item
    from lvlm_hallu.lvlm.shapes import build_split

    inst, _ = build_split(folder, "test", n)
    import json

    coco = json.loads(inst.read_text())
    return [Item(f"img{im['id']}", prompt, str(folder / "images" / im["file_name"])) for im in coco["images"]]


def timed_run(pool, items, adapter, batch: int, out: Path) -> float:
    """Seconds to answer every item into a fresh results file."""
    start = time.perf_counter()
    pool.run(items, out, adapter, batch_size=batch, progress=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--actors", default="1,2", help="comma-separated actor counts to compare (first = baseline)")
    ap.add_argument("--check", type=float, default=None, help="fail unless the last count reaches this ratio")
    args = ap.parse_args(argv)

    from functools import partial

    import ray

    from lvlm_hallu.eval.cluster import ClusterPool
    from lvlm_hallu.eval.runner import local_answer

    counts = [int(c) for c in args.actors.split(",")]
    work = Path(tempfile.mkdtemp(prefix="eval-actors-"))
    items = make_items(work / "data", args.images, "Describe this image.")
    adapter = partial(local_answer, max_new_tokens=args.new_tokens)
    # every pool holds its replicas for the whole run; an idle replica uses no core
    ray.init(num_cpus=sum(counts), include_dashboard=False, log_to_driver=False)
    try:
        factory = partial(load_model, args.model)
        pools = {n: ClusterPool(factory, n, actor_options={"num_cpus": 1}) for n in counts}
        for n, pool in pools.items():  # load the models and run one batch per replica before timing
            pool.run(items[: n * args.batch], work / f"warm{n}.jsonl", adapter, batch_size=args.batch, progress=False)
        seconds: dict[int, list[float]] = {n: [] for n in counts}
        for r in range(args.rounds):
            for n in counts:
                seconds[n].append(timed_run(pools[n], items, adapter, args.batch, work / f"r{r}-{n}.jsonl"))
        for pool in pools.values():
            pool.shutdown()
    finally:
        ray.shutdown()

    base = args.images / statistics.median(seconds[counts[0]])
    print(f"# {args.model}, {args.images} images, {args.new_tokens} new tokens, batch {args.batch}, "
          f"{args.rounds} rounds; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}, worker nice {os.environ['RAY_worker_niceness']}, "
          f"sched_autogroup {'on' if autogroup_enabled() else 'off'}")
    print("| actors | items/s (median) | rounds (s) | vs 1st |")
    print("|---|---|---|---|")
    ratio = 1.0
    for n in counts:
        rate = args.images / statistics.median(seconds[n])
        ratio = rate / base
        runs = ", ".join(f"{s:.1f}" for s in seconds[n])
        print(f"| {n} | {rate:.2f} | {runs} | {ratio:.2f}x |")
    if args.check is not None and ratio < args.check:
        print(f"FAIL: {counts[-1]} actors give {ratio:.2f}x < {args.check}x")
        sys.exit(1)


if __name__ == "__main__":
    main()
