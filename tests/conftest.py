"""Suite-wide settings: offline, Ray without token auth, NLTK data from ../shared when present;
the modules that start Ray kept in at most two pytest-xdist units, one Ray instance per worker;
the run ends with the suite's own exit status, never with a crash of interpreter teardown."""

import contextlib
import functools
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # Triton reads TRITON_INTERPRET when kernels are defined: set it before any test imports them
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
# Folders private to this pytest process, unless the caller chose them. pytest-xdist workers inherit
# the controller's environment, so a worker makes its own again (LVLM_TEST_PRIVATE names them).
# RAY_TMPDIR keeps Ray's session folders and its ray_current_cluster file here: `ray.init()` without an
# address joins the cluster that file names, which would be a cluster_utils cluster of another
# worker, or one another user started on this machine.
_inherited = set(os.environ.get("LVLM_TEST_PRIVATE", "").split()) if os.environ.get("PYTEST_XDIST_WORKER") else set()
_private = set()  # removed when the session ends
for _var, _prefix in (("LVLM_CACHE", "lvlm-cache-"), ("RAY_TMPDIR", "ray-")):  # LVLM_CACHE: model profiles
    if _var not in os.environ or _var in _inherited:
        os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
        _private.add(_var)
os.environ["LVLM_TEST_PRIVATE"] = " ".join(sorted(_private))
_shared_nltk = Path(__file__).resolve().parents[2] / "shared" / "nltk_data"
if "NLTK_DATA" not in os.environ and _shared_nltk.is_dir():
    os.environ["NLTK_DATA"] = str(_shared_nltk)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_service():
    """`with ray_service(config) as base_url:` the service on a fresh local Ray instance of this
    process (never a cluster left running by others), on a free loopback port; Serve and Ray are
    stopped on the way out."""

    @contextlib.contextmanager
    def start(config):
        import ray
        from ray import serve

        from lvlm_hallu.serve.app import run

        port = free_port()
        if ray.is_initialized():  # left over by an earlier test module: start from a known cluster
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            run(config, host="127.0.0.1", port=port)
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()

    return start


# Under pytest-xdist the modules that start Ray are split into at most two units of work (one per
# worker, two at most: each Ray instance reserves both cores of the machine the suite is sized for),
# and each unit runs its modules one after another in file order, while the other tests go out one
# at a time (as `--dist load`). A module's tests share its module-scoped Ray fixture and see one
# another's effects as in a serial run; two Ray instances never share a worker, and each worker has
# its own RAY_TMPDIR, so they never join each other's cluster. A module starts Ray when its code calls
# `ray.init(`, builds a `ray.cluster_utils` cluster, calls `start_private_ray` or names the
# `ray_service` fixture (in a test, a module fixture, or a subprocess's script). The scheduler applies
# the rule to node ids: pytest-xdist's `xdist_group` marks group nothing on pytest 9.2, whose node ids
# no longer take the group suffix they rely on (pytest-xdist issue 1386).
STARTS_RAY = re.compile(r"\bray\.init\(|\bcluster_utils\b|\bstart_private_ray\b|\bray_service\b")
# Seconds each Ray module took in a serial run on the 2-core VM (quiet, 2026-12-08): only used to
# balance the two Ray units (longest first, each to the lighter unit); a module not listed counts
# RAY_MODULE_DEFAULT_S. A stale number costs balance, never correctness.
RAY_MODULE_SECONDS = {
    "tests/serve/test_jobs_ray.py": 83, "tests/serve/test_playground_browser.py": 83,
    "tests/serve/test_faults.py": 79, "tests/ecosystem/test_lmms_eval.py": 74,
    "tests/serve/test_integration.py": 60, "tests/eval/test_cluster_nodes.py": 56,
    "tests/serve/test_replica_death.py": 49, "tests/eval/test_ray_job.py": 36, "tests/eval/test_cluster.py": 10,
    "tests/eval/test_cluster_devices.py": 8, "tests/serve/test_metrics.py": 6, "tests/eval/test_runner.py": 5,
}
RAY_MODULE_DEFAULT_S = 60.0


