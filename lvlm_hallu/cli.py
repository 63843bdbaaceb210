"""The `lvlm` command line: the root that mounts the commands of every package.

It lives above `lvlm/`, `eval/` and `serve/` because it imports all of them: models must not know
the service, so the model package only provides its own commands (`lvlm/cli.py`).
"""

from __future__ import annotations

import sys

import typer

from lvlm_hallu.eval.cli import app as eval_app
from lvlm_hallu.eval.tune import tune_command
from lvlm_hallu import demo
from lvlm_hallu.lvlm import cli as model_cli
from lvlm_hallu.lvlm.inspection import cli as inspection_cli
from lvlm_hallu.serve.cli import serve_command

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="LLaVA-class models with hallucination interventions.")


@app.callback()
def _root() -> None:
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


def main() -> None:
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
