"""`ray job submit --address http://HEAD:DASHBOARD -- lvlm eval chair --ray-actors 2 ...` against a
cluster the test starts (head with the dashboard's job server, plus a worker node): the job
succeeds and writes the same results file as an in-process run of the same command."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(out: Path) -> dict[str, str]:
    rows = []
    for path in sorted(out.rglob("*.jsonl")):
        rows += [json.loads(x) for x in path.read_text().splitlines()]
    return {r["key"]: r["answer"] for r in rows if "key" in r}


@pytest.mark.slow
def test_ray_job_submit_runs_lvlm_eval_on_the_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    from lvlm_hallu.lvlm.shapes import build_split

    ray_cli = Path(sys.executable).with_name("ray")
    lvlm_cli = Path(sys.executable).with_name("lvlm")
    if not ray_cli.exists() or not lvlm_cli.exists():
        pytest.skip("the ray and lvlm commands are not installed next to this interpreter")
    inst, caps = build_split(tmp_path / "data", "test", 4)
    args = ["eval", "chair", "--model", "shapes", "--instances", str(inst), "--captions", str(caps),
            "--images", str(tmp_path / "data" / "images"), "-n", "4", "--max-new-tokens", "6", "--batch-size", "1",
            "--no-progress"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)

    if ray.is_initialized():
        ray.shutdown()
    dashboard = free_port()
    # Every node's dashboard agent gets a free port: the default one may be held by another Ray on this machine.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
        "dashboard_agent_listen_port": free_port()})
    try:
        cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
        cluster.wait_for_nodes()
        submit = [str(ray_cli), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                  str(lvlm_cli), *args, "--ray-actors", "2", "--out", str(tmp_path / "cluster")]
        deadline = time.monotonic() + 120
        while True:  # the head's job agent starts a little after the dashboard answers
            proc = subprocess.run(submit, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
            if "No available agent" not in proc.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout

    local = subprocess.run([str(lvlm_cli), *args, "--out", str(tmp_path / "local")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    remote, here = results(tmp_path / "cluster"), results(tmp_path / "local")
    assert len(remote) == 4 and remote == here
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
