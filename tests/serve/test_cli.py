"""`serve_command` registers on a typer app (as the lead mounts it under `lvlm serve`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lvlm_hallu.serve.cli import serve_command


def test_serve_command_mounts_on_a_typer_app():
    app = typer.Typer()
    app.command("serve")(serve_command)

    @app.command("other")
    def other() -> None:  # a second command, so typer keeps "serve" as a sub-command
        pass

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--model", "--host", "--port", "--replicas", "--max-batch-size", "--api-key",
                   "--allow-remote-images", "--address", "--max-replicas", "--num-gpus"):
        assert option in result.output


def run_serve(*args: str):
    app = typer.Typer()
    app.command("serve")(serve_command)

    @app.command("other")
    def other() -> None:
        pass

    return CliRunner().invoke(app, ["serve", *args], env={"COLUMNS": "200"})


def test_port_in_use_fails_in_one_line_before_ray_starts():
    import socket

    import ray

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("--model", "tiny-llava", "--port", str(port))
    assert result.exit_code == 2 and "already in use" in result.output and str(port) in result.output
    assert len(result.output.strip().splitlines()) == 1 and not ray.is_initialized()


def test_unknown_model_fails_in_one_line_before_ray_starts(tmp_path):
    import ray

    for model in ("no-such-model-xyz", str(tmp_path)):
        result = run_serve("--model", model, "--port", "0")
        assert result.exit_code == 2, result.output
        assert "unknown model" in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not ray.is_initialized()


def test_a_hub_id_that_cannot_be_fetched_gets_the_loaders_reason(monkeypatch):
    """As `lvlm generate` says it: the offline variable, or no network; not a ConnectError repr."""
    import huggingface_hub
    import ray

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_serve("--model", "no-such-owner/no-such-model", "--port", "0")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "cannot load model 'no-such-owner/no-such-model': not in the local Hugging Face cache, and " \
           "HF_HUB_OFFLINE=1 forbids downloading it (unset it)" in result.output, result.output

    def unreachable(*_a, **_k):
        raise ConnectionError("[Errno 101] Network is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    result = run_serve("--model", "no-such-owner/no-such-model", "--port", "0")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "the hub cannot be reached (no network?)" in result.output and "Errno" not in result.output
    assert not ray.is_initialized()


@pytest.mark.parametrize("option, value", [
    ("--port", "-1"), ("--port", "65536"), ("--replicas", "0"), ("--max-replicas", "0"),
    ("--max-batch-size", "0"), ("--batch-wait-ms", "-1"), ("--num-gpus", "-0.5"), ("--eval-num-gpus", "-1"),
    ("--max-tokens", "0"), ("--max-concurrent", "0"),
])
def test_numbers_out_of_range_are_one_usage_line_exit_2(capsys, option, value):
    from lvlm_hallu import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--model", "tiny-llava", option, value])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: lvlm serve: ") and f"Invalid value for '{option}'" in lines[0], lines[0]
    assert "Overflow" not in err and "Traceback" not in err


def test_max_replicas_below_replicas_is_refused():
    result = run_serve("--model", "tiny-llava", "--port", "0", "--replicas", "3", "--max-replicas", "2")
    assert result.exit_code == 2 and "--max-replicas 2 is below --replicas 3" in result.output, result.output


def test_router_dir_must_exist(tmp_path):
    result = run_serve("--model", "tiny-llava", "--port", "0", "--router-dir", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "not a directory" in result.output


# -- the job store is checked before Ray starts (serve/jobstore.py check_store) --------------------

def make_store(root, jobs: int = 2):
    from lvlm_hallu.serve.jobstore import JobStore

    store = JobStore(root)
    made = [store.create("chair", "shapes", {"limit": 2}) for _ in range(jobs)]
    for job in made:
        Path(job.workdir).mkdir()
    return store, made


def test_a_corrupt_job_store_refuses_to_start_in_one_line(tmp_path):
    import ray

    store, _ = make_store(tmp_path)
    data = bytearray(store.path.read_bytes())
    data[100:4096] = b"\x5a" * (4096 - 100)  # garbage over the schema page, header intact
    store.path.write_bytes(bytes(data))
    result = run_serve("--model", "tiny-llava", "--port", "0", "--jobs-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and str(store.path) in line and "move it aside" in line, line
    store.path.write_bytes(b"not a database at all, just text" * 10)
    result = run_serve("--model", "tiny-llava", "--port", "0", "--jobs-dir", str(tmp_path))
    assert result.exit_code == 2 and "is not a SQLite database" in result.output
    assert not ray.is_initialized()


def test_a_truncated_job_store_with_job_folders_refuses_to_start(tmp_path):
    store, _ = make_store(tmp_path)
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(store.path) + suffix)
        if path.exists():
            path.write_bytes(b"")
    result = run_serve("--model", "tiny-llava", "--port", "0", "--jobs-dir", str(tmp_path))
    assert result.exit_code == 2 and "2 job folders exist" in result.output and str(store.path) in result.output


def test_job_folders_without_a_row_are_reported_not_dropped(tmp_path):
    from lvlm_hallu.serve.jobstore import check_store

    store, made = make_store(tmp_path, jobs=1)
    (tmp_path / "evaljob-0123456789abcdef").mkdir()
    assert check_store(tmp_path) == ["evaljob-0123456789abcdef"]
    assert (tmp_path / "evaljob-0123456789abcdef").is_dir() and Path(made[0].workdir).is_dir()
    assert check_store(tmp_path / "fresh") == []  # a new directory is a new, empty store


def test_api_keys_from_options_and_a_file(tmp_path):
    from lvlm_hallu.serve.cli import _api_keys

    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalpha-key-1\n\nbeta-key-2  # ci\nalpha-key-1\n")
    assert _api_keys(["gamma-key-3"], keys_file) == (("gamma-key-3", "alpha-key-1", "beta-key-2"), None)
    assert _api_keys([], None) == ((), None)
    keys, problem = _api_keys([], tmp_path / "missing")
    assert keys == () and "cannot read --api-keys-file" in problem
    result = run_serve("--model", "tiny-llava", "--port", "0", "--api-keys-file", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "cannot read" in result.output
