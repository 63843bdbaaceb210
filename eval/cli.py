"""`lvlm eval ...`: CHAIR and POPE runs, comparisons of interventions, and offline CHAIR scoring.

Follows docs/eval.md: CHAIR (Rohrbach et al. 2018, arXiv:1809.02156) on seeded samples of COCO
images with the reference NLTK flavour; POPE (Li et al. 2023, arXiv:2305.10355) with the official
answer parser by default. Inputs are checked before any model loads (eval/datasets.py);
`--model shapes` with no dataset argument evaluates on the generated shapes world (eval/world.py);
`--max-new-tokens` is fitted into the model's context (eval/context.py); `--device`, `--dtype` and
`--device-map` place the model as for `lvlm generate` (with `--ray-actors`, each replica on the GPU
it reserves), and `--batch-size auto` takes the most rows the memory estimate fits. Models are loaded lazily
(`lvlm.load`) inside the command that needs one; `--server` sends the requests to a running
service through its SDK client instead, and `--ray-actors N` spreads them over N model replicas.
Every run has a fingerprint (eval/fingerprint.py); its default output folder is
runs/eval/<benchmark>-<model>-<fingerprint>, with a resumable results file per configuration and
a report (JSON, Markdown, PNG) with paired bootstrap intervals against the first configuration.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lvlm_hallu.eval.errors import EvalError

# rich_markup_mode=None: help texts such as "{image_id: [category]}" are printed as written.
app = typer.Typer(help="CHAIR and POPE evaluation (docs/evaluation.md).", no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console()


class _JsonOutput:
    """With --json, stdout holds only the JSON: the console's status lines go to stderr meanwhile."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        global console
        self.saved = console
        if self.on:
            console = Console(stderr=True)
        return self

    def __exit__(self, *exc):
        global console
        console = self.saved

CHAIR_MAX_NEW_TOKENS = 512  # the papers' long-caption protocol (64 with --short-caption)
CHAIR_SHORT_MAX_NEW_TOKENS = 64
POPE_MAX_NEW_TOKENS = 16  # one word or phrase
RUNS = Path("runs/eval")

# ---------------------------------------------------------------------------------------------
# Shared options (typer reads the defaults; one definition keeps the commands consistent)

ModelOpt = typer.Option(
    "shapes", "--model", help="model name, hub id or local path for lvlm.load; shapes with no data options "
    "evaluates on the generated shapes world"
)
ImagesOpt = typer.Option(None, "--images", help="folder with the images named in the annotations")
AnnotationsOpt = typer.Option(
    None, "--annotations", help="folder with instances_*.json / captions_*.json (COCO 2014, 2017, shapes splits)"
)
InstancesOpt = typer.Option(None, "--instances", help="COCO instances file")
CaptionsOpt = typer.Option(None, "--captions", help="COCO captions file (human captions)")
NOpt = typer.Option(None, "-n", min=1, help="number of images to sample [default: 500; 20 on the generated shapes world]")
SeedOpt = typer.Option(0, "--seed", help="seed of the image sample (recorded in the report)")
BatchOpt = typer.Option(
    "8", "--batch-size", help="images per generate call (per wave of requests with --server), or auto: the most "
    "rows the memory estimate of `lvlm info` fits on the device"
)
MaxNewOpt = typer.Option(
    None, "--max-new-tokens", min=1,
    help="[default: 512 (CHAIR), 64 (CHAIR short), 16 (POPE)]; lowered to fit the model's context (also with --server)"
)
OutOpt = typer.Option(None, "--out", help="output folder [default: runs/eval/<benchmark>-<model>-<fingerprint>]")
ServerOpt = typer.Option(None, "--server", help="service base URL: use the remote runner")
ApiKeyOpt = typer.Option(None, "--api-key", envvar="LVLM_API_KEY")
RayOpt = typer.Option(0, "--ray-actors", min=0, help="spread batches over N Ray model actors (0: in process)")
JsonOpt = typer.Option(False, "--json", help="print the report as JSON on stdout (status lines go to stderr)")
ProgressOpt = typer.Option(True, "--progress/--no-progress")
DeviceOpt = typer.Option(
    "cpu", "--device", help="cpu, cuda, cuda:N or auto (cuda when there is a GPU); with --ray-actors each replica "
    "loads on the GPU it reserves"
)
DtypeOpt = typer.Option(None, "--dtype", help="float32, float16, bfloat16 [default: float16 on CUDA, float32 on CPU]")
DeviceMapOpt = typer.Option(
    None, "--device-map", help="split the model across devices (accelerate): auto | balanced | sequential | JSON "
    "{module: device} or a JSON file"
)
ResamplesOpt = typer.Option(
    None, "--resamples", min=1,
    help="paired bootstrap resamples [default: 1000, more above 95%: 25 beyond each bound]; at least 10 must lie "
    "beyond each bound of the --level interval",
)
LevelOpt = typer.Option(
    0.95, "--level",
    help="two-sided confidence level of the intervals, e.g. 0.9875 for a Bonferroni level over four comparisons",
)


