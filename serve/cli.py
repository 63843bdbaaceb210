"""`lvlm serve`: start Ray (locally, or join a cluster with --address), deploy the service, block.

Register on the main typer app with `app.command("serve")(serve_command)`; it also runs alone as
`python -m lvlm_hallu.serve.cli --model tiny-llava`.

Before Ray starts, two checks answer in one line instead of a wall of Ray tracebacks: the port
must be free (Ray's proxy binds with SO_REUSEPORT, so a second server on the same port would
silently split the traffic with the first), and the model name must resolve to a known model or
a readable checkpoint config (a hub id that cannot be fetched gets the loader's one-line reason,
lvlm/loader.py `unavailable`: offline variable set, no network, gated, not found). Numbers out of
their range (a port beyond 0-65535, zero replicas) are click usage errors, exit 2.

A third: with eval jobs on, the job store is checked (serve/jobstore.py `check_store`): a corrupt
or truncated store refuses to start with one line naming the file and the way out, and job
folders without a row are reported.

Ray is private by default. Ray 2.60 turns token authentication on by default; a local run sets
`RAY_AUTH_MODE=disabled` unless the user chose a mode, and so it also binds every Ray process
(GCS, raylet, workers, dashboard agent) to 127.0.0.1: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is
Ray's switch for a single-node, loopback-only instance (its default on macOS and Windows), under
which the node's address is the loopback one. Joining a cluster (`--address`) is the user's
explicit choice: the cluster keeps its own mode and Ray reads the token from `RAY_AUTH_TOKEN`,
which must then be set in this shell (docs/serving.md, "Ray's own ports").
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def serve_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="'shapes' (default), 'tiny-llava', hub id or path"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port to listen on"),
    replicas: int = typer.Option(1, "--replicas", min=1, help="model replicas (the minimum when autoscaling)"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1, help="autoscale up to this many replicas"),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1,
                                       help="static: requests per engine batch; continuous: rows decoding at once"),
    batch_wait_ms: float = typer.Option(50.0, "--batch-wait-ms", min=0.0, help="how long a batch waits to fill"),
    scheduler: str = typer.Option("continuous", "--scheduler",
                                  help="continuous (rows join and leave between decode steps) or static (whole batches)"),
    max_prefill_tokens: int = typer.Option(
        2048, "--max-prefill-tokens", min=1,
        help="continuous: tokens one prefill between two decode steps may hold (rows incl. VHR/PAI twins x the group's "
        "longest prompt, image tokens included); bounds the pause of running rows. A longer prompt runs alone"),
    admit_after_steps: int = typer.Option(
        6, "--admit-after-steps", min=0,
        help="continuous: refill threshold in decode steps (serve/scheduler.py REFILL_STEPS). An empty batch admits at "
        "once; a running one refills its free rows once (waiting requests / --max-batch-size) x (decode steps its "
        "longest row may still take) reaches this, or the group fills --max-prefill-tokens. The default is right for "
        "the shapes model on a CPU, where a prefill call costs ~3 decode steps: short answers prefill in groups as "
        "large as a static batch, long answers refill each freed row at once. For a 7B model on a GPU it refills "
        "long answers at once too; a lower value (1-2) refills short answers sooner there, where a decode step "
        "costs more than a prefill call's fixed part. Higher: more like static batches; 0: refill at once (vLLM)"),
    api_key: Optional[list[str]] = typer.Option(
        None, "--api-key", envvar="LVLM_API_KEY",
        help="require 'Authorization: Bearer <key>'; repeat for several keys, each owning its eval jobs "
        "(env LVLM_API_KEY, keys separated by spaces)"),
    api_keys_file: Optional[Path] = typer.Option(
        None, "--api-keys-file", help="a file of API keys, one per line ('#' starts a comment); adds to --api-key"),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.1,
                                       help="seconds a request body may take to arrive (408 after)"),
    max_uploads: int = typer.Option(16, "--max-uploads", min=1,
                                    help="request bodies arriving at once before 429 (slow or stalled uploads)"),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="accept http(s) image URLs (public addresses only)"),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                                          help="join this Ray cluster instead of starting one"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16, bfloat16 (default per device)"),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", min=0.0, help="GPUs per replica (default: 1 on cuda)"),
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="split the model over the replica's GPUs / CPU / disk (accelerate): auto | balanced | "
        "sequential | JSON {module: device}; with --num-gpus N a replica spreads over its N GPUs"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="memory per device for --device-map, e.g. '0=20GiB,1=20GiB,cpu=64GiB'"),
    offload_folder: Optional[str] = typer.Option(None, "--offload-folder", help="folder for weights the device map offloads to disk"),
    eval_num_gpus: Optional[float] = typer.Option(
        None, "--eval-num-gpus", min=0.0,
        help="GPUs per eval-job model replica (default: as --num-gpus; one GPU: 0.5 here and --num-gpus 0.5)"),
    eval_replicas: int = typer.Option(
        1, "--eval-replicas", min=1,
        help="model replicas per eval job, anywhere in the Ray cluster (the runner of lvlm eval --ray-actors)"),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="largest max_tokens a request may ask for"),
    max_concurrent: int = typer.Option(32, "--max-concurrent", min=1, help="generation requests per replica before 429 (at least 2 x --max-batch-size: one batch runs while the next fills)"),
    eval_jobs: bool = typer.Option(True, "--eval-jobs/--no-eval-jobs", help="accept POST /v1/eval/jobs"),
    jobs_dir: Optional[Path] = typer.Option(
        None, "--jobs-dir", envvar="LVLM_JOBS_DIR",
        help="eval job store (SQLite) and job folders; default $LVLM_CACHE/eval-jobs"),
    jobs_keep_days: float = typer.Option(7.0, "--jobs-keep-days", min=0.001, help="remove finished jobs after N days"),
    router_dir: Optional[Path] = typer.Option(
        None, "--router-dir", help="directory of VTE router weights (<name>.pt), chosen by name in requests"),
) -> None:
    """Serve the OpenAI-compatible API (chat completions with interventions, eval jobs) on Ray Serve."""
    from lvlm_hallu.serve.config import ServeConfig
    from lvlm_hallu.serve.limits import Limits

    if address is None:
        private_ray_env()  # before anything below imports ray
    name = model or _default_model()
    keys, key_problem = _api_keys(api_key or [], api_keys_file)
    problem = key_problem or _port_problem(host, port) or _model_problem(name) or _router_dir_problem(router_dir)
    if not problem and eval_jobs:
        problem = _jobs_problem(jobs_dir)
    if not problem and scheduler not in ("continuous", "static"):
        problem = f"--scheduler must be 'continuous' or 'static', got {scheduler!r}"
    if not problem and max_replicas is not None and max_replicas < replicas:
        problem = f"--max-replicas {max_replicas} is below --replicas {replicas} (the minimum when autoscaling)"
    if problem:
        console.print(f"[red]error:[/red] {problem}", soft_wrap=True)  # one line, however long
        raise typer.Exit(2)
    try:
        from lvlm_hallu.lvlm.cli import placement

        placed = placement(device_map, max_memory, offload_folder)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(2) from None
    device = device or _default_device()
    gpus = num_gpus if num_gpus is not None else (1.0 if device.startswith("cuda") else 0.0)
    config = ServeConfig(
        model=name, device=device, dtype=dtype, replicas=replicas, max_replicas=max_replicas, **placed,
        num_gpus=gpus, eval_num_gpus=gpus if eval_num_gpus is None else eval_num_gpus, eval_replicas=eval_replicas,
        max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000, api_keys=keys, eval_jobs=eval_jobs,
        body_timeout_s=body_timeout, max_uploads=max_uploads,
        scheduler=scheduler, max_prefill_tokens=max_prefill_tokens, admit_after_steps=admit_after_steps,
        router_dir=str(router_dir.resolve()) if router_dir else None,
        eval_jobs_dir=str(jobs_dir.expanduser().resolve()) if jobs_dir else None, eval_keep_days=jobs_keep_days,
        limits=Limits(allow_remote_images=allow_remote_images, max_tokens=max_tokens, max_concurrent=max_concurrent),
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not keys:
        console.print("[yellow]warning:[/yellow] listening beyond loopback without --api-key")
    _start_ray(address)
    from ray import serve

    from lvlm_hallu.serve.app import run

    console.print(f"starting {config.model} on {device} ({replicas} replica(s), batches of {max_batch_size}) ...")
    try:
        run(config, host=host, port=port)
    except Exception as err:  # noqa: BLE001 - a failed deployment is a message and exit code, not a trace
        console.print(f"[red]error:[/red] the service did not start: {_first_line(err)}", soft_wrap=True)
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


def _port_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be ours, or None. A plain bind (no SO_REUSEPORT) fails on any listener."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another server?); choose another with --port"
            return f"cannot listen on {host}:{port}: {err.strerror or err}"
    return None


def _model_problem(name: str) -> str | None:
    """Why `name` cannot be loaded, found in seconds from its config alone, or None."""
    from lvlm_hallu.lvlm import tiny

    if name in tiny.ALL:
        return None
    from lvlm_hallu.lvlm.shapes import EMBEDDED, embedded_dir, missing_message

    folder = embedded_dir(name)
    if folder is not None:
        return None if (folder / "config.json").exists() else missing_message(name)
    known = f"use {', '.join(repr(t) for t in [*EMBEDDED, *sorted(tiny.ALL)])}, a hub id (org/name) or a checkpoint directory"
    local = Path(name).expanduser()
    if not local.exists() and not HUB_ID.fullmatch(name):
        return f"unknown model {name!r}: not a known name, a directory, or a hub id; {known}"
    try:
        from transformers import AutoConfig

        from lvlm_hallu.lvlm.adapters import adapter_for

        if local.exists():
            config = AutoConfig.from_pretrained(str(local))
        else:
            try:
                config = _hub_config(name)
            except Exception as err:  # noqa: BLE001 - the loader's one-line reason, as `lvlm generate` gives it
                from lvlm_hallu.lvlm.loader import unavailable

                return str(unavailable(name, err))
        adapter_for(config)
    except Exception as err:  # noqa: BLE001 - any failure to read the config means "not loadable"
        return f"unknown model {name!r} ({type(err).__name__}: {_first_line(err)}); {known}"
    return None


def _hub_config(name: str):
    """The config of a hub model: from the local cache, else one quick look-up (no retry loop)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise
    import huggingface_hub

    huggingface_hub.model_info(name, timeout=10)  # raises at once when offline or unknown
    return AutoConfig.from_pretrained(name)


