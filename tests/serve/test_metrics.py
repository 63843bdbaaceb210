"""Replica metrics (serve/metrics.py): the replica's own /metrics registry, and the same series
through ray.util.metrics, exported by Ray's agent per worker and summed over replicas, including
a replica that was killed and replaced."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from lvlm_hallu.serve.metrics import SERIES, Metrics


def traffic(metrics: Metrics, completion_tokens: int) -> None:
    """What one replica records for a chat answer, a 400, a 404 and one engine batch of 3 rows."""
    metrics.observe_request("/v1/chat/completions", 200, 0.2)
    metrics.observe_chat("vhr", 200, 0.2, prompt_tokens=10, completion_tokens=completion_tokens, decode_tps=40.0)
    metrics.observe_request("/v1/chat/completions", 400, 0.01)
    metrics.observe_chat("invalid", 400, 0.01)
    metrics.observe_request("unmatched", 404, 0.0)
    metrics.observe_batch(3)
    metrics.set_inflight(0)


def samples(text: str, prefix: str = "") -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and line.startswith(prefix):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_local_registry_has_every_series():
    metrics = Metrics()
    traffic(metrics, 7)
    got = samples(metrics.render().decode())
    assert got['lvlm_tokens_total{kind="completion"}'] == 7.0 and got['lvlm_tokens_total{kind="prompt"}'] == 10.0
    assert got['lvlm_requests_total{route="unmatched",status="404"}'] == 1.0
    assert got['lvlm_intervention_requests_total{interventions="invalid",status="400"}'] == 1.0
    assert got['lvlm_batch_size_bucket{le="3.0"}'] == 1.0 and got["lvlm_batch_size_count"] == 1.0
    names = {key.split("{")[0] for key in got}
    for s in SERIES:
        assert any(n.startswith(s.name) for n in names), s.name
    assert Metrics().render() != metrics.render()  # each Metrics owns its registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summed(text: str, name: str, **tags: str) -> tuple[float, int]:
    """Sum over Ray's per-worker series of `name` with these tags; and how many workers reported."""
    total, workers = 0.0, set()
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(labels.get(k) == v for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
            workers.add(labels.get("WorkerId"))
    return total, len(workers)


@pytest.mark.slow
def test_ray_export_sums_replicas_and_survives_a_restart():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        @ray.remote(num_cpus=0)
        class Replica:
            def __init__(self):
                self.metrics = Metrics(ray=True)

            def serve(self, completion_tokens: int) -> str:
                traffic(self.metrics, completion_tokens)
                return self.metrics.render().decode()

        a, b = Replica.remote(), Replica.remote()
        local_a = ray.get(a.serve.remote(3))
        ray.get(b.serve.remote(4))
        assert samples(local_a)['lvlm_tokens_total{kind="completion"}'] == 3.0  # /metrics: this replica only
        ray.kill(a)
        c = Replica.remote()  # the replacement
        ray.get(c.serve.remote(5))

        def scrape() -> str:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            text = scrape()
            if _summed(text, "ray_lvlm_tokens_total", kind="completion")[1] == 3:
                break
            time.sleep(1)
        assert _summed(text, "ray_lvlm_tokens_total", kind="completion") == (12.0, 3)  # 3 + 4 (a, killed) + 5
        assert _summed(text, "ray_lvlm_tokens_total", kind="prompt")[0] == 30.0
        assert _summed(text, "ray_lvlm_requests_total", route="unmatched", status="404")[0] == 3.0
        assert _summed(text, "ray_lvlm_requests_total", route="/v1/chat/completions", status="400")[0] == 3.0
        assert _summed(text, "ray_lvlm_intervention_requests_total", interventions="vhr", status="200")[0] == 3.0
        assert _summed(text, "ray_lvlm_batch_size_count")[0] == 3.0
        assert _summed(text, "ray_lvlm_batch_size_bucket", le="3.0")[0] == 3.0  # same buckets as /metrics
        assert _summed(text, "ray_lvlm_decode_tokens_per_second_count")[0] == 3.0
    finally:
        ray.shutdown()
