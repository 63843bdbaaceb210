"""`make gpu-check`'s harness (benchmarks/gpu_check.py) on the CPU: its checks pass on the real
kernels and fail on a wrong output, and its table counts the failures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402

from lvlm_hallu.kernels import triton_attention as ta  # noqa: E402


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


def test_the_stack_check_names_what_the_engine_and_the_load_step_lack(monkeypatch):
    import importlib.util

    import transformers

    assert gpu_check.transformers_range().startswith(">=")
    assert gpu_check.stack_problems() == {}  # the project's own environment has everything
    assert f"transformers=={transformers.__version__}" in gpu_check.wheel_list()
    assert len(gpu_check.wheel_list()) == len(gpu_check.CARRIED)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")  # the lent machines' image
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    problems = gpu_check.stack_problems()
    assert problems["engine"].startswith("transformers 5.17.0 is outside pyproject.toml's >=")
    assert problems["serving"] == "missing fastapi"


def test_carried_wheels_are_installed_into_a_folder_and_the_script_restarts_once(monkeypatch, tmp_path):
    (tmp_path / "transformers-9.9.9-py3-none-any.whl").write_bytes(b"")
    calls, restarted = [], []

    class Restart(Exception):
        pass

    def execve(exe, argv, env):
        restarted.append(env)
        raise Restart

    monkeypatch.delenv("LVLM_GPU_SITE", raising=False)
    monkeypatch.setattr(gpu_check, "stack_problems", lambda: {"engine": "transformers 5.17.0 is outside"})
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda argv, **kw: calls.append(argv) or
                        gpu_check.subprocess.CompletedProcess(argv, 0, "", ""))
    monkeypatch.setattr(gpu_check.os, "execve", execve)
    with pytest.raises(Restart):
        gpu_check.use_carried_wheels(tmp_path)
    pip = calls[0]
    assert pip[1:4] == ["-m", "pip", "install"] and "--no-index" in pip and "--no-deps" in pip
    site = pip[pip.index("--target") + 1]
    assert pip[-1].endswith("transformers-9.9.9-py3-none-any.whl")
    assert restarted[0]["PYTHONPATH"].split(os.pathsep)[0] == site and restarted[0]["LVLM_GPU_SITE"] == site
    # the second run, with nothing to carry, or with nothing missing: no install
    calls.clear()
    monkeypatch.setenv("LVLM_GPU_SITE", site)
    gpu_check.use_carried_wheels(tmp_path)
    monkeypatch.delenv("LVLM_GPU_SITE")
    gpu_check.use_carried_wheels(tmp_path / "absent")
    monkeypatch.setattr(gpu_check, "stack_problems", dict)
    gpu_check.use_carried_wheels(tmp_path)
    assert calls == []


def test_a_step_whose_needs_are_missing_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(gpu_check, "run_step", lambda *a: pytest.fail("a skipped step ran"))
    steps = [s for s in gpu_check.STEPS if s.name in ("attention", "load")]
    sections, ok = gpu_check.run_steps(steps, dry=True, budget_s=300, start=gpu_check.time.time(),
                                       problems={"engine": "transformers 5.17.0 is outside", "serving": "missing fastapi"})
    assert not ok and len(sections) == 1  # attention has no dry version; load is skipped
    assert "Skipped: transformers 5.17.0 is outside; missing fastapi." in sections[0]
    sections, ok = gpu_check.run_steps(steps[1:], dry=False, budget_s=50, start=gpu_check.time.time(), problems={})
    assert not ok and "of the budget left (run it alone: --only load)" in sections[0]


def test_every_step_names_flags_its_script_has():
    """A typo in a step's command would only show on a rare GPU loan: each `--flag` of the GPU and
    the dry command is one the script's argparse defines."""
    import re

    root = Path(gpu_check.ROOT)
    for step in gpu_check.STEPS:
        for argv in (step.gpu, step.dry) if step.dry else (step.gpu,):
            if argv[0] == "-m":
                continue
            source = (root / argv[0]).read_text()
            for flag in (a for a in argv[1:] if a.startswith("--")):
                assert re.search(rf'add_argument\("{flag}"', source), f"{step.name}: {argv[0]} has no {flag}"


def test_dry_versions_of_the_decode_and_load_benchmarks_run_on_the_cpu():
    steps = [s for s in gpu_check.STEPS if s.name in ("decode", "load")]
    sections, ok = gpu_check.run_steps(steps, dry=True, budget_s=400, start=gpu_check.time.time(), problems={})
    assert ok, sections
    assert "engine" in sections[0] and "ratio" in sections[0]
    assert "continuous, max_batch_size=8, concurrency=4" in sections[1] and "errors 0" in sections[1]