def _check_level(level: float, resamples: int | None = None) -> None:
    from lvlm_hallu.eval.significance import check_level, check_resamples

    try:
        check_level(level)
    except ValueError as err:
        raise EvalError(f"--level: {err}") from err
    try:
        check_resamples(resamples, level)
    except ValueError as err:
        raise EvalError(f"--resamples: {err}") from err


def _fail(err: Exception) -> typer.Exit:
    """One line on stderr (paths stay whole for copying); the caller raises the Exit (status 2)."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(' '.join(str(err).split()))}", soft_wrap=True)
    return typer.Exit(2)


def _warn(text: str) -> None:
    Console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)


def _load_model(name: str, **load: Any) -> Any:
    from lvlm_hallu import lvlm  # lazy: torch and the model stack load only when a command runs a model

    return lvlm.load(name, **load)


def _placement(device: str, dtype: str | None, device_map: str | None, server: str | None,
               ray_actors: int) -> Any:
    """The model's placement (eval.context.Placement), checked before anything loads; None with
    --server (the service places its model). Ray replicas resolve "auto" against the cluster."""
    from lvlm_hallu.eval.context import Placement

    if server:
        if (device, dtype, device_map) != ("cpu", None, None):
            raise EvalError("--device, --dtype and --device-map place a local model; the service at --server "
                            "places its own (lvlm serve --device ...)")
        return None
    if device_map is not None:
        from lvlm_hallu.lvlm.devices import parse_device_map

        try:
            device_map = parse_device_map(device_map)
        except ValueError as err:
            raise EvalError(f"--device-map: {err}") from err
    if ray_actors == 0 and device_map is None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            cuda = torch.device(device).type == "cuda"
        except RuntimeError as err:
            raise EvalError(f"--device: unknown device {device!r}; use cpu, cuda, cuda:N or auto") from err
        if cuda and not torch.cuda.is_available():
            raise EvalError(f"--device {device}: torch sees no GPU on this machine; use --device cpu")
    placement = Placement(device, dtype, device_map)
    placement.fields()  # an unknown --dtype fails now
    return placement


def _batch_size(text: str, server: str | None) -> int | str:
    if text == "auto":
        if server:
            raise EvalError("--batch-size auto sizes batches for a local model; with --server give a number")
        return text
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise EvalError(f"--batch-size must be a positive integer or auto, got {text!r}")
    return size


def _resolver() -> Any:
    """`interventions.resolve` with its errors turned into EvalError, or None if unavailable."""
    try:
        from lvlm_hallu.interventions import resolve
    except ImportError:  # the engine then receives the spec's names
        return None

    def checked(spec: Any) -> tuple[Any, ...]:
        try:
            return tuple(resolve(spec))
        except ValueError as err:  # InterventionError: unknown name or bad parameter
            raise EvalError(f"interventions {spec!r}: {err}") from err

    return checked


def _config_dict(config: Any) -> dict[str, Any]:
    """An intervention config with all its parameters (defaults included) for the report."""
    params = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {"repr": repr(config)}
    return {"name": getattr(config, "name", type(config).__name__), **params}


def model_facts(info: Any, model: str) -> dict[str, Any]:
    """Provenance fields from a pipeline's `info()` dict; what it does not say stays None."""
    facts = dict(info or {})
    named = {
        "model_id": facts.pop("model_id", None) or model,
        "model_revision": facts.pop("revision", None) or facts.pop("model_revision", None),
        "dtype": facts.pop("dtype", None),
        "attention_backend": facts.pop("attention_backend", None),
        "processor": facts.pop("processor", None),
    }
    return {**named, "extra": facts or None}


def _info(model: Any) -> dict[str, Any]:
    info = getattr(model, "info", None)
    return dict(info() if callable(info) else info or {})