def _api_keys(given: list[str], keys_file: Optional[Path]) -> tuple[tuple[str, ...], str | None]:
    """Every key from --api-key (or LVLM_API_KEY) and --api-keys-file, and a problem, if any."""
    keys = [k.strip() for k in given if k.strip()]
    if keys_file is not None:
        try:
            lines = keys_file.read_text().splitlines()
        except OSError as err:
            return (), f"cannot read --api-keys-file {keys_file}: {err.strerror or err}"
        keys += [line.split("#", 1)[0].strip() for line in lines]
        keys = [k for k in keys if k]
        if not keys:
            return (), f"--api-keys-file {keys_file} holds no keys"
    return tuple(dict.fromkeys(keys)), None


def _jobs_problem(jobs_dir: Optional[Path]) -> str | None:
    """Why the eval job store cannot be used as it is, or None; job folders without a row are
    reported here (never deleted)."""
    from lvlm_hallu.serve.jobstore import JobStoreError, check_store, default_jobs_dir

    root = jobs_dir.expanduser() if jobs_dir else default_jobs_dir()
    try:
        orphans = check_store(root)
    except JobStoreError as err:
        return str(err)
    except OSError as err:
        return f"cannot use the eval job directory {root}: {err.strerror or err}"
    if orphans:
        shown = ", ".join(orphans[:3]) + (" ..." if len(orphans) > 3 else "")
        console.print(f"[yellow]warning:[/yellow] {len(orphans)} job folder(s) in {root} have no row in the job store "
                      f"(kept, not listed by the API): {shown}", soft_wrap=True)
    return None


