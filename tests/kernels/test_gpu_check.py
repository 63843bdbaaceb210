"""`make gpu-check`'s harness (benchmarks/gpu_check.py) on the CPU: its checks pass on the real
kernels and fail on a wrong output, and its table counts the failures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402

from kernels import triton_attention as ta  # noqa: E402


def test_check_passes_the_kernels_and_fails_a_wrong_output(monkeypatch):
    job = ("prefill", 2, 4, 2, 40, gpu_check.FLAGS, "float16")
    rows = gpu_check.worker([job])
    assert rows[0][-1] is True and rows[0][7] < gpu_check.TOL["float16"]

    def wrong(q, k, v, kv_start, *, scale, edits=None):
        o, r = real(q, k, v, kv_start, scale=scale, edits=edits)
        return o + 0.05, r  # off by more than the fp16 tolerance

    real = ta.attention_decode
    monkeypatch.setattr(ta, "attention_decode", wrong)
    rows += gpu_check.worker([("decode", 2, 4, 2, 40, (), "float16")])
    assert rows[1][-1] is False and abs(rows[1][7] - 0.05) < 1e-3
    table, failed = gpu_check.check_table(rows)
    assert failed == 1 and "Failed calls" in table and "decode B=2" in table


def test_every_flag_combination_is_checked():
    assert len(set(gpu_check.COMBOS)) == 32
    assert {p for p, *_ in gpu_check.GPU_SHAPES} == {"prefill", "decode"}
    assert {s[2] for s in gpu_check.GPU_SHAPES} == {32} and {s[4] for s in gpu_check.GPU_SHAPES} >= {600, 2900}
