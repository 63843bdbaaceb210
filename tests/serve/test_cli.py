"""`serve_command` registers on a typer app (as the lead mounts it under `lvlm serve`)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from serve.cli import serve_command


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
