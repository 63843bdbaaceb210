"""Configuration of one service deployment (a plain dataclass handed to every replica)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from serve.limits import Limits


@dataclass(frozen=True)
class ServeConfig:
    model: str = "shapes"  # name or path for lvlm.load
    device: str = "cpu"
    dtype: Optional[str] = None
    replicas: int = 1
    max_replicas: Optional[int] = None  # set (> replicas) to autoscale between replicas and this
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; 1 = one replica per GPU
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05  # docs/benchmarks.md "Service load": 10 ms left batches a third full
    max_queued_requests: int = 256  # in Ray's proxy queue before it answers 503
    warmup: bool = True
    api_key: Optional[str] = None
    limits: Limits = field(default_factory=Limits)
    eval_jobs: bool = True
    eval_max_running: int = 1
    eval_num_cpus: float = 1.0
    eval_num_gpus: float = 0.0

    @property
    def max_concurrent(self) -> int:
        # At least two batches in flight per replica: one running while the next one fills.
        return max(self.limits.max_concurrent, 2 * self.max_batch_size)

    @property
    def max_ongoing_requests(self) -> int:
        # Ray's cap sits above our admission limit so cheap routes (/health, /metrics, jobs)
        # still reach a replica whose generation slots are all taken.
        return self.max_concurrent + 16

    def load_kwargs(self) -> dict:
        return {"device": self.device, "dtype": self.dtype}
