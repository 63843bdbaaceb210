"""`lvlm eval ...`: CHAIR and POPE runs, comparisons of interventions, and offline CHAIR scoring.

Follows docs/eval.md: CHAIR (Rohrbach et al. 2018, arXiv:1809.02156) on seeded samples of COCO
images with the reference NLTK flavour; POPE (Li et al. 2023, arXiv:2305.10355) with the official
answer parser by default. Models are loaded lazily (`lvlm.load`) inside the command that needs
one; `--server` sends the requests to a running service through its SDK client instead, and
`--ray-actors N` spreads them over N model replicas. Every run writes a resumable results file per
configuration and a report (JSON, Markdown, PNG) into `--out`.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from eval.errors import EvalError

app = typer.Typer(help="CHAIR and POPE evaluation (docs/eval.md).", no_args_is_help=True)
console = Console()

CHAIR_MAX_NEW_TOKENS = 512  # the papers' long-caption protocol (64 with --short-caption)
POPE_MAX_NEW_TOKENS = 16  # one word or phrase

# ---------------------------------------------------------------------------------------------
# Shared options (typer reads the defaults; one definition keeps the commands consistent)

ModelOpt = typer.Option("shapes", "--model", help="model name, hub id or local path for lvlm.load")
ImagesOpt = typer.Option(None, "--images", help="folder with the images named in the annotations")
AnnotationsOpt = typer.Option(None, "--annotations", help="folder with instances_val2014.json / captions_val2014.json")
InstancesOpt = typer.Option(None, "--instances", help="COCO instances file")
CaptionsOpt = typer.Option(None, "--captions", help="COCO captions file (human captions)")
NOpt = typer.Option(500, "-n", help="number of images to sample")
SeedOpt = typer.Option(0, "--seed", help="seed of the image sample (recorded in the report)")
BatchOpt = typer.Option(8, "--batch-size")
MaxNewOpt = typer.Option(None, "--max-new-tokens", help="default: 512 (CHAIR), 64 (CHAIR short), 16 (POPE)")
OutOpt = typer.Option(Path("runs/eval"), "--out", help="output folder (results, details, report)")
ServerOpt = typer.Option(None, "--server", help="service base URL: use the remote runner")
ApiKeyOpt = typer.Option(None, "--api-key", envvar="LVLM_API_KEY")
RayOpt = typer.Option(0, "--ray-actors", help="spread batches over N Ray model actors (0: in process)")
ProgressOpt = typer.Option(True, "--progress/--no-progress")


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {err}")
    return typer.Exit(2)


def _load_model(name: str) -> Any:
    import lvlm  # lazy: torch and the model stack load only when a command runs a model

    return lvlm.load(name)


def _resolver() -> Any:
    """`interventions.resolve` with its errors turned into EvalError, or None if unavailable."""
    try:
        from interventions import resolve
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
    import dataclasses

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
    batch_size: int,
    progress: bool,
) -> tuple[Any, dict[str, Any], Any]:
    """(executor, provenance facts, cleanup) for the chosen runner: remote, Ray, or in process."""
    from eval.compare import answer_executor, local_adapter, ray_executor
    from eval.runner import RayPool, local_answer, remote_answer

    if server:
        from serve.client import Client  # lazy: eval never imports serve/ at module load

        client = Client(server, api_key=api_key)

        def make_remote(spec: Any) -> Any:
            return remote_answer(
                client,
                max_tokens=decoding["max_new_tokens"],
                temperature=decoding["temperature"],
                interventions=spec,
            )

        facts = {"model_id": model, "extra": {"server": server}}
        return answer_executor(make_remote, batch_size=batch_size, progress=progress), facts, lambda: None

    resolve = _resolver()
    if ray_actors > 0:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        # One replica per GPU when there are enough; otherwise the replicas share the GPUs.
        gpus = ray.cluster_resources().get("GPU", 0)
        options = {"num_cpus": 1, **({"num_gpus": min(1.0, gpus / ray_actors)} if gpus else {})}
        pool = RayPool(partial(_load_model, model), ray_actors, actor_options=options)

        def make_adapter(spec: Any) -> Any:
            return local_adapter(spec, resolve=resolve, **decoding)

        facts = model_facts(pool.info(), model)
        facts["extra"] = {**(facts["extra"] or {}), "ray_actors": ray_actors}
        return ray_executor(pool, make_adapter, batch_size=batch_size, progress=progress), facts, pool.shutdown

    pipeline = _load_model(model)

    def make_local(spec: Any) -> Any:
        return local_answer(pipeline, interventions=spec, resolve=resolve, **decoding)

    return (
        answer_executor(make_local, batch_size=batch_size, progress=progress),
        model_facts(_info(pipeline), model),
        lambda: None,
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


def _print_report(report: Any, paths: Any) -> None:
    names: list[str] = []
    for r in report.results:
        names.extend(k for k in r.metrics if k not in names)
    table = Table(title=f"{report.provenance.benchmark} — {report.provenance.model_id or ''}")
    if len(names) <= 6:
        table.add_column("configuration")
        for n in names:
            table.add_column(n, justify="right")
        for r in report.results:
            table.add_row(r.name, *[f"{r.metrics[n]:.2f}" if n in r.metrics else "" for n in names])
    else:  # many metrics (POPE: 3 per split): one row per metric keeps the table readable
        table.add_column("metric")
        for r in report.results:
            table.add_column(r.name, justify="right")
        for n in names:
            table.add_row(n, *[f"{r.metrics[n]:.2f}" if n in r.metrics else "" for r in report.results])
    console.print(table)
    console.print(f"report: {paths.json}, {paths.markdown}" + (f", {paths.png}" if paths.png else ""))


# ---------------------------------------------------------------------------------------------
# Task builders


def _chair_task(
    images, annotations, instances, captions, n, seed, image_list, gt_json, synonyms, short_caption, prompt
):
    from eval.chair import CaptionParser, ground_truth_from_coco, ground_truth_from_json, load_synonyms
    from eval.coco import (
        image_file_names,
        image_ids,
        load_coco,
        read_image_list,
        resolve_annotation_paths,
        sample_image_ids,
        validate_image_ids,
    )
    from eval.compare import ChairTask

    inst_path, caps_path = resolve_annotation_paths(annotations, instances, captions)
    if inst_path is None and caps_path is None:
        raise EvalError("CHAIR needs --instances and/or --captions (or --annotations DIR) for the image list")
    if images is None:
        raise EvalError("--images DIR is required to run a model")
    parser = CaptionParser(load_synonyms(synonyms))
    source = load_coco(inst_path) if inst_path else load_coco(caps_path)
    names = image_file_names(source)
    ids = (
        validate_image_ids(read_image_list(image_list), names)
        if image_list
        else sample_image_ids(image_ids(source), n, seed)
    )
    if gt_json:
        gt = ground_truth_from_json(gt_json)
    else:
        gt = ground_truth_from_coco(source if inst_path else None, caps_path, parser=parser, image_ids=ids)
        # the instances file was loaded once above; name it by path in the provenance
        gt = dataclasses.replace(gt, source=" + ".join(str(p) for p in (inst_path, caps_path) if p))
    files = {i: str(Path(images) / names[i]) for i in ids}
    return ChairTask(files, gt, parser, prompt=prompt, short_caption=short_caption)


def _pope_task(images, annotations, instances, captions, n, seed, questions, parser_name, out, synonyms):
    from eval.compare import PopeTask
    from eval.pope import SPLITS, build_splits, write_questions

    if images is None:
        raise EvalError("--images DIR is required to run a model")
    if questions:
        files = {}
        for q in questions:
            stem = Path(q).stem
            split = next((s for s in SPLITS if s in stem), stem)
            files[split] = q
        return PopeTask.from_files(files, images, parser=parser_name)
    # No question files: build the three splits from the CHAIR ground truth (instances + captions).
    from eval.chair import CaptionParser, ground_truth_from_coco, load_synonyms
    from eval.coco import image_file_names, load_coco, resolve_annotation_paths

    inst_path, caps_path = resolve_annotation_paths(annotations, instances, captions)
    if inst_path is None:
        raise EvalError("POPE needs --questions files or an instances file (--instances / --annotations)")
    coco = load_coco(inst_path)
    gt = ground_truth_from_coco(coco, caps_path, parser=CaptionParser(load_synonyms(synonyms)))
    splits = build_splits(gt.objects, n_images=n, seed=seed, image_names=image_file_names(coco))
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, qs in splits.items():
        files[split] = out / f"pope_{split}_questions.jsonl"
        write_questions(files[split], qs)
    return PopeTask.from_files(files, images, parser=parser_name)


def _run(task, configs, model, server, api_key, ray_actors, decoding, batch_size, seed, out, progress, names=None):
    from eval.compare import compare
    from eval.report import Provenance

    # Resolving locally validates the specs before any generation and records every parameter;
    # with --server the service validates them (it may run another registry version).
    resolve = None if server else _resolver()
    describe = None if resolve is None else (lambda spec: [_config_dict(c) for c in resolve(spec)])
    if describe is not None:
        for spec in configs:
            describe(spec)
    execute, facts, cleanup = _executor(model, server, api_key, ray_actors, decoding, batch_size, progress)
    try:
        provenance = Provenance(decoding=decoding, seed=seed, **facts)
        report, paths = compare(task, configs, execute, out, provenance, describe=describe, names=names)
    finally:
        cleanup()
    _print_report(report, paths)


# ---------------------------------------------------------------------------------------------
# Commands


@app.command()
def chair(
    model: str = ModelOpt,
    images: Path | None = ImagesOpt,
    annotations: Path | None = AnnotationsOpt,
    instances: Path | None = InstancesOpt,
    captions: Path | None = CaptionsOpt,
    n: int = NOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    max_new_tokens: int | None = MaxNewOpt,
    interventions: str = typer.Option("none", "--interventions", help='spec, e.g. "none", "vhr", "vhr+var"'),
    out: Path = OutOpt,
    server: str | None = ServerOpt,
    api_key: str | None = ApiKeyOpt,
    ray_actors: int = RayOpt,
    image_list: Path | None = typer.Option(None, "--image-list", help="image ids to use instead of sampling"),
    gt_json: Path | None = typer.Option(None, "--gt-json", help="precomputed {image_id: [category]} ground truth"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="synonym table (default: COCO)"),
    short_caption: bool = typer.Option(
        False, "--short-caption", help="64-token protocol: drop the last incomplete sentence"
    ),
    prompt: str = typer.Option("Please describe this image in detail.", "--prompt"),
    progress: bool = ProgressOpt,
) -> None:
    """Caption sampled images and score them with CHAIR."""
    try:
        task = _chair_task(
            images, annotations, instances, captions, n, seed, image_list, gt_json, synonyms, short_caption, prompt
        )
        tokens = max_new_tokens or (64 if short_caption else CHAIR_MAX_NEW_TOKENS)
        decoding = {"max_new_tokens": tokens, "temperature": 0.0}
        _run(task, [interventions], model, server, api_key, ray_actors, decoding, batch_size, seed, out, progress)
    except EvalError as err:
        raise _fail(err) from err


@app.command()
def pope(
    model: str = ModelOpt,
    images: Path | None = ImagesOpt,
    annotations: Path | None = AnnotationsOpt,
    instances: Path | None = InstancesOpt,
    captions: Path | None = CaptionsOpt,
    n: int = NOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    max_new_tokens: int | None = MaxNewOpt,
    interventions: str = typer.Option("none", "--interventions"),
    out: Path = OutOpt,
    server: str | None = ServerOpt,
    api_key: str | None = ApiKeyOpt,
    ray_actors: int = RayOpt,
    questions: list[Path] | None = typer.Option(None, "--questions", help="official POPE question files (repeat)"),
    parser: str = typer.Option("pope", "--parser", help="answer parser: pope (official), opera, pai, vcd, lmms-eval"),
    synonyms: Path | None = typer.Option(None, "--synonyms"),
    progress: bool = ProgressOpt,
) -> None:
    """Ask POPE questions (built from the annotations or read from files) and score them."""
    try:
        task = _pope_task(images, annotations, instances, captions, n, seed, questions, parser, out, synonyms)
        decoding = {"max_new_tokens": max_new_tokens or POPE_MAX_NEW_TOKENS, "temperature": 0.0}
        _run(task, [interventions], model, server, api_key, ray_actors, decoding, batch_size, seed, out, progress)
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
    n: int = NOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    max_new_tokens: int | None = MaxNewOpt,
    out: Path = OutOpt,
    server: str | None = ServerOpt,
    api_key: str | None = ApiKeyOpt,
    ray_actors: int = RayOpt,
    questions: list[Path] | None = typer.Option(None, "--questions"),
    parser: str = typer.Option("pope", "--parser"),
    image_list: Path | None = typer.Option(None, "--image-list"),
    gt_json: Path | None = typer.Option(None, "--gt-json"),
    synonyms: Path | None = typer.Option(None, "--synonyms"),
    short_caption: bool = typer.Option(False, "--short-caption"),
    prompt: str = typer.Option("Please describe this image in detail.", "--prompt"),
    progress: bool = ProgressOpt,
) -> None:
    """Run one benchmark for several intervention configurations and write a comparison report."""
    try:
        if config:
            names, configs = (list(x) for x in zip(*[_named_config(c) for c in config], strict=True))
        else:
            configs = _split_configs(interventions)
            names = None
        if benchmark == "chair":
            task = _chair_task(
                images, annotations, instances, captions, n, seed, image_list, gt_json, synonyms, short_caption, prompt
            )
            tokens = max_new_tokens or (64 if short_caption else CHAIR_MAX_NEW_TOKENS)
        elif benchmark == "pope":
            task = _pope_task(images, annotations, instances, captions, n, seed, questions, parser, out, synonyms)
            tokens = max_new_tokens or POPE_MAX_NEW_TOKENS
        else:
            raise EvalError(f"unknown benchmark {benchmark!r}; valid: chair, pope")
        decoding = {"max_new_tokens": tokens, "temperature": 0.0}
        _run(task, configs, model, server, api_key, ray_actors, decoding, batch_size, seed, out, progress, names)
    except EvalError as err:
        raise _fail(err) from err


@app.command("score-chair")
def score_chair(
    captions_file: Path = typer.Argument(..., help="JSON lines {image_id, caption}"),
    gt: Path | None = typer.Option(None, "--gt", help="COCO instances file"),
    captions_gt: Path | None = typer.Option(
        None, "--captions-gt", help="COCO captions file (objects mined from human captions)"
    ),
    gt_json: Path | None = typer.Option(None, "--gt-json", help="precomputed {image_id: [category]} mapping"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="synonym table (default: COCO)"),
    short_caption: bool = typer.Option(False, "--short-caption", help="drop the last incomplete sentence"),
    out: Path | None = typer.Option(None, "--out", help="JSON output (default: <captions>_chair.json)"),
    top: int = typer.Option(10, "--top", help="most hallucinated categories to show"),
) -> None:
    """Score existing captions with CHAIR, without a model."""
    from eval.chair import (
        CaptionParser,
        ground_truth_from_coco,
        ground_truth_from_json,
        load_synonyms,
        read_captions,
        score_captions,
    )
    from eval.report import atomic_write_text

    try:
        if gt_json is None and gt is None and captions_gt is None:
            raise EvalError("give --gt instances.json (optionally with --captions-gt) or --gt-json map.json")
        records = read_captions(captions_file)
        parser = CaptionParser(load_synonyms(synonyms))
        if gt_json is not None:
            truth = ground_truth_from_json(gt_json)
        else:
            truth = ground_truth_from_coco(gt, captions_gt, parser=parser, image_ids={r.image_id for r in records})
        result = score_captions(records, truth, parser, short_caption=short_caption, top_k=top)
    except EvalError as err:
        raise _fail(err) from err
    table = Table(title=f"CHAIR — {captions_file.name} ({result.n_captions} captions)")
    for name in result.metrics():
        table.add_column(name, justify="right")
    table.add_row(*[f"{v:.1f}" for v in result.metrics().values()])
    console.print(table)
    if result.most_hallucinated:
        console.print("most hallucinated: " + ", ".join(f"{c} ({k})" for c, k in result.most_hallucinated))
    out = out or captions_file.with_name(captions_file.stem + "_chair.json")
    payload = {
        "ground_truth": truth.source,
        "synonyms": parser.synonyms.source,
        "flavour": result.flavour,
        "short_caption": short_caption,
        **result.to_dict(details=True),
    }
    atomic_write_text(out, json.dumps(payload, indent=1))
    console.print(f"saved {out}")


def main() -> None:
    app()
