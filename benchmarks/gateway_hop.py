"""The cost of the gateway hop (serve/gateway.py), isolated from the model.

An echo replica (sleeps 20 ms, answers a chat-sized JSON body) is deployed twice on one local Ray
Serve instance: behind the real gateway, as `lvlm serve` deploys the model, and as its own FastAPI
ingress (how the service was deployed before the gateway). Requests go, in interleaved rounds, to
  gw         the gateway's unary handle call (`respond`; bodies that never say "stream"),
  gw-stream  the gateway's streaming handle call (`forward`; the same body with "stream": false),
  direct     the ingress replica, no gateway.
It reports throughput, p50 latency and the CPU milliseconds per request that each Ray process
(HTTP proxy, gateway, replica) spent, read with psutil before and after each round. On a shared
CPU machine throughput swings with the load; the CPU time per request is the steadier measure
of what a hop costs, and on a CPU replica that time is taken from the model.

    python benchmarks/gateway_hop.py --requests 150 --concurrency 16 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import httpx  # noqa: E402
import psutil  # noqa: E402 - a Ray dependency
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

ANSWER = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "w " * 40}, "finish_reason": "length"}],
          "usage": {"prompt_tokens": 90, "completion_tokens": 32, "total_tokens": 122},
          "intervention_report": {"applied": [], "details": {"x": list(range(50))}}}
MESSAGES = [{"role": "user", "content": "x" * 6000}]  # about a small data-URL image
BODIES = {"gw": {"messages": MESSAGES, "max_tokens": 32},
          "gw-stream": {"messages": MESSAGES, "max_tokens": 32, "stream": False},
          "direct": {"messages": MESSAGES, "max_tokens": 32}}
PROCESSES = {"proxy": "ProxyActor", "gateway": "ServeReplica:gw:Gateway", "replica": "ServeReplica:gw:Echo",
             "direct replica": "ServeReplica:direct:EchoDirect"}


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/{path:path}")
    async def chat(request: dict, path: str):
        await asyncio.sleep(0.02)  # the engine's time; the hop's cost comes on top
        return JSONResponse(ANSWER)

    return app


def deployments():
    from ray import serve

    @serve.deployment(name="Echo", max_ongoing_requests=64)
    class Echo:
        """LVLMServer's two relay entry points around the echo app."""

        def __init__(self):
            self._app = echo_app()

        async def forward(self, method, path, query, headers, body):
            from lvlm_hallu.serve.gateway import asgi_stream

            async for item in asgi_stream(self._app, method, path, query, headers, body):
                yield item

        async def respond(self, method, path, query, headers, body):
            from lvlm_hallu.serve.gateway import asgi_answer

            return await asgi_answer(self._app, method, path, query, headers, body)

    @serve.deployment(name="EchoDirect", max_ongoing_requests=64)
    @serve.ingress(echo_app())
    class EchoDirect:
        pass

    return Echo, EchoDirect


async def load(url: str, body: bytes, requests: int, concurrency: int) -> tuple[float, float]:
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
        async def one():
            async with gate:
                t0 = time.perf_counter()
                r = await http.post(f"{url}/v1/chat/completions", content=body,
                                    headers={"content-type": "application/json"})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests / (time.perf_counter() - started), statistics.median(latencies)


def ray_processes() -> dict[str, psutil.Process]:
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for name, marker in PROCESSES.items():
            if marker in cmd:
                found[name] = p
    return found


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=150, help="per round and path")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from lvlm_hallu.serve.config import ServeConfig
    from lvlm_hallu.serve.gateway import bind_gateway

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        echo, direct = deployments()
        serve.run(bind_gateway(echo.bind(), ServeConfig(model="echo")), name="gw", route_prefix="/gw")
        serve.run(direct.bind(), name="direct", route_prefix="/direct")
        base = f"http://127.0.0.1:{port}"
        urls = {"gw": f"{base}/gw", "gw-stream": f"{base}/gw", "direct": f"{base}/direct"}
        bodies = {k: json.dumps(v).encode() for k, v in BODIES.items()}
        for name in urls:  # warm-up
            asyncio.run(load(urls[name], bodies[name], 30, args.concurrency))
        procs = ray_processes()
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in urls}
        for rnd in range(args.rounds):
            for name in urls:
                before = cpu_seconds(procs)
                rps, p50 = asyncio.run(load(urls[name], bodies[name], args.requests, args.concurrency))
                after = cpu_seconds(procs)
                per = {k: 1000 * (after[k] - before[k]) / args.requests for k in after}
                rows[name].append((rps, p50, sum(per.values())))
                parts = ", ".join(f"{k} {v:.1f}" for k, v in per.items() if v >= 0.05)
                print(f"round {rnd} {name:9s} {rps:6.1f} req/s  p50 {1000 * p50:7.1f} ms  CPU ms/request: {parts}",
                      flush=True)
        load_avg = os.getloadavg()[0]
        print(f"\n{os.cpu_count()} CPU cores, load average {load_avg:.2f} at the end; "
              f"{args.rounds} rounds x {args.requests} requests, concurrency {args.concurrency}")
        print("| path | median req/s | median p50 ms | median CPU ms / request (all Ray processes) | per round |")
        print("|---|---|---|---|---|")
        for name, vals in rows.items():
            print(f"| {name} | {statistics.median(v[0] for v in vals):.1f} | "
                  f"{1000 * statistics.median(v[1] for v in vals):.0f} | {statistics.median(v[2] for v in vals):.1f} | "
                  f"{', '.join(f'{v[2]:.1f}' for v in vals)} |")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
