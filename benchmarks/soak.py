"""Soak test of a real `lvlm serve`: minutes of mixed, partly hostile traffic, then a report.

Starts `lvlm serve --model shapes` (the real CLI: private Ray, gateway, one replica, the
continuous scheduler) on a free loopback port, waits until /ready, and runs `--clients` client
threads for `--duration` seconds. Each request is drawn at random: a chat with one of the
intervention methods (none, VHR, VAR, PAI, VTE, CARVE, VHR+VAR), streamed or not, with or without
logprobs, or a catalog/health read; `--disconnect` of the chats (10 % by default) are abandoned
mid-way (a stream closed after its first chunk, a non-stream request given up after a random
fraction of a second). It reports every status, the 5xx count (HTTP answers and in-stream error
events alike), whether every admission slot came back (/health inflight 0 at the end), and the
model replica's resident memory sampled through the run.

    python benchmarks/soak.py --duration 300 --clients 6
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key-0123"
METHODS = ("none", "vhr", "var", "pai", "vte", "carve", "vhr+var")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url(rng: random.Random) -> str:
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y, r = rng.randint(10, 70), rng.randint(10, 70), rng.randint(6, 20)
        color = rng.choice(("red", "blue", "green", "yellow"))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + r, y + r), fill=color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(rng: random.Random, stream: bool, logprobs: bool, method: str) -> dict:
    prompt = rng.choice(("Describe this image.", "What shapes are in the image?", "Is there a red circle?"))
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(rng)}},
                                                      {"type": "text", "text": prompt}]}],
            "max_tokens": rng.choice((8, 16, 32)), "stream": stream}
    if method != "none":
        body["interventions"] = method
    if logprobs:
        body.update(logprobs=True, top_logprobs=rng.choice((0, 3, 20)))
    return body


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.server_errors: list[str] = []

    def add(self, key: str, status: int | str, detail: str = "") -> None:
        with self.lock:
            self.counts[(key, status)] += 1
            if isinstance(status, int) and status >= 500:
                self.server_errors.append(f"{key} {status} {detail[:200]}")


def strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def client(base: str, seed: int, stop: threading.Event, tally: Tally, disconnect: float) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base, headers=headers, timeout=180) as http:
        while not stop.is_set():
            if rng.random() < 0.1:
                path = rng.choice(("/v1/models", "/v1/interventions", "/health", "/metrics"))
                try:
                    r = http.get(path)
                    tally.add(f"GET {path}", r.status_code, r.text)
                except httpx.HTTPError as err:
                    tally.add(f"GET {path}", type(err).__name__)
                continue
            method, stream, logprobs = rng.choice(METHODS), rng.random() < 0.5, rng.random() < 0.3
            leave = rng.random() < disconnect
            key = f"chat {method}{' stream' if stream else ''}{' logprobs' if logprobs else ''}"
            body = chat_body(rng, stream, logprobs, method)
            try:
                if stream:
                    with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            r.read()
                            tally.add(key, r.status_code, r.text)
                            continue
                        lines = []
                        for line in r.iter_lines():
                            if line:
                                lines.append(line)
                            if leave:
                                break
                    if leave:
                        tally.add(key, "left")
                        continue
                    events = [strict(line[6:]) for line in lines[:-1]]
                    errors = [e["error"] for e in events if "error" in e]
                    if lines[-1] != "data: [DONE]":
                        tally.add(key, 599, "stream without [DONE]")
                    elif errors:
                        status = 503 if errors[0]["type"] == "service_unavailable" else 500
                        tally.add(key, status if errors[0]["type"] != "invalid_request_error" else 400,
                                  json.dumps(errors[0]))
                    else:
                        tally.add(key, 200)
                else:
                    timeout = rng.uniform(0.1, 1.0) if leave else 180
                    r = http.post("/v1/chat/completions", json=body, timeout=timeout)
                    strict(r.text)
                    tally.add(key, r.status_code, r.text)
            except httpx.TimeoutException:
                tally.add(key, "left" if leave else "timeout")
            except httpx.HTTPError as err:
                tally.add(key, type(err).__name__)
            except ValueError as err:  # not strict JSON
                tally.add(key, 598, f"not strict JSON: {err}")


def replica_process(server_pid: int) -> psutil.Process | None:
    """The model replica of OUR server: a descendant of the `lvlm serve` process (other Ray
    instances on the machine may run replicas of the same name)."""
    try:
        family = psutil.Process(server_pid).children(recursive=True)
    except psutil.Error:
        return None
    for proc in family:
        try:
            text = proc.name() + " " + " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica:lvlm:LVLMServer" in text:
            return proc
    return None


def rss_mb(proc: psutil.Process | None) -> float | None:
    try:
        return proc.memory_info().rss / 2**20 if proc is not None else None
    except psutil.Error:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--disconnect", type=float, default=0.10, help="share of chats abandoned mid-way")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    lvlm = str(Path(sys.executable).with_name("lvlm"))
    server = subprocess.Popen([lvlm, "serve", "--model", args.model, "--port", str(port), "--api-key", KEY,
                               "--no-eval-jobs"], cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open("/tmp/lvlm-soak-server.log", "w"))
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                sys.exit(f"lvlm serve exited with {server.returncode}; see /tmp/lvlm-soak-server.log")
            time.sleep(1.0)
        else:
            sys.exit("the service did not become ready within 600 s")
        replica = replica_process(server.pid)
        samples = [(0.0, rss_mb(replica))]
        pids = {getattr(replica, "pid", None)}
        tally, stop = Tally(), threading.Event()
        threads = [threading.Thread(target=client, args=(base, args.seed + i, stop, tally, args.disconnect))
                   for i in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while time.monotonic() - started < args.duration:
            time.sleep(min(30.0, args.duration - (time.monotonic() - started)))
            if rss_mb(replica) is None:  # the replica was replaced: follow the new one (and say so)
                replica = replica_process(server.pid)
                pids.add(getattr(replica, "pid", None))
            samples.append((time.monotonic() - started, rss_mb(replica)))
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
        settle = time.monotonic() + 60
        inflight = None
        while time.monotonic() < settle:
            inflight = httpx.get(f"{base}/health", timeout=10).json()["inflight"]
            if inflight == 0:
                break
            time.sleep(0.5)
        samples.append((time.monotonic() - started, rss_mb(replica)))
        by_status = collections.Counter()
        for (_, status), n in tally.counts.items():
            by_status[str(status)] += n
        report = {
            "duration_s": round(time.monotonic() - started, 1), "clients": args.clients,
            "requests": sum(tally.counts.values()), "by_status": dict(sorted(by_status.items())),
            "server_errors_5xx": len(tally.server_errors), "first_5xx": tally.server_errors[:5],
            "inflight_after": inflight, "replica_pids": sorted(p for p in pids if p is not None),
            "replica_rss_mb": [(round(t), None if m is None else round(m, 1)) for t, m in samples],
            "by_kind": {f"{k} -> {s}": n for (k, s), n in sorted(tally.counts.items(), key=str)},
        }
        print(json.dumps(report, indent=1))
    finally:
        try:
            os.killpg(server.pid, signal.SIGINT)  # `lvlm serve` shuts Ray down on Ctrl-C
            server.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