def _router_dir_problem(router_dir: Optional[Path]) -> str | None:
    if router_dir is not None and not router_dir.is_dir():
        return f"--router-dir {router_dir} is not a directory"
    return None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:160] if lines else type(err).__name__


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_model() -> str:
    from lvlm_hallu.lvlm.loader import default_model

    return default_model()


def _start_ray(address: Optional[str]) -> None:
    import ray

    if address is None:
        start_private_ray()
        return
    if not os.environ.get("RAY_AUTH_TOKEN") and os.environ.get("RAY_AUTH_MODE", "token") != "disabled":
        console.print("[yellow]note:[/yellow] RAY_AUTH_TOKEN is not set; a cluster with token auth will refuse us")
    ray.init(address=address)


def private_ray_env() -> None:
    """The environment of a private single-node Ray. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    when it is imported, so this runs before anything imports ray."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's single-node switch: the node address is 127.0.0.1, so the GCS, raylet, worker and
    # agent ports listen on loopback only (module docstring). Workers inherit it.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def start_private_ray(**init_kwargs) -> None:
    """A new single-node Ray instance of our own (never a cluster someone else started), with
    every Ray port on 127.0.0.1 and authentication off unless the user chose a mode."""
    private_ray_env()
    import ray

    ray.init(address="local", include_dashboard=False, **init_kwargs)
    node = ray.util.get_node_ip_address()
    if node not in ("127.0.0.1", "::1"):  # ray was imported before private_ray_env ran
        console.print(f"[yellow]warning:[/yellow] Ray's ports listen on {node}, not only on loopback; start with "
                      "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment", soft_wrap=True)


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
