"""Metrics of one replica: requests, latency, errors and 404s, tokens, batch sizes, per intervention.

Every series is declared once (`SERIES`) and recorded into up to two backends:
- a Prometheus `CollectorRegistry` owned by the `Metrics` object (never prometheus_client's
  process-global one, so tests and several services in one process do not share counters),
  rendered by the replica's `GET /metrics`: that one replica's counts since it started;
- with `ray=True` (every `LVLMServer` replica), the same series through `ray.util.metrics`.
  Ray's metrics agent exports them on its Prometheus endpoint as `ray_<name>` (counters with
  `_total`), one series per worker (`WorkerId` label). A replica that dies leaves its series
  there and its replacement starts new ones, so `sum without (WorkerId) (ray_lvlm_tokens_total)`
  is the service's total across replicas and restarts.
Both backends get the same names, labels and buckets, so a dashboard reads either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


@dataclass(frozen=True)
class Series:
    attr: str  # attribute name on `Metrics`
    kind: str  # "counter", "gauge" or "histogram"
    name: str  # Prometheus name (counters get "_total" on export)
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


SERIES = (
    Series("requests", "counter", "lvlm_requests", "HTTP requests by route and status (404s of unknown routes: "
           "route=unmatched)", ("route", "status")),
    Series("latency", "histogram", "lvlm_request_latency_seconds", "Request latency by route", ("route",),
           LATENCY_BUCKETS),
    Series("tokens", "counter", "lvlm_tokens", "Tokens processed", ("kind",)),
    Series("batch_size", "histogram", "lvlm_batch_size", "Rows per engine batch (continuous: per decode step)",
           buckets=BATCH_BUCKETS),
    Series("batch_fallbacks", "counter", "lvlm_batch_row_retries", "Batches that failed and were retried row by row"),
    Series("inflight", "gauge", "lvlm_inflight_requests", "Generation requests in flight"),
    Series("by_intervention", "counter", "lvlm_intervention_requests", "Chat requests by intervention set and status",
           ("interventions", "status")),
    Series("intervention_latency", "histogram", "lvlm_intervention_latency_seconds", "Chat latency by intervention set",
           ("interventions",), LATENCY_BUCKETS),
    Series("decode_tps", "histogram", "lvlm_decode_tokens_per_second", "Decode throughput per request",
           buckets=TPS_BUCKETS),
)


class _Local:
    """One series in the replica's own registry."""

    def __init__(self, s: Series, registry: CollectorRegistry):
        kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
        extra = {"buckets": s.buckets} if s.kind == "histogram" else {}
        self.metric = kinds[s.kind](s.name, s.help, list(s.labels), registry=registry, **extra)
        self.labels = s.labels

    def _child(self, tags: dict[str, str]) -> Any:
        return self.metric.labels(*(tags[k] for k in self.labels)) if self.labels else self.metric

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).inc(value)

    def set(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).set(value)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).observe(value)


class _Ray:
    """One series through `ray.util.metrics` (recorded by the worker, exported by Ray's agent)."""

    def __init__(self, s: Series):
        from ray.util import metrics

        if s.kind == "histogram":
            self.metric = metrics.Histogram(s.name, description=s.help, boundaries=list(s.buckets), tag_keys=s.labels)
        else:
            kind = metrics.Counter if s.kind == "counter" else metrics.Gauge
            self.metric = kind(s.name, description=s.help, tag_keys=s.labels)

    def inc(self, value: float, tags: dict[str, str]) -> None:
        if value > 0:  # Ray refuses a zero increment
            self.metric.inc(value, tags=tags or None)

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.metric.set(value, tags=tags or None)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.metric.observe(value, tags=tags or None)


class _Fanout:
    """A series recorded into every backend."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    def inc(self, value: float = 1.0, **tags: str) -> None:
        for b in self.backends:
            b.inc(value, tags)

    def set(self, value: float, **tags: str) -> None:
        for b in self.backends:
            b.set(value, tags)

    def observe(self, value: float, **tags: str) -> None:
        for b in self.backends:
            b.observe(value, tags)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, ray: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.exports_to_ray = ray
        for s in SERIES:
            backends: list[Any] = [_Local(s, self.registry)]
            if ray:
                backends.append(_Ray(s))
            setattr(self, s.attr, _Fanout(backends))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(route=route, status=str(status))
        self.latency.observe(seconds, route=route)

    def observe_chat(self, label: str, status: int, seconds: float, prompt_tokens: int = 0,
                     completion_tokens: int = 0, decode_tps: float = 0.0) -> None:
        self.by_intervention.inc(interventions=label, status=str(status))
        if status == 200:
            self.intervention_latency.observe(seconds, interventions=label)
            self.tokens.inc(prompt_tokens, kind="prompt")
            self.tokens.inc(completion_tokens, kind="completion")
            if decode_tps > 0:
                self.decode_tps.observe(decode_tps)

    def observe_batch(self, size: int, fell_back: bool = False) -> None:
        self.batch_size.observe(size)
        if fell_back:
            self.batch_fallbacks.inc()

    def set_inflight(self, n: int) -> None:
        self.inflight.set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
