"""Load generator for the service: bounded, loopback only, mixed interventions.

Sends concurrent chat requests (a mix of intervention sets and images) until `--requests` are
done or `--duration` seconds have passed, whichever comes first, then reports throughput,
p50/p99 latency (overall and per intervention set), errors, and the engine batch sizes the
service saw (read from the difference of its /metrics before and after the run).

    python benchmarks/load.py --url http://127.0.0.1:8000 --requests 64 --concurrency 8
    # or start a local service per (scheduler, batch size, batch wait) and compare them side by side,
    # each at every concurrency (static vs continuous batching, docs/benchmarks.md):
    python benchmarks/load.py --start --model shapes --schedulers static,continuous --concurrency 8,32
    # long answers (in process): request i asks for a length drawn from 64..128 and its engine
    # request decodes exactly that many tokens (ignore_eos, as vLLM's benchmarks do)
    python benchmarks/load.py --in-process --model shapes --schedulers static,continuous --answer-tokens 64-128
    # the four loads of issue 37 side by side (short answers of 1-16 tokens and long ones of 64-128,
    # each at concurrency 8 and 32), both schedulers back to back per load, three times:
    python benchmarks/load.py --in-process --model shapes --loads standard --requests 96 \
        --schedulers static,continuous,static,continuous,static,continuous
    # a continuous knob's values side by side: continuous:admit_after_steps=0 is one more entry

Per load it prints every run (req/s, completion tok/s, p50/p99 latency, time to first token, CPU
per request, rows per batch or step, prefill calls) and each configuration's ratios to the load's
first one, per pair of runs and their median. Time to first token (in process only) is measured from the service's submit (after the body is
parsed) to the moment the engine chose the request's first token (the end of its prefill); a
static batch returns its answers together at its end, so its clients see nothing sooner, but the
engine-side time is what both schedulers can be compared on.

It refuses targets that do not resolve to loopback only: it is a tool for measuring your own
service, not for loading anyone else's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import ipaddress
import json
import os
import platform
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import httpx  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from lvlm_hallu.serve.scheduler import REFILL_STEPS  # noqa: E402

DEFAULT_MIX = ["none", "vhr", "var", "vhr+var", "pai"]  # VHR and PAI (contrast) prefill a twin row each
ANSWERS = {"short": "1-16", "long": "64-128"}  # --loads: named answer lengths (tokens, ignore_eos)
STANDARD_LOADS = "short@8,short@32,long@8,long@32"
HOPS = {"unary": None, "stream": {"stream": False}}  # extra body fields per gateway path (--hops)
COLOURS = ["red", "green", "blue", "orange", "purple", "black"]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        addresses = set()
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        sys.exit(f"refusing {url}: the load generator only targets loopback addresses")


def image_url(i: int) -> str:
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((10 + i % 5 * 4, 10, 60, 60), fill=COLOURS[i % len(COLOURS)])
    draw.rectangle((50, 50, 90, 80 - i % 7), fill=COLOURS[(i + 2) % len(COLOURS)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Sample:
    label: str
    status: int
    seconds: float
    completion_tokens: int = 0


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time over the run (in process: service and engine included)
    batches: dict = field(default_factory=dict)
    prefills: dict = field(default_factory=dict)  # continuous, in process: prefill calls and their size
    first_token_s: list[float] = field(default_factory=list)  # in process: submit to first token, per answer

    def summary(self) -> dict:
        ok = [s for s in self.samples if s.status == 200]
        lat = sorted(s.seconds for s in ok)
        ttft = sorted(self.first_token_s)
        per = {}
        for label in sorted({s.label for s in ok}):
            xs = sorted(s.seconds for s in ok if s.label == label)
            per[label] = {"n": len(xs), "p50_s": round(pct(xs, 50), 3), "p99_s": round(pct(xs, 99), 3)}
        return {
            "requests": len(self.samples), "ok": len(ok), "errors": len(self.samples) - len(ok),
            "wall_s": round(self.wall_s, 2),
            "throughput_rps": round(len(ok) / self.wall_s, 3) if self.wall_s else 0.0,
            "completion_tok_s": round(sum(s.completion_tokens for s in ok) / self.wall_s, 1) if self.wall_s else 0.0,
            "p50_s": round(pct(lat, 50), 3), "p99_s": round(pct(lat, 99), 3),
            "ttft_p50_s": round(pct(ttft, 50), 3) if ttft else None,
            "ttft_p99_s": round(pct(ttft, 99), 3) if ttft else None,
            "cpu_ms_per_request": round(1000 * self.cpu_s / len(ok), 1) if ok and self.cpu_s else None,
            "per_intervention": per, "batches": self.batches, "prefills": self.prefills,
        }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[min(98, max(0, int(q) - 1))] if q < 100 else xs[-1]


def batch_histogram(metrics_text: str) -> dict[str, float]:
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("lvlm_batch_size_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def batch_delta(before: dict, after: dict) -> dict:
    count = after.get("lvlm_batch_size_count", 0) - before.get("lvlm_batch_size_count", 0)
    total = after.get("lvlm_batch_size_sum", 0) - before.get("lvlm_batch_size_sum", 0)
    single = after.get('lvlm_batch_size_bucket{le="1.0"}', 0) - before.get('lvlm_batch_size_bucket{le="1.0"}', 0)
    return {"batches": int(count), "mean_size": round(total / count, 2) if count else 0.0,
            "rows": int(total), "multi_row_batches": int(count - single)}


def answer_lengths(spec: str | None, requests: int, max_tokens: int) -> list[int]:
    """max_tokens of every request: `max_tokens`, or drawn uniformly from "LO-HI" with a fixed seed
    (the same sequence for every configuration compared)."""
    if not spec:
        return [max_tokens] * requests
    lo, hi = (int(x) for x in spec.split("-"))
    rng = random.Random(0)
    return [rng.randint(lo, hi) for _ in range(requests)]


async def run_load(url: str, *, requests: int, duration_s: float, concurrency: int, max_tokens: int,
                   mix: list[str], api_key: str | None, transport=None, lengths: list[int] | None = None,
                   extra: dict | None = None) -> RunResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    images = [image_url(i) for i in range(12)]
    result = RunResult()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, trust_env=False,
                                 transport=transport) as http:
        before = batch_histogram((await http.get("/metrics")).text)
        started, cpu_started = time.perf_counter(), time.process_time()
        deadline = started + duration_s
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests and time.perf_counter() < deadline:
                i = next_index
                next_index += 1
                label = mix[i % len(mix)]
                body = {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                    {"type": "text", "text": ["Describe this image.", "What objects are there?",
                                              "Is there a red circle in the image?"][i % 3]}]}],
                    "max_tokens": lengths[i] if lengths else max_tokens, "temperature": 0.0, "interventions": label,
                    **(extra or {})}
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/chat/completions", json=body)
                    tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
                    result.samples.append(Sample(label, r.status_code, time.perf_counter() - t0, tokens))
                except httpx.HTTPError:
                    result.samples.append(Sample(label, 0, time.perf_counter() - t0))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s, result.cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
        after = batch_histogram((await http.get("/metrics")).text)
    result.batches = batch_delta(before, after)
    return result


def available_mix(url: str, api_key: str | None, wanted: list[str]) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    names = {i["name"] for i in httpx.get(f"{url}/v1/interventions", headers=headers, trust_env=False).json()["data"]}
    return [spec for spec in wanted if all(part in names or part == "none" for part in spec.split("+"))]


def start_service(model: str, max_batch_size: int, port: int, batch_wait_s: float, scheduler: str = "continuous") -> str:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from lvlm_hallu.serve.app import run
    from lvlm_hallu.serve.config import ServeConfig

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    config = ServeConfig(model=model, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s,
                         eval_jobs=False, scheduler=scheduler)
    run(config, host="127.0.0.1", port=port)
    return f"http://127.0.0.1:{port}"


class LocalBatcher:
    """In-process stand-in for Ray's `@serve.batch` (static batching): a batch closes at
    `max_batch_size` requests or `wait_s` after its first request, and batches run one at a time
    (Ray's default `max_concurrent_batches=1`) on a worker thread."""

    def __init__(self, runner, max_batch_size: int, wait_s: float):
        self.runner, self.max_batch_size, self.wait_s = runner, max_batch_size, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = None

    async def submit(self, request):
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            outcomes = await asyncio.to_thread(self.runner.run_batch, [r for r, _ in batch])
            for (_, future), outcome in zip(batch, outcomes):
                future.set_result(outcome)


class FirstTokens:
    """When the engine chose each request's first token: a row is created right after its group's
    prefill and its first token is chosen next (lvlm/pipeline.py `_RowState`), for both schedulers.
    Recording wraps the row's constructor while a run lasts, keyed by the request object."""

    def __init__(self):
        self.at: dict[int, float] = {}

    def __enter__(self) -> "FirstTokens":
        from lvlm_hallu.lvlm import pipeline

        self._cls, self._init = pipeline._RowState, pipeline._RowState.__init__
        at, init = self.at, self._init

        def recording(row, *a, **k):
            init(row, *a, **k)
            at[id(row.request)] = row.t_start

        self._cls.__init__ = recording
        return self

    def __exit__(self, *exc) -> None:
        self._cls.__init__ = self._init


def ignoring_eos(item):
    """The engine request (bare, or in the service's Ticket) with ignore_eos set."""
    from lvlm_hallu.serve.batching import Ticket

    if isinstance(item, Ticket):
        return dataclasses.replace(item, request=dataclasses.replace(item.request, ignore_eos=True))
    return dataclasses.replace(item, ignore_eos=True)


def run_in_process(pipeline, scheduler: str, max_batch_size: int, wait_s: float, concurrency: int, args,
                   answer_tokens: str | None) -> RunResult:
    """The service's FastAPI app with a real pipeline, driven over httpx's ASGI transport: no Ray,
    no HTTP sockets, the same Service, runners and admission limits."""
    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig

    scheduler, knobs = scheduler_knobs(scheduler, args)
    config = ServeConfig(model=args.model, device=args.device, dtype=args.dtype, max_batch_size=max_batch_size,
                         batch_wait_timeout_s=wait_s, eval_jobs=False, scheduler=scheduler, **knobs)

    async def one() -> RunResult:
        service = Service(pipeline, config)
        if scheduler == "static":
            service.submit = LocalBatcher(service.runner, max_batch_size, wait_s).submit
        engine_submit, first_token_s = service.submit, []

        async def submit(item):
            item = ignoring_eos(item) if answer_tokens else item  # the HTTP API has no ignore_eos
            request, submitted = getattr(item, "request", item), time.perf_counter()
            outcome = await engine_submit(item)
            if id(request) in first.at:
                first_token_s.append(first.at.pop(id(request)) - submitted)
            return outcome

        service.submit = submit
        transport = httpx.ASGITransport(app=build_app(service))
        runner = service.runner
        try:
            with FirstTokens() as first:
                result = await run_load("http://in-process", requests=args.requests, duration_s=args.duration,
                                        concurrency=concurrency, max_tokens=args.max_tokens, mix=args.mix.split(","),
                                        api_key=None, transport=transport,
                                        lengths=answer_lengths(answer_tokens, args.requests, args.max_tokens))
            result.first_token_s = first_token_s
            if hasattr(runner, "prefills"):
                result.prefills = {"calls": runner.prefills, "requests": runner.prefilled,
                                   "mean_group": round(runner.prefilled / runner.prefills, 2) if runner.prefills else 0}
            return result
        finally:
            if hasattr(runner, "close"):
                runner.close()

    return asyncio.run(one())


def scheduler_knobs(spec: str, args) -> tuple[str, dict]:
    """(scheduler, continuous knobs) of a --schedulers entry: "continuous" takes --max-prefill-tokens
    and --admit-after-steps; "continuous:admit_after_steps=2" overrides one for that entry."""
    name, _, overrides = spec.partition(":")
    knobs = {"max_prefill_tokens": args.max_prefill_tokens, "admit_after_steps": args.admit_after_steps}
    for item in filter(None, overrides.split(";")):
        key, _, value = item.partition("=")
        if key not in knobs or not value.isdigit():
            raise ValueError(f"{spec!r}: a scheduler's overrides are KNOB=INTEGER, KNOB one of {', '.join(knobs)}")
        knobs[key] = int(value)
    return name, knobs


def parse_loads(spec: str) -> list[tuple[str, int]]:
    """--loads: [(answer lengths "LO-HI", concurrency)] from "short@8,64-128@32" ("standard": issue 37's four)."""
    loads = []
    for item in (STANDARD_LOADS if spec == "standard" else spec).split(","):
        lengths, _, concurrency = item.partition("@")
        lengths = ANSWERS.get(lengths, lengths)
        lo, _, hi = lengths.partition("-")
        if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) and concurrency.isdigit()):
            raise ValueError(f"a load is LENGTHS@CONCURRENCY with LENGTHS one of {', '.join(ANSWERS)} or LO-HI, "
                             f"got {item!r}")
        loads.append((lengths, int(concurrency)))
    return loads