def _executor(
    model: str,
    server: str | None,
    api_key: str | None,
    ray_actors: int,
    decoding: dict,
    batch_size: int | str,
    progress: bool,
    placement: Any = None,
    tokens: int | None = None,
) -> tuple[Any, dict[str, Any], Any, Any]:
    """(executor, provenance facts, cleanup, values) for the chosen runner: remote, Ray, or in
    process. `values(spec)`: the configs as the loaded model runs them, None with --server.
    `placement` (eval.context.Placement) places the local model or each replica; `batch_size`
    "auto" is sized from the memory estimate for `tokens` per row, once the model is placed."""
    from lvlm_hallu.eval.compare import answer_executor, local_adapter, ray_executor
    from lvlm_hallu.eval.runner import intervention_values, local_answer, model_context, remote_answer

    if server:
        from lvlm_hallu.serve.client import Client  # lazy: eval never imports serve/ at module load

        client = Client(server, api_key=api_key)

        def make_remote(spec: Any) -> Any:
            return remote_answer(
                client,
                max_tokens=decoding["max_new_tokens"],
                temperature=decoding["temperature"],
                interventions=spec,
            )

        facts = {"model_id": model, "extra": {"server": server}}
        return answer_executor(make_remote, batch_size=batch_size, progress=progress), facts, lambda: None, None

    resolve = _resolver()
    if ray_actors > 0:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        from lvlm_hallu.eval.cluster import load_replica, replica_resources
        from lvlm_hallu.eval.context import Placement, auto_batch_size, replica_budget

        # A GPU placement reserves one GPU per replica when there are enough (else a share of them);
        # each replica then loads on the GPU it reserved (eval.cluster.replica_device).
        placement = placement or Placement()
        try:
            device, options = replica_resources(placement.device, placement.device_map, ray_actors,
                                                ray.cluster_resources().get("GPU", 0))
        except ValueError as err:
            raise EvalError(str(err)) from err
        # Replicas fed by the driver, which alone writes the results; images travel as bytes (docs/cluster.md).
        from lvlm_hallu.eval.cluster import ClusterPool

        pool = ClusterPool(partial(load_replica, model, device=device, dtype=placement.dtype,
                                   device_map=placement.device_map), ray_actors, actor_options=options)
        if batch_size == "auto":  # sized for the memory of a replica's device, measured there
            batch_size, how = auto_batch_size(model, Placement(device, placement.dtype, placement.device_map),
                                              tokens, budget_bytes=pool.call(replica_budget))
            console.print(how)

        def make_adapter(spec: Any) -> Any:
            return local_adapter(spec, resolve=resolve, **decoding)

        facts = model_facts(pool.info(), model)
        facts["extra"] = {**(facts["extra"] or {}), "ray_actors": ray_actors, "batch_size": batch_size,
                          "replicas": pool.where()}
        values = intervention_values(resolve, pool.call(model_context))
        return ray_executor(pool, make_adapter, batch_size=batch_size, progress=progress), facts, pool.shutdown, values

    from lvlm_hallu.eval.context import Placement, auto_batch_size

    placement = placement or Placement()
    pipeline = _load_model(model, **placement.load_kwargs())
    if batch_size == "auto":
        batch_size, how = auto_batch_size(model, placement, tokens)
        console.print(how)

    def make_local(spec: Any) -> Any:
        return local_answer(pipeline, interventions=spec, resolve=resolve, **decoding)

    facts = model_facts(_info(pipeline), model)
    facts["extra"] = {**(facts["extra"] or {}), "batch_size": batch_size}
    return (
        answer_executor(make_local, batch_size=batch_size, progress=progress),
        facts,
        lambda: None,
        intervention_values(resolve, model_context(pipeline)),
    )


def _split_configs(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()] or ["none"]


