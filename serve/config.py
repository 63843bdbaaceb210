"""Configuration of one service deployment (a plain dataclass handed to every replica)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lvlm_hallu.serve.limits import Limits


@dataclass(frozen=True)
class ServeConfig:
    model: str = "shapes"  # name or path for lvlm.load
    device: str = "cpu"
    dtype: Optional[str] = None
    # accelerate placement (lvlm.load, README "Large models"): with num_gpus > 1 a replica's
    # device map spreads the model over the GPUs Ray gives it (CUDA_VISIBLE_DEVICES).
    device_map: Optional[str | dict] = None
    max_memory: Optional[dict] = None
    offload_folder: Optional[str] = None
    replicas: int = 1
    max_replicas: Optional[int] = None  # set (> replicas) to autoscale between replicas and this
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; 1 = one replica per GPU
    max_batch_size: int = 8  # static: requests per batch; continuous: rows decoding at once
    scheduler: str = "continuous"  # "continuous" (serve/scheduler.py) or "static" (@serve.batch)
    # continuous, serve/scheduler.py `Admission`: one prefill between two decode steps holds at most
    # this many tokens (rows incl. twins x the group's longest prompt); a running batch refills its
    # free rows once group / max_batch_size x the decode steps its longest row may still take
    # reaches `admit_after_steps` (an empty batch admits at once; 0 refills at once)
    max_prefill_tokens: int = 2048
    admit_after_steps: int = 6  # serve/scheduler.py REFILL_STEPS, docs/serving.md "Batching"
    max_tokens_in_flight: int = 65536  # continuous: prompt + max_new_tokens over the running rows
    batch_wait_timeout_s: float = 0.05  # docs/benchmarks.md "Service load": 10 ms left batches a third full
    max_queued_requests: int = 256  # in Ray's proxy queue before it answers 503
    warmup: bool = True
    api_key: Optional[str] = None
    api_keys: tuple[str, ...] = ()  # more keys (--api-key repeated, --api-keys-file); each owns its eval jobs
    # the gateway (serve/gateway.py GatewayLimits): a request body must arrive within body_timeout_s,
    # at most max_uploads bodies arrive at once; the proxy closes idle keep-alive connections after
    # keep_alive_timeout_s (Ray Serve's HTTPOptions, uvicorn's timeout_keep_alive)
    body_timeout_s: float = 30.0
    max_uploads: int = 16
    keep_alive_timeout_s: int = 15
    router_dir: Optional[str] = None  # VTE router weights, by name (<name>.pt); requests never name paths
    limits: Limits = field(default_factory=Limits)
    eval_jobs: bool = True
    eval_max_running: int = 1
    eval_replicas: int = 1  # model replicas per eval job (eval/cluster.py ClusterPool), each eval_num_cpus/gpus
    eval_num_cpus: float = 1.0
    eval_num_gpus: float = 0.0
    eval_jobs_dir: Optional[str] = None  # SQLite job store + job folders (serve/jobstore.py default_jobs_dir)
    eval_keep_days: float = 7.0  # retention: finished jobs older than this are removed with their folders
    eval_keep_jobs: int = 200  # retention: at most this many finished jobs are kept

    def keys(self) -> tuple[str, ...]:
        """Every accepted API key (empty: the service runs without authentication)."""
        return tuple(dict.fromkeys(k for k in (self.api_key, *self.api_keys) if k))

    @property
    def max_concurrent(self) -> int:
        # At least two batches in flight per replica: one running while the next one fills.
        return max(self.limits.max_concurrent, 2 * self.max_batch_size)

    @property
    def max_ongoing_requests(self) -> int:
        # Ray's cap sits above our admission limit so cheap routes (/health, /metrics, jobs)
        # still reach a replica whose generation slots are all taken.
        return self.max_concurrent + 16

    def env_vars(self) -> dict[str, str]:
        """Environment of replicas and eval workers (interventions.vte reads LVLM_ROUTER_DIR)."""
        return {"LVLM_ROUTER_DIR": self.router_dir} if self.router_dir else {}

    def load_kwargs(self) -> dict:
        placement = {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}
        return {"device": self.device, "dtype": self.dtype, **{k: v for k, v in placement.items() if v is not None}}