def load_label(lengths: str | None, concurrency: int) -> str:
    """"concurrency=8", or with --loads "short answers 1-16, concurrency=8"."""
    named = {v: k for k, v in ANSWERS.items()}
    answers = f"{named[lengths]} answers {lengths}, " if lengths in named else \
        (f"answers {lengths}, " if lengths else "")
    return f"{answers}concurrency={concurrency}"


def print_summary(title: str, s: dict) -> None:
    b = s["batches"]
    print(f"\n## {title}")
    print(f"requests {s['requests']} (ok {s['ok']}, errors {s['errors']}) in {s['wall_s']} s: "
          f"{s['throughput_rps']} req/s, {s['completion_tok_s']} completion tok/s")
    print(f"latency p50 {s['p50_s']} s, p99 {s['p99_s']} s; CPU {s.get('cpu_ms_per_request')} ms per request")
    print(f"engine batches {b.get('batches')}, mean rows per batch {b.get('mean_size')}, "
          f"batches with >1 row {b.get('multi_row_batches')}")
    if s.get("prefills"):
        print(f"prefill calls {s['prefills']['calls']}, mean requests per prefill {s['prefills']['mean_group']}")
    if s.get("ttft_p50_s") is not None:
        print(f"time to first token p50 {s['ttft_p50_s']} s, p99 {s['ttft_p99_s']} s")
    for label, v in s["per_intervention"].items():
        print(f"  {label:<10} n={v['n']:<4} p50 {v['p50_s']} s  p99 {v['p99_s']} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="running service (loopback only)")
    ap.add_argument("--in-process", action="store_true",
                    help="no Ray: the service app in this process over an ASGI transport, per scheduler")
    ap.add_argument("--start", action="store_true",
                    help="start a local service (Ray) for each --batch-sizes x --batch-wait-ms pair")
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--device", default="cpu", help="--in-process: where the model runs (e.g. cuda)")
    ap.add_argument("--dtype", default=None, help="--in-process: model dtype (default: the loader's for the device)")
    ap.add_argument("--batch-sizes", default="8", help="with --start: comma-separated max batch sizes to compare")
    ap.add_argument("--batch-wait-ms", default="50", help="with --start: comma-separated batch waits (ms) to compare")
    ap.add_argument("--requests", type=int, default=64, help="stop after this many requests")
    ap.add_argument("--duration", type=float, default=120.0, help="... or after this many seconds")
    ap.add_argument("--schedulers", default="continuous",
                    help="comma-separated, static and/or continuous, repeated to run them again; --in-process: "
                    "continuous:KNOB=N[;KNOB=N] sets a continuous knob (admit_after_steps, max_prefill_tokens) "
                    "for one entry")
    ap.add_argument("--max-prefill-tokens", type=int, default=2048,
                    help="--in-process, continuous: prefill token budget per step (lvlm serve --max-prefill-tokens)")
    ap.add_argument("--admit-after-steps", type=int, default=REFILL_STEPS,
                    help="--in-process, continuous: refill threshold in decode steps (lvlm serve --admit-after-steps); "
                    "a --schedulers entry continuous:admit_after_steps=N overrides it for that entry")
    ap.add_argument("--concurrency", default="8", help="comma-separated concurrencies, each run in turn")
    ap.add_argument("--loads", default=None, metavar="LENGTHS@C,...",
                    help="--in-process: loads run in turn, each with every scheduler back to back: answer lengths "
                    f"({', '.join(f'{k} = {v}' for k, v in ANSWERS.items())}, or LO-HI; ignore_eos) at a concurrency, "
                    f"e.g. short@8,long@32; 'standard' = {STANDARD_LOADS}. Replaces --concurrency and --answer-tokens")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--answer-tokens", default=None, metavar="LO-HI",
                    help="--in-process: request i asks for max_tokens drawn from LO..HI (fixed seed) and decodes "
                    "exactly that many tokens (ignore_eos), e.g. 64-128: long answers")
    ap.add_argument("--mix", default=",".join(DEFAULT_MIX), help="intervention specs to cycle through")
    ap.add_argument("--hops", default="unary",
                    help="with --start or --url, comma-separated, run in turn per concurrency: unary (the gateway's "
                    "plain handle call for non-stream requests) and/or stream (the body says \"stream\": false, "
                    "so the gateway takes its streaming handle call, as before it had a unary one)")
    ap.add_argument("--api-key", default=os.environ.get("LVLM_API_KEY"))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not args.start and not args.url and not args.in_process:
        ap.error("give --url of a running service, --start or --in-process")
    if (args.device != "cpu" or args.dtype) and not args.in_process:
        ap.error("--device and --dtype are for --in-process (a started service takes lvlm serve's --device)")
    if (args.answer_tokens or args.loads) and not args.in_process:
        ap.error("--answer-tokens and --loads need --in-process (the HTTP API cannot ask for ignore_eos)")
    try:
        parse_loads(args.loads) if args.loads else None
        for spec in args.schedulers.split(","):
            scheduler_knobs(spec, args)
    except ValueError as err:
        ap.error(str(err))

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    hops = args.hops.split(",")
    if any(h not in HOPS for h in hops):
        ap.error(f"--hops takes {', '.join(HOPS)}")

    def hop_label(hop: str) -> str:
        return f", hop={hop}" if len(set(hops)) > 1 else ""

    runs: dict[str, dict] = {}
    groups: dict[str, list[tuple[str, str]]] = {}  # load -> [(configuration, title)], for the ratios

    def record(load: str, config: str, summary: dict) -> None:
        title = f"{config}, {load}"
        repeat = sum(1 for name in runs if name.split(" #")[0] == title)  # --schedulers a,b,a,b
        title += f" #{repeat + 1}" if repeat else ""
        runs[title] = summary
        groups.setdefault(load, []).append((config, title))

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    if args.device.startswith("cuda"):
        import torch

        machine += f", {torch.cuda.get_device_name(0)}"
    if args.in_process:
        import torch

        from lvlm_hallu import lvlm
        from lvlm_hallu.serve.playground import warm_up

        machine += f", torch {torch.__version__} with {torch.get_num_threads()} threads"
        pipeline = lvlm.load(args.model, device=args.device, dtype=args.dtype)
        pipeline.generate([__import__("lvlm").Request("Hi", Image.new("RGB", (64, 64)), max_new_tokens=2)])  # warm-up
        warm_up()  # CHAIR's parser, loaded beside the first run otherwise (serve/playground.py)
        loads = parse_loads(args.loads) if args.loads else [(args.answer_tokens, c) for c in concurrencies]
        # load-major, schedulers back to back: on a shared machine whose load drifts, the
        # configurations compared on one load run minutes apart at most
        for lengths, concurrency in loads:
            for sched in args.schedulers.split(","):
                for size in args.batch_sizes.split(","):
                    for wait in args.batch_wait_ms.split(","):
                        result = run_in_process(pipeline, sched, int(size), float(wait) / 1000, concurrency, args,
                                                lengths)
                        waited = f", wait={float(wait):g}ms" if sched == "static" else ""
                        record(load_label(lengths if args.loads else None, concurrency),
                               f"{sched}, max_batch_size={size}{waited}", result.summary())
    elif args.start:
        from ray import serve

        try:
            grid = [(sched, int(size), float(wait)) for sched in args.schedulers.split(",")
                    for size in args.batch_sizes.split(",") for wait in args.batch_wait_ms.split(",")]
            for sched, size, wait_ms in grid:
                url = start_service(args.model, size, _free_port(), wait_ms / 1000, sched)
                mix = available_mix(url, None, args.mix.split(","))
                for concurrency in concurrencies:
                    for hop in hops:
                        result = asyncio.run(run_load(url, requests=args.requests, duration_s=args.duration,
                                                      concurrency=concurrency, max_tokens=args.max_tokens,
                                                      mix=mix, api_key=None, extra=HOPS[hop]))
                        wait = f", wait={wait_ms:g}ms" if sched == "static" else ""
                        record(load_label(None, concurrency) + hop_label(hop), f"{sched}, max_batch_size={size}{wait}",
                               result.summary())
                serve.shutdown()
        finally:
            import ray

            serve.shutdown()
            ray.shutdown()
    else:
        check_loopback(args.url)
        mix = available_mix(args.url, args.api_key, args.mix.split(","))
        for concurrency in concurrencies:
            for hop in hops:
                result = asyncio.run(run_load(args.url, requests=args.requests, duration_s=args.duration,
                                              concurrency=concurrency, max_tokens=args.max_tokens, mix=mix,
                                              api_key=args.api_key, extra=HOPS[hop]))
                record(load_label(None, concurrency) + hop_label(hop), args.url, result.summary())

    started = f"model {args.model}" + (" in process (no Ray)" if args.in_process else "") \
        if args.start or args.in_process else "running service"
    lengths = f"answer tokens {args.answer_tokens} (ignore_eos)" if args.answer_tokens else f"max_tokens {args.max_tokens}"
    if args.loads:
        lengths = f"loads {args.loads} (answer lengths drawn per request, ignore_eos)"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(f"machine: {machine}, load average {load_start:.2f} at the start, {load[0]:.2f} at the end; {started}; "
          f"{'' if args.loads else f'concurrency {args.concurrency}; '}{lengths}; {args.requests} requests per run; "
          f"mix {args.mix}")
    for title, summary in runs.items():
        print_summary(title, summary)
    print_ratios(runs, groups)
    print("\n| run | req/s | completion tok/s | p50 s | p99 s | TTFT p50 s | TTFT p99 s | CPU ms / request |"
          " rows per batch or step | prefill calls (requests each) |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        pre = r.get("prefills") or {}
        print(f"| {name} | {r['throughput_rps']} | {r['completion_tok_s']} | {r['p50_s']} | {r['p99_s']} | "
              f"{_dash(r.get('ttft_p50_s'))} | {_dash(r.get('ttft_p99_s'))} | {r.get('cpu_ms_per_request')} | "
              f"{r['batches'].get('mean_size')} | {pre.get('calls', '-')} ({pre.get('mean_group', '-')}) |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "runs": runs}, f, indent=2)


RATIOS = (("req/s", "throughput_rps"), ("tok/s", "completion_tok_s"), ("p50", "p50_s"), ("p99", "p99_s"),
          ("TTFT p50", "ttft_p50_s"), ("TTFT p99", "ttft_p99_s"))


def print_ratios(runs: dict[str, dict], groups: dict[str, list[tuple[str, str]]]) -> None:
    """Per load, every configuration against the load's first one (the k-th run of each against the
    k-th of the first when --schedulers repeats them), and the median over those pairs."""
    rows = []
    for load, entries in groups.items():
        base_config = entries[0][0]
        bases = [title for config, title in entries if config == base_config]
        for config in dict.fromkeys(config for config, _ in entries if config != base_config):
            pairs = list(zip(bases, [title for c, title in entries if c == config]))
            ratios = {}
            for label, key in RATIOS:
                values = [runs[t][key] / runs[b][key] for b, t in pairs
                          if runs[b].get(key) and runs[t].get(key) is not None]
                ratios[label] = (statistics.median(values), values) if values else (float("nan"), [])
            rows.append((load, f"{config} / {base_config}", len(pairs), ratios))
    if not rows:
        return
    print("\nRatios per load, each configuration over the load's first (median over the pairs of runs, each pair"
          " in brackets); for the latencies below 1x is better.")
    print("\n| load | ratio | pairs | " + " | ".join(label for label, _ in RATIOS) + " |\n|---|---|---|"
          + "---|" * len(RATIOS))
    for load, name, n, ratios in rows:
        cells = []
        for label, _ in RATIOS:
            median, values = ratios[label]
            each = f" ({', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
            cells.append(f"{median:.2f}x{each}")
        print(f"| {load} | {name} | {n} | " + " | ".join(cells) + " |")


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
