"""`serve_command` registers on a typer app (as the lead mounts it under `lvlm serve`)."""

from __future__ import annotations

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


def test_router_dir_must_exist(tmp_path):
    result = run_serve("--model", "tiny-llava", "--port", "0", "--router-dir", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "not a directory" in result.output
