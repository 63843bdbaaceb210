"""`lvlm serve`: start Ray (locally, or join a cluster with --address), deploy the service, block.

Register on the main typer app with `app.command("serve")(serve_command)`; it also runs alone as
`python -m serve.cli --model tiny-llava`.

Ray 2.60 turns token authentication on by default. A local run sets `RAY_AUTH_MODE=disabled`
unless the user chose a mode; joining a cluster keeps the cluster's mode and Ray reads the token
from `RAY_AUTH_TOKEN`, which must then be set in this shell.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)


def serve_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="'shapes' (default), 'tiny-llava', hub id or path"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port"),
    replicas: int = typer.Option(1, "--replicas", help="model replicas (the minimum when autoscaling)"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="autoscale up to this many replicas"),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="requests per engine batch"),
    batch_wait_ms: float = typer.Option(50.0, "--batch-wait-ms", help="how long a batch waits to fill"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LVLM_API_KEY",
                                          help="require 'Authorization: Bearer <key>' (env LVLM_API_KEY)"),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="accept http(s) image URLs (public addresses only)"),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                                          help="join this Ray cluster instead of starting one"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16, bfloat16 (default per device)"),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", help="GPUs per replica (default: 1 on cuda)"),
    eval_num_gpus: Optional[float] = typer.Option(
        None, "--eval-num-gpus",
        help="GPUs per eval-job worker (default: as --num-gpus; on one GPU use 0.5 and --num-gpus 0.5 to share)"),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="largest max_tokens a request may ask for"),
    max_concurrent: int = typer.Option(32, "--max-concurrent", help="generation requests per replica before 429"),
    eval_jobs: bool = typer.Option(True, "--eval-jobs/--no-eval-jobs", help="accept POST /v1/eval/jobs"),
) -> None:
    """Serve the OpenAI-compatible API (chat completions with interventions, eval jobs) on Ray Serve."""
    from serve.config import ServeConfig
    from serve.limits import Limits

    device = device or _default_device()
    gpus = num_gpus if num_gpus is not None else (1.0 if device.startswith("cuda") else 0.0)
    config = ServeConfig(
        model=model or _default_model(), device=device, dtype=dtype, replicas=replicas, max_replicas=max_replicas,
        num_gpus=gpus, eval_num_gpus=gpus if eval_num_gpus is None else eval_num_gpus,
        max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000, api_key=api_key, eval_jobs=eval_jobs,
        limits=Limits(allow_remote_images=allow_remote_images, max_tokens=max_tokens, max_concurrent=max_concurrent),
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print("[yellow]warning:[/yellow] listening beyond loopback without --api-key")
    _start_ray(address)
    from ray import serve

    from serve.app import run

    console.print(f"starting {config.model} on {device} ({replicas} replica(s), batches of {max_batch_size}) ...")
    try:
        run(config, host=host, port=port)
    except Exception as err:  # noqa: BLE001 - a failed deployment is a message and exit code, not a trace
        console.print(f"[red]error:[/red] the service did not start: {err}")
        _stop(address)
        raise typer.Exit(1) from None
    base = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    console.print(f"[green]listening on {base}[/green]  (OpenAI base URL {base}/v1, metrics {base}/metrics)")
    console.print("Ctrl-C to stop")
    # SIGTERM (docker stop, systemd, kill) must shut Ray down as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        if address is not None:
            serve.delete("lvlm")  # leave the cluster as we found it
        _stop(address)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_model() -> str:
    from lvlm.loader import default_model

    return default_model()


def _start_ray(address: Optional[str]) -> None:
    import ray

    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False)
        return
    if not os.environ.get("RAY_AUTH_TOKEN") and os.environ.get("RAY_AUTH_MODE", "token") != "disabled":
        console.print("[yellow]note:[/yellow] RAY_AUTH_TOKEN is not set; a cluster with token auth will refuse us")
    ray.init(address=address)


def _stop(address: Optional[str]) -> None:
    import ray
    from ray import serve

    if address is None:
        serve.shutdown()
    ray.shutdown()


def main() -> None:
    typer.run(serve_command)


if __name__ == "__main__":
    main()