@functools.cache
def starts_ray(path: Path) -> bool:
    return path.suffix == ".py" and path.is_file() and bool(STARTS_RAY.search(path.read_text(encoding="utf-8")))


def ray_units(modules: list[str], units: int) -> dict[str, str]:
    """Each Ray module (path relative to the root) -> its unit, "ray-0" .. "ray-{units-1}": longest
    first, each to the unit with the least time so far (ties: the lower unit)."""
    load = [0.0] * units
    unit_of = {}
    for module in sorted(modules, key=lambda m: (-RAY_MODULE_SECONDS.get(m, RAY_MODULE_DEFAULT_S), m)):
        i = min(range(units), key=lambda u: (load[u], u))
        unit_of[module] = f"ray-{i}"
        load[i] += RAY_MODULE_SECONDS.get(module, RAY_MODULE_DEFAULT_S)
    return unit_of


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "each":  # every test on every worker: asked for as such
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath

    class RayUnits(LoadScopeScheduling):
        """One unit of work per group of Ray modules, one per other test. Units go out largest first
        (`--loadscope-reorder`, the default), so the Ray units, the longest, start at once."""

        unit_of: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if not starts_ray(root / module):
                return nodeid
            if self.unit_of is None:  # every Ray module of the collection, known once collected
                ray_modules = sorted({n.split("::", 1)[0] for n in self.collection if starts_ray(root / n.split("::", 1)[0])})
                self.unit_of = ray_units(ray_modules, max(1, min(2, len(self.nodes))))
            return self.unit_of[module]

    return RayUnits(config, log)


def pytest_sessionfinish(session, exitstatus):
    """Stop what a test may have left running (a Ray driver connection) while Python is whole;
    keep the session for pytest_unconfigure, which reads its final exit status."""
    session.config._lvlm_session = session
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    for var in _private:  # the folders this process made (profiles, generated worlds, Ray's session logs)
        shutil.rmtree(os.environ[var], ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Exit with the suite's status once every report is written, skipping interpreter teardown.

    Why: a CI run passed all tests and then died with SIGSEGV (make: Error 139) after the summary,
    while the process tore down native extension state (Ray's core worker, torch, the Triton
    interpreter) held by daemon threads. Nothing a test checks runs after this point: every
    result, the summary and pytest's cache are written in pytest_sessionfinish, before it.
    """
    session = getattr(config, "_lvlm_session", None)
    if session is None or os.environ.get("LVLM_TEST_TEARDOWN") == "1":  # LVLM_TEST_TEARDOWN=1: normal exit
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))


# One parameter set per method that must leave the output unchanged, and one that must change it
# (on the 4-layer tiny models); shared by the per-family method tests.
NEUTRAL = {
    "vhr": [{"name": "vhr", "alpha": 1.0}],
    "var": [{"name": "var", "p": 0.0, "sink_dims": [3, 7], "tau": 2.0}],
    "pai": [{"name": "pai", "alpha": 0.0}],
    "vte": [{"name": "vte", "exit_layer": 3}],  # k = L - 1: never exits
    "carve": [{"name": "carve", "top_p": 1.0, "max_steps": 4}],  # keeps every pixel
}
ACTIVE = {
    "vhr": [{"name": "vhr", "alpha": 4.0, "layers": [0, 1, 2, 3]}],
    "var": [{"name": "var", "p": 1.0, "rho": 0.0, "min_visual": 0.0, "sink_dims": [3, 7], "tau": 1.5, "include_last": True}],
    "pai": [{"name": "pai", "alpha": 3.0}],
    "vte": [{"name": "vte", "exit_layer": 0}],
    "carve": [{"name": "carve", "max_steps": 4, "top_p": 0.1, "k_min": 1}],
}


def hf_generate(name: str, batch: dict, max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens from transformers' generate on an independently built copy (SDPA attention)."""
    from lvlm_hallu.lvlm import tiny

    model, _ = tiny.build(name)
    model.set_attn_implementation("sdpa")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    return [seq[: seq.index(eos) + 1] if eos in seq else seq for seq in out[:, batch["input_ids"].shape[1]:].tolist()]