def _named_config(text: str) -> tuple[str, Any]:
    """NAME=SPEC with SPEC a preset string or JSON (e.g. vhr-a1='[{"name": "vhr", "alpha": 1.0}]')."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip():
        raise EvalError(f"--config expects NAME=SPEC, got {text!r}")
    spec = spec.strip()
    if spec[:1] in "[{":
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise EvalError(f"--config {name}: SPEC is not valid JSON: {err}") from err
    return name.strip(), spec


def server_context(server: str, api_key: str | None, model: str) -> int | None:
    """The context the service reports for `model` (GET /v1/models), or None when it reports none
    or cannot be asked now (the run then reports the service's own error on its first request)."""
    from lvlm_hallu.serve.client import APIError, Client

    try:
        with Client(server, api_key=api_key) as client:
            cards = client.list_models()
    except (APIError, OSError, ValueError):
        return None
    card = next((c for c in cards if c.id == model), cards[0] if len(cards) == 1 else None)
    return card.max_context if card is not None else None


def _fit_decoding(task: Any, model: str, server: str | None, decoding: dict, api_key: str | None = None) -> dict:
    """Lower max_new_tokens to the model's context before loading it or sending anything.

    Local and --server runs alike measure the longest prompt with the model's processor when its
    checkpoint is readable here (shapes, a folder, a cached hub id: eval/context.py). With
    --server the context the service reports bounds it too: the service refuses a max_tokens that
    reaches its context."""
    from lvlm_hallu.eval.context import fit_max_new_tokens

    items = task.items()
    first_image = next((it.image for it in items if it.image), None)
    tokens, warning = fit_max_new_tokens(decoding["max_new_tokens"], model, [it.prompt for it in items], first_image)
    if server:
        context = server_context(server, api_key, model)
        if context is not None and tokens >= context:
            warning = (f"--max-new-tokens {decoding['max_new_tokens']} does not fit the context of {model!r} at "
                       f"{server} ({context} tokens): lowered to {context - 1}")
            tokens = context - 1
    if warning:
        _warn(warning)
    return {**decoding, "max_new_tokens": tokens}


def default_out(benchmark: str, model: str, digest: str) -> Path:
    """runs/eval/<benchmark>-<model>-<fingerprint>: one folder per run fingerprint."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model.rstrip("/")).name or model)[-40:]
    return RUNS / f"{benchmark}-{name}-{digest}"


def _print_report(report: Any, paths: Any) -> None:
    from lvlm_hallu.eval.report import format_interval
    from lvlm_hallu.eval.significance import level_label

    names: list[str] = []
    counts: list[str] = []
    for r in report.results:
        names.extend(k for k in r.metrics if k not in names)
        counts.extend(k for k in (r.counts or {}) if k not in counts)

    def cell(r: Any, n: str) -> str:
        return f"{r.metrics[n]:.2f}" + (" *" if r.significant(n) else "") if n in r.metrics else ""

    def count(r: Any, n: str) -> str:
        return str((r.counts or {}).get(n, ""))

    table = Table(title=f"{report.provenance.benchmark} — {report.provenance.model_id or ''}")
    if len(names) + len(counts) <= 6:
        table.add_column("configuration")
        for n in names + counts:
            table.add_column(n, justify="right")
        for r in report.results:
            table.add_row(r.name, *[cell(r, n) for n in names], *[count(r, n) for n in counts])
    else:  # many metrics (POPE: 5 per split): one row per metric keeps the table readable
        table.add_column("metric")
        for r in report.results:
            table.add_column(r.name, justify="right")
        for n in names:
            table.add_row(n, *[cell(r, n) for r in report.results])
        for n in counts:
            table.add_row(n, *[count(r, n) for r in report.results])
    console.print(table)
    sig = report.significance
    if sig and len(report.results) > 1:
        diff = Table(title=f"difference to {sig['baseline']}: paired bootstrap {level_label(sig['level'])} interval "
                           "(* significant, ~ borderline: within the bounds' Monte-Carlo error)")
        diff.add_column("metric")
        for r in report.results[1:]:
            diff.add_column(r.name, justify="right")
        for n in names:
            diff.add_row(n, *[format_interval(r.intervals[n]) if n in (r.intervals or {}) else "" for r in
                              report.results[1:]])
        console.print(diff)
    console.print(f"report: {paths.json}, {paths.markdown}" + (f", {paths.png}" if paths.png else ""))


def _default_folder(task: Any, model: str, fingerprint: Any, configs: Sequence[Any], server: str | None) -> Path:
    """The folder of a run without --out. With --server no resolved values are known, so the
    configurations as requested name it too: runs of other configurations never share a folder
    (nor overwrite each other's report)."""
    named = fingerprint.extend(interventions=list(configs)) if server else fingerprint
    return default_out(task.name, model, named.short)


def _run(
    task, configs, model, server, api_key, ray_actors, decoding, batch_size, seed, out, progress, names=None,
    *, sources=None, questions_built=False, resamples=None, level=0.95, inspect_k=0, as_json=False,
    placement=None,
):
    from lvlm_hallu.eval.compare import compare, plan_configs, run_fingerprint
    from lvlm_hallu.eval.fingerprint import model_identity
    from lvlm_hallu.eval.report import Provenance
    from lvlm_hallu.eval.runner import RESOLVED_FIELD

    # Resolving locally validates the specs before any generation and records every parameter;
    # with --server the service validates them (it may run another registry version). The values
    # the model runs (tuned, scaled) are known once it is loaded: they are fingerprinted then,
    # before anything is generated; the other fields are checked before loading it.
    resolve = None if server else _resolver()
    describe = None if resolve is None else (lambda spec: [_config_dict(c) for c in resolve(spec)])
    if describe is not None:
        for spec in configs:
            describe(spec)
    batch_size = _batch_size(batch_size, server) if isinstance(batch_size, str) else batch_size  # refused first
    decoding = _fit_decoding(task, model, server, decoding, api_key)
    fingerprint = run_fingerprint(task, model_identity(model, server=server), decoding)
    if placement is not None:  # bfloat16 and float32 answers are different runs (eval/fingerprint.py)
        fingerprint = fingerprint.extend(placement=placement.fields())
    tokens = None
    if batch_size == "auto":
        from lvlm_hallu.eval.context import auto_tokens

        items = task.items()
        tokens = auto_tokens(model, [it.prompt for it in items], next((it.image for it in items if it.image), None),
                             decoding["max_new_tokens"])
    # Refuses a mixed resume before the model loads (creates files only with --server, whose
    # fingerprint is complete now); a default folder cannot mix runs but is named after loading.
    plan_configs(task, configs, out or _default_folder(task, model, fingerprint, configs, server),
                 fingerprint=fingerprint, describe=describe, names=names, pending_values=not server)
    from lvlm_hallu.lvlm.errors import LVLMError

    refused: tuple[type[Exception], ...] = (LVLMError,)
    if server:
        from lvlm_hallu.serve.client import APIError

        refused += (APIError,)

    try:
        execute, facts, cleanup, values = _executor(model, server, api_key, ray_actors, decoding, batch_size,
                                                    progress, placement, tokens)
    except (LVLMError, FileNotFoundError) as err:  # e.g. the embedded model's weights are missing
        text = str(err)  # the loader's own message may already say which model and why
        raise EvalError(text if text.startswith("cannot load model") else f"cannot load model {model!r}: {text}") from err
    try:
        if values is not None:  # the run is also every configuration's model-aware values
            fingerprint = fingerprint.extend(**{RESOLVED_FIELD: [values(spec) for spec in configs]})
        out = out or _default_folder(task, model, fingerprint, configs, server)
        if questions_built:  # the built splits, next to the answers they belong to
            from lvlm_hallu.eval.pope import write_questions

            Path(out).mkdir(parents=True, exist_ok=True)
            for split, qs in task.splits.items():
                write_questions(Path(out) / f"pope_{split}_questions.jsonl", qs)
        console.print(f"output: {out} (fingerprint {fingerprint.short})")
        extra = {**(facts.pop("extra", None) or {}), **({"dataset": sources.describe()} if sources else {}),
                 **({"placement": placement.fields()} if placement is not None else {})}
        provenance = Provenance(decoding=decoding, seed=seed, extra=extra or None, **facts)
        report, paths = compare(task, configs, execute, out, provenance, describe=describe, names=names,
                                fingerprint=fingerprint, resamples=resamples, level=level, values=values)
    except refused as err:  # the model's own typed errors (context, images), the service's errors
        where = f"the service at {server}" if server else "the model"
        raise EvalError(f"{where} refused a request or could not be reached: {err} (the answers so far are "
                        "kept; the same command resumes)") from err
    finally:
        cleanup()
    if as_json:
        print(Path(paths.json).read_text(encoding="utf-8"))
    else:
        _print_report(report, paths)
    if inspect_k > 0:
        _attach_inspections(task, configs, names, model, out, paths, inspect_k, decoding)


def _attach_inspections(task, configs, names, model, out, paths, k, decoding) -> None:
    """Inspect the first k images with each configuration; link the pages from the report."""
    from lvlm_hallu.eval.compare import config_name
    from lvlm_hallu.lvlm.errors import LVLMError
    from lvlm_hallu.lvlm.inspection.attach import attach

    cases = [(it.key, it.image, it.prompt) for it in task.items()]
    labels = names or [config_name(c) for c in configs]
    try:
        rows = attach(_load_model(model), cases, list(zip(labels, configs)), out, paths.markdown, k,
                      max_new_tokens=decoding["max_new_tokens"])
    except (LVLMError, FileNotFoundError) as err:
        raise EvalError(f"cannot inspect: {err}") from err
    console.print(f"inspections: {len(rows)} pages under {Path(out) / 'inspect'}, linked from {paths.markdown}")


# ---------------------------------------------------------------------------------------------
# Commands


def _chair(model, images, annotations, instances, captions, n, seed, image_list, gt_json, synonyms, short_caption,
           prompt):
    from lvlm_hallu.eval.datasets import chair_task, resolve_sources

    other = image_list is not None or gt_json is not None
    sources = resolve_sources(model, images, annotations, instances, captions, synonyms, other_data=other,
                              world_images=n)
    return chair_task(sources, n, seed, image_list, gt_json, short_caption, prompt), sources


def _pope(model, images, annotations, instances, captions, n, seed, questions, parser, synonyms, progress):
    from lvlm_hallu.eval.datasets import pope_task, resolve_sources

    # about half of the world's scenes hold >= 3 objects (POPE's eligibility): generate enough of them
    sources = resolve_sources(model, images, annotations, instances, captions, synonyms, other_data=bool(questions),
                              world_images=None if n is None else 3 * n)
    task, built = pope_task(sources, n, seed, questions, parser, progress=progress)
    return task, built, sources


@app.command()
def chair(
    model: str = ModelOpt,
    images: Path | None = ImagesOpt,
    annotations: Path | None = AnnotationsOpt,
    instances: Path | None = InstancesOpt,
    captions: Path | None = CaptionsOpt,
    n: int | None = NOpt,
    seed: int = SeedOpt,
    batch_size: str = BatchOpt,
    max_new_tokens: int | None = MaxNewOpt,
    interventions: str = typer.Option("none", "--interventions", help='spec, e.g. "none", "vhr", "vhr+var"'),
    out: Path | None = OutOpt,
    server: str | None = ServerOpt,
    api_key: str | None = ApiKeyOpt,
    ray_actors: int = RayOpt,
    device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    image_list: Path | None = typer.Option(None, "--image-list", help="image ids to use instead of sampling"),
    gt_json: Path | None = typer.Option(None, "--gt-json", help="precomputed {image_id: [category]} ground truth"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="synonym table [default: COCO; shapes for shapes]"),
    short_caption: bool = typer.Option(
        False, "--short-caption", help="64-token protocol: score the text up to its last period"
    ),
    prompt: str = typer.Option("Please describe this image in detail.", "--prompt"),
    progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Caption sampled images and score them with CHAIR."""
    try:
        placement = _placement(device, dtype, device_map, server, ray_actors)
        task, sources = _chair(model, images, annotations, instances, captions, n, seed, image_list, gt_json,
                               synonyms, short_caption, prompt)
        tokens = max_new_tokens or (CHAIR_SHORT_MAX_NEW_TOKENS if short_caption else CHAIR_MAX_NEW_TOKENS)
        decoding = {"max_new_tokens": tokens, "temperature": 0.0}
        with _JsonOutput(as_json):
            _run(task, [interventions], model, server, api_key, ray_actors, decoding, batch_size, seed, out, progress,
                 sources=sources, as_json=as_json, placement=placement)
    except EvalError as err:
        raise _fail(err) from err


@app.command()
def pope(
    model: str = ModelOpt,
    images: Path | None = ImagesOpt,
    annotations: Path | None = AnnotationsOpt,
    instances: Path | None = InstancesOpt,
    captions: Path | None = CaptionsOpt,
    n: int | None = NOpt,
    seed: int = SeedOpt,
    batch_size: str = BatchOpt,
    max_new_tokens: int | None = MaxNewOpt,
    interventions: str = typer.Option("none", "--interventions"),
    out: Path | None = OutOpt,
    server: str | None = ServerOpt,
    api_key: str | None = ApiKeyOpt,
    ray_actors: int = RayOpt,
    device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    questions: list[Path] | None = typer.Option(None, "--questions", help="official POPE question files (repeat)"),
    parser: str = typer.Option("pope", "--parser", help="answer parser: pope (official), opera, pai, vcd, lmms-eval"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="synonym table [default: COCO; shapes for shapes]"),
    progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Ask POPE questions (built from the annotations or read from files) and score them."""
    try:
        placement = _placement(device, dtype, device_map, server, ray_actors)
        task, built, sources = _pope(model, images, annotations, instances, captions, n, seed, questions, parser,
                                     synonyms, progress)
        decoding = {"max_new_tokens": max_new_tokens or POPE_MAX_NEW_TOKENS, "temperature": 0.0}
        with _JsonOutput(as_json):
            _run(task, [interventions], model, server, api_key, ray_actors, decoding, batch_size, seed, out, progress,
                 sources=sources, questions_built=built, as_json=as_json, placement=placement)
    except EvalError as err:
        raise _fail(err) from err


@app.command()
def compare(
    benchmark: str = typer.Option("chair", "--benchmark", help="chair or pope"),
    interventions: str = typer.Option("none,vhr,var,vhr+var", "--interventions", help="comma-separated specs"),
    config: list[str] | None = typer.Option(
        None, "--config", help="NAME=SPEC (SPEC may be JSON with parameters); repeat; replaces --interventions"
    ),
    model: str = ModelOpt,
    images: Path | None = ImagesOpt,
    annotations: Path | None = AnnotationsOpt,
    instances: Path | None = InstancesOpt,
    captions: Path | None = CaptionsOpt,
    n: int | None = NOpt,
    seed: int = SeedOpt,
    batch_size: str = BatchOpt,
    max_new_tokens: int | None = MaxNewOpt,
    out: Path | None = OutOpt,
    server: str | None = ServerOpt,
    api_key: str | None = ApiKeyOpt,
    ray_actors: int = RayOpt,
    device: str = DeviceOpt,
    dtype: str | None = DtypeOpt,
    device_map: str | None = DeviceMapOpt,
    questions: list[Path] | None = typer.Option(None, "--questions", help="POPE: official question files (repeat)"),
    parser: str = typer.Option("pope", "--parser", help="POPE answer parser: pope (official), opera, pai, vcd, lmms-eval"),
    image_list: Path | None = typer.Option(None, "--image-list", help="CHAIR: image ids to use instead of sampling"),
    gt_json: Path | None = typer.Option(None, "--gt-json", help="CHAIR: precomputed {image_id: [category]} ground truth"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="synonym table [default: COCO; shapes for shapes]"),
    short_caption: bool = typer.Option(
        False, "--short-caption", help="CHAIR: 64-token protocol, score the text up to its last period"
    ),
    prompt: str = typer.Option("Please describe this image in detail.", "--prompt", help="CHAIR: the caption prompt"),
    resamples: int | None = ResamplesOpt,
    level: float = LevelOpt,
    progress: bool = ProgressOpt,
    inspect_k: int = typer.Option(0, "--inspect", min=0, help="attach inspections of the first K images "
                                                              "(docs/inspect.md; runs the model in this process)"),
    as_json: bool = JsonOpt,
) -> None:
    """Run one benchmark for several intervention configurations and write a comparison report
    with paired bootstrap intervals (95% by default, --level) of each configuration's difference to the
    first."""
    try:
        _check_level(level, resamples)
        placement = _placement(device, dtype, device_map, server, ray_actors)
        if config:
            names, configs = (list(x) for x in zip(*[_named_config(c) for c in config], strict=True))
        else:
            configs = _split_configs(interventions)
            names = None
        built = False
        if benchmark == "chair":
            task, sources = _chair(model, images, annotations, instances, captions, n, seed, image_list, gt_json,
                                   synonyms, short_caption, prompt)
            tokens = max_new_tokens or (CHAIR_SHORT_MAX_NEW_TOKENS if short_caption else CHAIR_MAX_NEW_TOKENS)
        elif benchmark == "pope":
            task, built, sources = _pope(model, images, annotations, instances, captions, n, seed, questions, parser,
                                         synonyms, progress)
            tokens = max_new_tokens or POPE_MAX_NEW_TOKENS
        else:
            raise EvalError(f"unknown benchmark {benchmark!r}; valid: chair, pope")
        decoding = {"max_new_tokens": tokens, "temperature": 0.0}
        with _JsonOutput(as_json):
            _run(task, configs, model, server, api_key, ray_actors, decoding, batch_size, seed, out, progress, names,
                 sources=sources, questions_built=built, resamples=resamples, level=level, inspect_k=inspect_k,
                 as_json=as_json, placement=placement)
    except EvalError as err:
        raise _fail(err) from err


def read_caption_file(path: Path, image_id_key: str = "image_id", caption_key: str = "caption") -> list[Any]:
    """Captions to score: JSON lines or a JSON list of {image_id, caption} (eval.chair.read_captions),
    or one of this project's results files (runs/eval/.../chair_<config>.jsonl: a fingerprint
    header line, then {key, image_id, answer} records), whose answers are the captions."""
    from lvlm_hallu.eval.chair import CaptionRecord, read_captions
    from lvlm_hallu.eval.coco import check_image_id, read_utf8_text
    from lvlm_hallu.eval.errors import AnnotationError
    from lvlm_hallu.eval.fingerprint import HEADER_KEY

    if path.is_file():
        lines = [(n, line) for n, line in enumerate(read_utf8_text(path).split("\n"), 1) if line.strip()]
        try:
            first = json.loads(lines[0][1]) if lines else None
        except json.JSONDecodeError:
            first = None
        if isinstance(first, dict) and HEADER_KEY in first and "key" not in first:
            key = caption_key if caption_key != "caption" else "answer"
            records = []
            for n, line in lines[1:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise AnnotationError(f"{path}:{n}: not JSON: {err}") from err
                if not isinstance(row, dict) or image_id_key not in row or not isinstance(row.get(key), str):
                    raise AnnotationError(f"{path}:{n}: a results record needs {image_id_key!r} and a text {key!r} "
                                          "(a CHAIR results file; POPE answers are not captions)")
                records.append(CaptionRecord(check_image_id(row[image_id_key]), row[key]))
            return records
    return read_captions(path, image_id_key=image_id_key, caption_key=caption_key)


@app.command("score-chair")
def score_chair(
    captions_file: Path = typer.Argument(
        ..., help="JSON lines {image_id, caption} (or a JSON list), or a CHAIR results file of `lvlm eval`"),
    gt: Path | None = typer.Option(None, "--gt", help="COCO instances file"),
    captions_gt: Path | None = typer.Option(
        None, "--captions-gt", help="COCO captions file (objects mined from human captions)"
    ),
    gt_json: Path | None = typer.Option(None, "--gt-json", help="precomputed {image_id: [category]} mapping"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="synonym table (default: COCO)"),
    short_caption: bool = typer.Option(False, "--short-caption", help="score the text up to its last period"),
    out: Path | None = typer.Option(None, "--out", help="JSON output (default: <captions>_chair.json)"),
    top: int = typer.Option(10, "--top", min=0, help="most hallucinated categories to show"),
    image_id_key: str = typer.Option(
        "image_id", "--image-id-key", help="field of the image id (LLaVA logs: question_id)"
    ),
    caption_key: str = typer.Option("caption", "--caption-key", help="field of the caption (LLaVA logs: text)"),
    as_json: bool = typer.Option(False, "--json", help="print the scores as JSON on stdout (no table)"),
) -> None:
    """Score existing captions with CHAIR, without a model."""
    from lvlm_hallu.eval.chair import (
        CaptionParser,
        ground_truth_from_coco,
        ground_truth_from_json,
        load_synonyms,
        score_captions,
    )
    from lvlm_hallu.eval.coco import load_coco
    from lvlm_hallu.eval.datasets import synonyms_for
    from lvlm_hallu.eval.report import atomic_write_text

    try:
        if gt_json is None and gt is None and captions_gt is None:
            raise EvalError("give --gt instances.json (optionally with --captions-gt) or --gt-json map.json")
        records = read_caption_file(captions_file, image_id_key=image_id_key, caption_key=caption_key)
        if not records:
            raise EvalError(f"{captions_file}: no captions to score")
        if gt_json is not None:
            parser = CaptionParser(load_synonyms(synonyms))
            truth = ground_truth_from_json(gt_json)
        else:
            inst = load_coco(gt, "instances") if gt else None
            caps = load_coco(captions_gt, "captions") if captions_gt else None
            parser = CaptionParser(load_synonyms(synonyms_for(synonyms, inst if inst is not None else caps)))
            truth = ground_truth_from_coco(inst, caps, parser=parser, image_ids={r.image_id for r in records})
            truth = dataclasses.replace(truth, source=" + ".join(str(p) for p in (gt, captions_gt) if p))
        result = score_captions(records, truth, parser, short_caption=short_caption, top_k=top)
        from lvlm_hallu.eval.mentions import score_mentions

        mentions = score_mentions(result, truth, parser)  # docs/caption-metrics.md
    except EvalError as err:
        raise _fail(err) from err
    out = out or captions_file.with_name(captions_file.stem + "_chair.json")
    payload = {
        "ground_truth": truth.source,
        "synonyms": parser.synonyms.source,
        "flavour": result.flavour,
        "short_caption": short_caption,
        **result.to_dict(details=True),
        "caption_metrics": mentions.metrics(),
        "mentions": mentions.to_dict(),
    }
    atomic_write_text(out, json.dumps(payload, indent=1))
    if as_json:
        print(json.dumps({k: v for k, v in payload.items() if k not in ("captions", "mentions")}, indent=1))
        Console(stderr=True).print(f"saved {out}")
        return
    table = Table(title=f"CHAIR — {captions_file.name} ({result.n_captions} captions)")
    for name in result.metrics():
        table.add_column(name, justify="right")
    table.add_row(*[f"{v:.1f}" for v in result.metrics().values()])
    console.print(table)
    beside = Table(title="beside CHAIR (docs/caption-metrics.md)")
    for name in mentions.metrics():
        beside.add_column(name, justify="right")
    beside.add_row(*[f"{v:.2f}" for v in mentions.metrics().values()])
    console.print(beside)
    if result.n_empty:
        console.print(f"empty captions: {result.n_empty} (scored as captions without mentions)")
    if result.n_repeated:
        console.print(f"captions naming one category twice or more: {result.n_repeated} (not part of CHAIR)")
    if result.most_hallucinated:
        console.print("most hallucinated: " + ", ".join(f"{c} ({k})" for c, k in result.most_hallucinated))
    console.print(f"saved {out}")


def main() -> None:
    app()
