"""The `lvlm` command line: the root that mounts the commands of every package.

It lives above `lvlm/`, `eval/` and `serve/` because it imports all of them: models must not know
the service, so the model package only provides its own commands (`lvlm/cli.py`).

Errors: `main()` is the one place that turns what a user can get wrong into one line on stderr
and exit status 2, whatever command raised it: click's usage errors (an option out of its range,
a missing argument), and the project's typed errors (`LVLMError`, `EvalError`,
`InterventionError`, the service client's `APIError`) together with the OS and value errors that
bad files and names raise. Anything else is a bug: one line too, exit 1, and `LVLM_TRACEBACK=1`
shows the traceback.
"""

from __future__ import annotations

import os
import re
import sys

import typer
import typer.main

from lvlm_hallu.eval.cli import app as eval_app
from lvlm_hallu.eval.tune import tune_command
from lvlm_hallu import demo
from lvlm_hallu.lvlm import cli as model_cli
from lvlm_hallu.lvlm.inspection import cli as inspection_cli
from lvlm_hallu.serve.cli import serve_command

CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  context_settings=CONTEXT, help="LLaVA-class models with hallucination interventions.")


def version() -> str:
    """The installed distribution's version (pyproject.toml's in a source checkout run uninstalled)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lvlm-hallu")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        print(f"lvlm {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print the version and exit"),
) -> None:
    """LLaVA-class models with training-free hallucination interventions."""


app.command("generate", help="Answer one prompt about one image and print the answer and timings.",
            cls=model_cli.PresetsHelp)(model_cli.generate)
app.command("profile", help="Compute and cache a model's intervention profile.")(model_cli.profile)
app.command("bench", help="Run a benchmark script from benchmarks/ (side-by-side ratios).")(model_cli.bench)
app.command("info", help="Memory estimate before loading: weights, KV cache per 1k tokens, largest batch that fits.")(model_cli.info)
app.command("demo", help="Show one held-out image where the default interventions remove a hallucinated object.")(demo.command)
app.command("inspect", help="Pictures of what each intervention sees and changes, on one HTML page.")(inspection_cli.command)
app.command("tune", help="Search each intervention's parameters on a validation split (preset \"tuned\").")(tune_command)
app.command("serve", help="Serve a model over an OpenAI-compatible HTTP API (Ray Serve).")(serve_command)
app.add_typer(eval_app, name="eval", help="CHAIR and POPE evaluation (local, service or Ray runs).")


def one_line(text: str) -> str:
    """A message on one line: line breaks and runs of blanks become one space."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (a name, a file, a value, an unreachable service)."""
    from lvlm_hallu.eval.errors import EvalError
    from lvlm_hallu.interventions import InterventionError
    from lvlm_hallu.lvlm.errors import LVLMError
    from lvlm_hallu.serve.client import APIError

    return LVLMError, EvalError, InterventionError, APIError, OSError, ValueError, LookupError


def command_path(args: list[str]) -> str:
    """'lvlm eval chair' for ['eval', 'chair', '-n', '0']: the command names that lead `args`."""
    command, path = typer.main.get_command(app), ["lvlm"]
    for arg in args:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            break
        command = sub
        path.append(arg)
    return " ".join(path)


def _fail(message: str, code: int) -> None:
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the `lvlm` command with `argv` (default sys.argv[1:]); errors as one line, exit 2."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every command
    hub_logging.set_verbosity_error()  # no retry warning per attempt: a hub id that cannot be had is one error line
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args, prog_name="lvlm", standalone_mode=False)
    except typer.TyperException as err:  # click's usage errors (typer vendors click): ranges, unknown commands
        if type(err).__name__ == "NoArgsIsHelpError":
            print(err.ctx.get_help())
            sys.exit(2)
        ctx = getattr(err, "ctx", None)
        where = ctx.command_path if ctx is not None else command_path(args)
        _fail(f"{where}: {err.format_message()} (see `{where} -h`)", 2)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except Exception as err:  # noqa: BLE001 (the one place that keeps tracebacks off the user's screen)
        if os.environ.get("LVLM_TRACEBACK") == "1":
            raise
        if isinstance(err, user_errors()):
            _fail(str(err) or type(err).__name__, 2)
        _fail(f"unexpected {type(err).__name__}: {err} (a bug: LVLM_TRACEBACK=1 shows the traceback)", 1)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
