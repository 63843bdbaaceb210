"""The suite's own pytest-xdist scheduler (tests/conftest.py): the modules that start Ray are split
into at most two units balanced by their recorded time, each unit runs on one worker, and the other
tests spread over the workers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import RAY_MODULE_DEFAULT_S, RAY_MODULE_SECONDS, ray_units, starts_ray

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]


def test_the_ray_modules_are_found_by_what_they_contain():
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if starts_ray(p)}
    assert {"tests/serve/test_integration.py", "tests/eval/test_cluster_nodes.py",
            "tests/serve/test_jobs_ray.py"} <= found
    assert "tests/serve/test_gateway.py" not in found  # imports ray.exceptions, starts nothing
    assert set(RAY_MODULE_SECONDS) <= found  # every recorded time names a module that still starts Ray


def test_ray_units_are_balanced_longest_first():
    costs = {"a.py": 300.0, "b.py": 200.0, "c.py": 150.0, "d.py": 100.0, "e.py": 50.0}
    RAY_MODULE_SECONDS.update(costs)
    try:
        units = ray_units(sorted(costs), 2)
    finally:
        for k in costs:
            del RAY_MODULE_SECONDS[k]
    assert units == {"a.py": "ray-0", "b.py": "ray-1", "c.py": "ray-1", "d.py": "ray-0", "e.py": "ray-1"}
    load = {u: sum(costs[m] for m in costs if units[m] == u) for u in ("ray-0", "ray-1")}
    assert load == {"ray-0": 400.0, "ray-1": 400.0}
    assert set(ray_units(["x.py", "y.py"], 1).values()) == {"ray-0"}  # one worker: one unit
    assert ray_units(["new.py"], 2) == {"new.py": "ray-0"} and RAY_MODULE_DEFAULT_S > 0


@pytest.mark.slow
def test_two_workers_run_each_ray_unit_on_one_worker(pytester, monkeypatch):
    """A small suite on two real xdist workers with this conftest: three modules that "start Ray"
    (by their text), one that does not; each Ray module's tests all run on one worker, in order."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    record = textwrap.dedent("""
        import json, os
        def _log(name):
            with open(os.environ["SCHED_LOG"], "a") as f:
                f.write(json.dumps([os.environ.get("PYTEST_XDIST_WORKER"), __name__, name]) + "\\n")
    """)
    for name in ("ray_a", "ray_b", "ray_c", "plain"):
        marker = "# ray" + ".init( is what makes this a Ray module\n" if name != "plain" else ""  # split: not one here
        tests = "".join(f"def test_{i}():\n    _log('{i}')\n\n" for i in range(4))
        pytester.makepyfile(**{f"test_{name}": marker + record + tests})
    log = pytester.path / "log.jsonl"
    monkeypatch.setenv("SCHED_LOG", str(log))
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=16)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    worker_of = {}
    for worker, module, test in rows:
        worker_of.setdefault(module, set()).add(worker)
    for module in ("test_ray_a", "test_ray_b", "test_ray_c"):
        assert len(worker_of[module]) == 1, worker_of  # a module's tests stay on one worker
        assert [t for _, m, t in rows if m == module] == ["0", "1", "2", "3"]  # in file order
    # two Ray units: the three modules are not all on one worker
    assert len(set().union(*(worker_of[m] for m in ("test_ray_a", "test_ray_b", "test_ray_c")))) == 2
