"""The training time of a run over all its sessions, and the budget that stops it.

A run may be trained in several sessions (`--resume`); its time is the sum over them. Two clocks
are kept: wall time, and the CPU time of the training process (every thread of it). On a machine
shared with other jobs the wall clock runs while the run waits for a core; CPU time counts the
compute the run used, which on an idle machine is wall time x threads. `--budget-clock` picks the
clock the budget is read on (train.py).

The ledger `spent.json` in the run folder is rewritten after every step, so a session that is
killed loses at most one step of accounted time, even though it loses the work since its last
checkpoint; a resume starts from the larger of the ledger's and the checkpoint's figures. A ledger
written before CPU time was recorded counts its wall time as CPU time (never less than used).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class Spent:
    train_s: float = 0.0  # wall time
    cpu_s: float = 0.0  # process CPU time

    @classmethod
    def from_record(cls, rec: dict) -> "Spent":
        wall = float(rec.get("train_s", 0.0))
        return cls(wall, float(rec.get("cpu_s", wall)))

    def max(self, other: "Spent") -> "Spent":
        return Spent(max(self.train_s, other.train_s), max(self.cpu_s, other.cpu_s))

    def on(self, clock: str) -> float:
        if clock not in CLOCKS:
            raise KeyError(f"unknown clock {clock!r}; valid: {', '.join(CLOCKS)}")
        return self.train_s if clock == "wall" else self.cpu_s

    def rounded(self) -> dict:
        return {k: round(v, 1) for k, v in asdict(self).items()}


class Ledger:
    """The run's time: what earlier sessions spent plus this session's clocks."""

    def __init__(self, out: Path, prior: Spent = Spent()):
        self.path = Path(out) / "spent.json"
        self.prior = prior
        self.t0, self.c0 = time.time(), time.process_time()

    @classmethod
    def resume(cls, out: Path, checkpoint: Spent | None) -> "Ledger":
        """A session of a run; `checkpoint`: the time its checkpoint recorded (None: a fresh run)."""
        if checkpoint is None:
            return cls(out)
        path = Path(out) / "spent.json"
        saved = Spent.from_record(json.loads(path.read_text())) if path.exists() else Spent()
        return cls(out, saved.max(checkpoint))

    def now(self) -> Spent:
        return Spent(self.prior.train_s + time.time() - self.t0, self.prior.cpu_s + time.process_time() - self.c0)

    def write(self, step: int) -> Spent:
        spent = self.now()
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(spent.rounded() | {"step": step}))
        tmp.replace(self.path)  # atomic
        return spent
