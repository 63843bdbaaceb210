"""Prometheus metrics of one replica: requests, latency, tokens, batch sizes, per intervention.

Each `Metrics` owns its own `CollectorRegistry` (never prometheus_client's process-global one), so
tests and several services in one process do not share counters. With several replicas every
replica reports its own series at /metrics; Ray's metrics agent is the place to aggregate them.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lvlm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("lvlm_request_latency_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("lvlm_tokens", "Tokens processed", ["kind"], registry=r)
        self.batch_size = Histogram("lvlm_batch_size", "Rows per engine batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_fallbacks = Counter("lvlm_batch_row_retries", "Batches that failed and were retried row by row",
                                       registry=r)
        self.inflight = Gauge("lvlm_inflight_requests", "Generation requests in flight", registry=r)
        self.by_intervention = Counter("lvlm_intervention_requests", "Chat requests by intervention set",
                                       ["interventions", "status"], registry=r)
        self.intervention_latency = Histogram("lvlm_intervention_latency_seconds",
                                              "Chat latency by intervention set", ["interventions"],
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.decode_tps = Histogram("lvlm_decode_tokens_per_second", "Decode throughput per request",
                                    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_chat(self, label: str, status: int, seconds: float, prompt_tokens: int = 0,
                     completion_tokens: int = 0, decode_tps: float = 0.0) -> None:
        self.by_intervention.labels(label, str(status)).inc()
        if status == 200:
            self.intervention_latency.labels(label).observe(seconds)
            self.tokens.labels("prompt").inc(prompt_tokens)
            self.tokens.labels("completion").inc(completion_tokens)
            if decode_tps > 0:
                self.decode_tps.observe(decode_tps)

    def observe_batch(self, size: int, fell_back: bool = False) -> None:
        self.batch_size.observe(size)
        if fell_back:
            self.batch_fallbacks.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
