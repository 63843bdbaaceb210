"""The playground: a page at `/` that compares interventions side by side, and the endpoints only it needs.

The page (serve/web/: index.html, app.js, style.css; plain files, no build step, nothing from a
CDN) talks to the ordinary API (`/v1/models`, `/v1/interventions`, streamed
`/v1/chat/completions`, `/v1/eval/jobs`) with the same API key, plus four endpoints here that
put the project's own evaluation and inspection code behind HTTP, so the page re-implements none
of it (docs/playground.md):

- `GET /v1/playground/samples`: a few held-out shapes-world test scenes (lvlm/shapes/world.py)
  as PNG data URLs with their ground-truth objects (the scene's instance kinds, as CHAIR's
  ground truth for that world);
- `POST /v1/playground/chair`: an answer cut into segments with the objects it names that are
  not in the image marked, by CHAIR's caption parser (eval/chair.py: NLTK tokens, POS-tagged
  WordNet lemmas, double words, synonym table; Rohrbach et al., arXiv:1809.02156), mapped back
  to character spans as `lvlm demo` does (lvlm_hallu/demo.py `mention_spans`);
- `POST /v1/playground/inspect`: `lvlm inspect` for one request (lvlm/inspection: the kernels'
  read-out of the last prompt row at prefill, without and with the interventions), as numbers:
  per layer the head-mean attention on each image patch before and after, the panel pictures,
  and the visual attention mass of every layer. Each layer's colour scale is shared by both runs
  and ends at a high percentile of its patch values (`robust_vmax`), so one sink patch holding
  most of the mass does not turn every other patch black; patches above it are counted.
- `POST /v1/playground/compare`: finished CHAIR or POPE evaluation jobs of the page's columns
  (same kind, limit and seed, so the same images), each job's metrics and the paired bootstrap
  interval of each metric's difference to the first job, as `lvlm eval compare` computes it
  (eval/compare.py's task scoring and per-image statistics, eval/significance.py's bootstrap),
  rescored from the results file and annotations in each job's folder. The folders are read where
  the replica runs: a service whose job store lives on another node gets the metrics without
  intervals.

`mount(app, service, route)` adds the page and the endpoints to the replica's app (serve/app.py);
`mount_page(app, key_required)` adds only the page, for the gateway (serve/gateway.py), which answers it without
a key and without a hop to a replica: the page asks for the key itself when the API wants one.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from fastapi import Request as HTTPRequest  # module level: the routes' string annotations resolve here
from pydantic import BaseModel, ConfigDict, Field

from lvlm_hallu.serve.schema import Interventions

log = logging.getLogger("serve")
WEB = Path(__file__).resolve().parent / "web"
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}
SAMPLE_SPLIT = "test"
# Held-out test scenes offered on the page. With the shipped model at 32 tokens, the plain answer to
# "Describe this image." names an absent object in 11, 20, 22 and 7 and VHR's does not; 44 is the
# scene `lvlm demo` shipped (lvlm_hallu/demo_found.json); 3 is answered right by both.
SAMPLE_INDICES = (11, 20, 22, 7, 44, 3)
BODY_LIMIT = 64 * 1024  # chair: an answer and an object list
VMAX_PERCENTILE = 99.0
MAX_INSPECT_TOKENS = 64
# How long a starting replica waits, after its model's warm-up, for CHAIR's parser to finish
# loading before it reports ready (so the page's first marks do not wait for it); a machine slower
# than this answers the first marks late instead of starting late.
WARM_UP_WAIT_S = 30.0


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ChairQuery(_Query):
    text: str = Field(max_length=20_000)
    sample: Optional[int] = Field(default=None, description="a sample id from /v1/playground/samples")
    objects: Optional[list[str]] = Field(default=None, max_length=200, description="ground-truth categories")
    vocabulary: Literal["shapes", "coco"] = "shapes"


class InspectQuery(_Query):
    image: str = Field(description="data:image/...;base64,... URL")
    prompt: str = Field(min_length=1, max_length=4000)
    interventions: Interventions = None
    max_tokens: int = Field(default=24, ge=1, le=MAX_INSPECT_TOKENS)
    layers: Optional[list[int]] = Field(default=None, max_length=8)


# -- samples ------------------------------------------------------------------------------------
def data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@functools.lru_cache(maxsize=1)
def samples() -> tuple[dict[str, Any], ...]:
    """The offered scenes: id (the scene's image id), name, PNG data URL, ground-truth objects."""
    from lvlm_hallu.lvlm.shapes import make_scene

    out = []
    for index in SAMPLE_INDICES:
        scene, image = make_scene(SAMPLE_SPLIT, index)
        counts = scene.counts()
        name = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        out.append({"id": scene.image_id, "index": index, "name": f"test #{index}: {name}",
                    "image": data_url(image), "objects": sorted(counts)})
    return tuple(out)


def sample_objects(sample_id: int) -> list[str]:
    from lvlm_hallu.serve.errors import BadRequest

    for s in samples():
        if s["id"] == sample_id:
            return s["objects"]
    raise BadRequest(f"no sample {sample_id}; valid: {', '.join(str(s['id']) for s in samples())}",
                     param="sample", code="invalid_value")


# -- CHAIR marks --------------------------------------------------------------------------------
_PARSERS: dict[str, Any] = {}
_PARSERS_LOCK = threading.Lock()


def parser_for(vocabulary: str) -> Any:
    """CHAIR's caption parser with the world's synonym table (finds NLTK's data first). Built once
    per process: a request that arrives while the warm-up builds it waits for that one (loading
    WordNet is most of the cost, seconds to tens of seconds on a busy small machine)."""
    from lvlm_hallu.eval.chair import CaptionParser, load_synonyms

    with _PARSERS_LOCK:
        if vocabulary not in _PARSERS:
            if vocabulary == "shapes":
                from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

                _PARSERS[vocabulary] = CaptionParser(load_synonyms(SYNONYMS_PATH))
            else:
                _PARSERS[vocabulary] = CaptionParser(load_synonyms())
        return _PARSERS[vocabulary]


def chair_marks(text: str, objects: list[str], vocabulary: str = "shapes") -> dict[str, Any]:
    """`text` as segments, the objects it names, and those of them absent from `objects`."""
    from lvlm_hallu.demo import judge, segments

    parser = parser_for(vocabulary)
    table = parser.synonyms.to_category
    gt = frozenset(table.get(o.strip().lower(), o.strip().lower()) for o in objects)
    judged = judge(parser, text, gt)
    return {"segments": [{"text": s, "absent": bad} for s, bad in segments(parser, text, gt)],
            "mentioned": list(dict.fromkeys(judged.mentioned)), "absent": list(judged.hallucinated),
            "objects": sorted(gt), "vocabulary": vocabulary}


def warm_up() -> None:
    started = time.perf_counter()
    try:
        samples()
        chair_marks("A ball.", ["ball"])
    except Exception as err:  # noqa: BLE001 - a missing NLTK corpus is reported by the request that needs it
        log.warning("playground warm-up failed: %s", err)
        return
    log.info("playground warm-up (samples, CHAIR's parser) took %.1fs", time.perf_counter() - started)


_WARMING: list[threading.Thread] = []  # the process's one warm-up thread, once started
_WARMING_LOCK = threading.Lock()  # not the parsers' lock: the warm-up holds that one for seconds


def start_warm_up() -> threading.Thread:
    """`warm_up` in a daemon thread, started once per process (the replica starts it before it loads
    the model, `mount` again when it builds the app): loading NLTK's tagger and WordNet takes
    seconds to tens of seconds on a small busy machine, and the page's first marks wait for it.
    The thread, to join with a timeout."""
    with _WARMING_LOCK:
        if not _WARMING:
            _WARMING.append(threading.Thread(target=warm_up, name="playground-warm-up", daemon=True))
            _WARMING[0].start()
        return _WARMING[0]


# -- inspection ---------------------------------------------------------------------------------
def robust_vmax(values: np.ndarray, percentile: float = VMAX_PERCENTILE) -> float:
    """The top of a colour scale: the `percentile`-th value, so one outlier is clipped, not the
    scale's end (0 for no values)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    top = float(np.percentile(values, percentile, method="lower"))  # an actual value of the map
    return top if top > 0 else float(values.max())


def inspection_view(insp: Any) -> dict[str, Any]:
    """What the page draws of an `lvlm.inspection.Inspection`: per layer the patch maps of both
    runs (per panel, rows x cols) on one robust scale, the panel pictures, the mass per layer."""
    runs = {"before": insp.baseline, "after": insp.intervened}
    panels = [{"name": p.name, "image": data_url(p.picture), "shape": list(p.shape)}
              for p in insp.baseline.grid.panels]
    layers = []
    for layer in insp.layers:
        maps = {label: run.heat(layer) for label, run in runs.items()}
        values = np.concatenate([m.ravel() for ms in maps.values() if ms for m in ms] or [np.zeros(0)])
        vmax = robust_vmax(values)
        layers.append({
            "layer": int(layer), "vmax": vmax, "max": float(values.max()) if values.size else 0.0,
            "clipped": int((values > vmax).sum()),
            "maps": {label: [m.tolist() for m in ms] if ms else None for label, ms in maps.items()},
            "mass": {label: float(run.attention.get(layer, np.zeros(0)).sum()) for label, run in runs.items()},
        })
    vte = insp.intervened.report.get("vte") or {}
    return {
        "model": insp.model, "interventions": insp.interventions, "num_layers": insp.num_layers,
        "answers": {"before": insp.baseline.text.strip(), "after": insp.intervened.text.strip()},
        "panels": panels, "layers": layers,
        "mass": {"before": insp.baseline.visual_mass(insp.num_layers).tolist(),
                 "after": insp.intervened.visual_mass(insp.num_layers).tolist(),
                 "exit_layer": vte.get("exit_layer")},
        "report": _jsonable(insp.intervened.report),
    }


def _jsonable(value: Any) -> Any:
    from lvlm_hallu.serve.chat import jsonable

    return jsonable(value)


def run_inspection(pipe: Any, image: Any, prompt: str, spec: Any, max_tokens: int,
                   layers: Optional[list[int]]) -> dict[str, Any]:
    from lvlm_hallu.lvlm.inspection import inspect

    insp = inspect(pipe, image, prompt, spec if spec is not None else "none",
                   layers=tuple(layers) if layers else None, max_new_tokens=max_tokens)
    return inspection_view(insp)


# -- comparison of finished evaluation jobs ---------------------------------------------------------
def chair_task_of(workdir: Path, request: Optional[dict] = None) -> Any:
    """The CHAIR task a finished "chair" job answered (serve/jobs.py `run_chair`), rebuilt from the
    annotations its folder holds and the job's options (prompt, short-caption scoring)."""
    from lvlm_hallu.eval.chair import ground_truth_from_coco
    from lvlm_hallu.eval.coco import image_file_names, load_coco
    from lvlm_hallu.eval.compare import CHAIR_PROMPT, ChairTask

    opts = (request or {}).get("options") or {}
    data = workdir / "data"
    coco = load_coco(data / "annotations" / f"instances_{SAMPLE_SPLIT}.json")
    names = image_file_names(coco)
    ids = sorted(names)
    parser = parser_for("shapes")
    gt = ground_truth_from_coco(coco, data / "annotations" / f"captions_{SAMPLE_SPLIT}.json", parser=parser,
                                image_ids=ids)
    return ChairTask({i: str(data / "images" / names[i]) for i in ids}, gt, parser,
                     prompt=opts.get("prompt", CHAIR_PROMPT), short_caption=bool(opts.get("short_caption", False)))


def pope_task_of(workdir: Path, request: dict) -> Any:
    """The POPE task a finished "pope" job answered (serve/jobs.py `run_pope`): its questions drawn
    again from the annotations in its folder with the job's limit, seed, splits and parser, as
    `run_pope` draws them (eval/pope.py `build_split` is seeded). `compare_jobs` trusts it only
    when its items digest is the one in the job's results file (`_answered`)."""
    from lvlm_hallu.eval.chair import ground_truth_from_coco
    from lvlm_hallu.eval.coco import image_file_names, load_coco
    from lvlm_hallu.eval.compare import PopeTask
    from lvlm_hallu.eval.pope import SPLITS, build_split

    opts = request.get("options") or {}
    limit = int(request["limit"])
    n_images, keep = max(8, -(-limit // 6)), limit + limit % 2  # run_pope's sample and question count
    data = workdir / "data"
    coco = load_coco(data / "annotations" / f"instances_{SAMPLE_SPLIT}.json")
    gt = ground_truth_from_coco(coco, data / "annotations" / f"captions_{SAMPLE_SPLIT}.json",
                                parser=parser_for("shapes"))
    questions = {s: build_split(gt.objects, s, n_images=n_images, seed=request.get("seed", 0),
                                image_names=image_file_names(coco))[:keep]
                 for s in opts.get("splits") or list(SPLITS)}
    return PopeTask(questions, data / "images", parser=opts.get("parser", "pope"))


TASK_OF = {"chair": chair_task_of, "pope": pope_task_of}  # job kind -> its task, rebuilt from its folder


def _answered(task: Any, results: Any) -> Optional[dict[str, dict]]:
    """The job's answers in the task's item order, or None unless the task's items are the ones the
    job answered: the items digest (key, prompt, image name and content, eval/fingerprint.py) in
    the results file's fingerprint, every key, and the metadata the runner copied from each item
    into its record (image id; split, question id, label)."""
    from lvlm_hallu.eval.fingerprint import HEADER_KEY, items_digest

    items = task.items()
    stamped = ((results.header or {}).get(HEADER_KEY) or {}).get("items")
    records = results.records
    if stamped is None or stamped != items_digest(items) or set(records) != {it.key for it in items}:
        return None
    if any(records[it.key].get(k) != v for it in items for k, v in it.meta.items()):
        return None
    return {it.key: records[it.key] for it in items}


def compare_jobs(jobs: list[dict], root: Path, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Each job's metrics and, for jobs after the first, the paired bootstrap interval of each
    metric's difference to the first, computed as `lvlm eval compare` computes it (eval/compare.py
    `compare`: the task's `score` and `unit_stats` on the answers in item order, then
    eval/significance.py `paired_bootstrap` with the same default resamples and seed; the unit is
    an image, for POPE with its questions in every split). The jobs must have answered the same
    images (same limit and seed)."""
    from lvlm_hallu.eval.runner import ResultsFile
    from lvlm_hallu.eval.significance import check_resamples, paired_bootstrap

    from lvlm_hallu.serve.errors import BadRequest

    kinds = {j["kind"] for j in jobs}
    if len(kinds) != 1:
        raise BadRequest(f"jobs of one kind compare, got {', '.join(sorted(kinds))}", param="jobs")
    kind = kinds.pop()
    rows = [{"id": j["id"], "interventions": (j.get("request") or {}).get("interventions"),
             "metrics": j.get("metrics"), "intervals": None} for j in jobs]

    def without(note: str) -> dict[str, Any]:
        return {"object": "comparison", "kind": kind, "level": level, "method": None, "data": rows, "note": note}

    if kind not in TASK_OF:
        return without(f"intervals are computed for {' and '.join(k.upper() for k in TASK_OF)} jobs only")
    if not all((root / j["id"] / f"{kind}.jsonl").is_file() for j in jobs):
        return without("the jobs' folders are not on this replica's node")
    stats, scored = [], []
    for j in jobs:
        workdir = root / j["id"]
        task = TASK_OF[kind](workdir, j.get("request") or {})
        records = _answered(task, ResultsFile(workdir / f"{kind}.jsonl"))
        if records is None:
            return without(f"job {j['id']}'s answers are not the items rebuilt from its folder")
        metrics, details = task.score(records)
        scored.append(metrics)
        stats.append(task.unit_stats(records, details))
    resamples = check_resamples(None, level)
    for row, metrics, other in zip(rows[1:], scored[1:], stats[1:]):
        try:
            found = paired_bootstrap(stats[0], other, resamples=resamples, seed=seed, level=level,
                                     names=[m for m in metrics if m in scored[0]])
        except ValueError as err:
            raise BadRequest(f"jobs {rows[0]['id']} and {row['id']}: {err}", param="jobs") from None
        row["intervals"] = {m: iv.to_dict() for m, iv in found.items()}
    unit = "image" if kind == "chair" else "image (its questions in every split)"
    return {"object": "comparison", "kind": kind, "level": level, "resamples": resamples, "seed": seed,
            "method": f"paired bootstrap, percentile interval; unit: {unit}", "data": rows}


class CompareQuery(_Query):
    jobs: list[str] = Field(min_length=2, max_length=4, description="finished job ids; the first is the baseline")
    level: float = Field(default=0.95, gt=0.5, lt=1.0)


# -- routes -------------------------------------------------------------------------------------
def page_file(name: str) -> Any:
    from fastapi.responses import Response

    from lvlm_hallu.serve.errors import NotFound

    if name not in PAGE_FILES:  # a fixed list: no path from the URL ever reaches the file system
        raise NotFound(f"no playground file {name!r}")
    return Response((WEB / name).read_bytes(), media_type=PAGE_FILES[name], headers={"Cache-Control": "no-cache"})


def mount_page(app: Any, key_required: bool) -> None:
    """`GET /` (the page), `GET /playground/<file>` (its script and style) and
    `GET /playground/config.json` (whether the API wants a key, so the page asks for one before
    its first call instead of after a 401); no key needed."""
    from fastapi.responses import JSONResponse

    from lvlm_hallu.serve.errors import ServiceError

    async def index(http: HTTPRequest):
        return page_file("index.html")

    async def settings(http: HTTPRequest):
        return JSONResponse({"api_key": bool(key_required)}, headers={"Cache-Control": "no-cache"})

    async def asset(http: HTTPRequest, name: str):
        try:
            return page_file(name)
        except ServiceError as err:
            return JSONResponse(err.body(), status_code=err.status)

    # The gateway's class travels by value (cloudpickle): real types, not string annotations.
    index.__annotations__ = settings.__annotations__ = {"http": HTTPRequest}
    asset.__annotations__ = {"http": HTTPRequest, "name": str}
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/playground/config.json", settings, methods=["GET"], include_in_schema=False)
    app.add_api_route("/playground/{name}", asset, methods=["GET"], include_in_schema=False)


def mount(app: Any, service: Any, route: Any) -> None:
    """The page and the playground endpoints on a replica's app; `route` is build_app's wrapper
    (API key, metrics, OpenAI error shape)."""
    from lvlm_hallu.serve.limits import read_body

    mount_page(app, bool(service.config.keys()))
    start_warm_up()  # CHAIR's parser now, beside the model's warm-up, not when the first answer is marked
    inspecting = asyncio.Lock()  # one inspection at a time: it runs the model twice beside the scheduler

    def parse(model: type[BaseModel], body: bytes) -> Any:
        from lvlm_hallu.serve.app import parse as parse_body  # app imports this module

        return parse_body(model, body)

    @app.get("/v1/playground/samples")
    @route("/v1/playground/samples")
    async def list_samples(http: HTTPRequest):
        return {"object": "list", "data": list(await asyncio.to_thread(samples))}

    @app.post("/v1/playground/chair")
    @route("/v1/playground/chair")
    async def chair(http: HTTPRequest):
        body = parse(ChairQuery, await read_body(http, BODY_LIMIT))
        objects = sample_objects(body.sample) if body.sample is not None else (body.objects or [])
        return await asyncio.to_thread(chair_marks, body.text, objects, body.vocabulary)

    @app.post("/v1/playground/inspect")
    @route("/v1/playground/inspect")
    async def inspect(http: HTTPRequest):
        from lvlm_hallu.serve.errors import BadRequest
        from lvlm_hallu.serve.images import decode_data_url, open_image

        body = parse(InspectQuery, await read_body(http, service.limits.max_body_bytes))
        if body.max_tokens > service.limits.max_tokens:
            raise BadRequest(f"max_tokens={body.max_tokens} exceeds this server's limit of {service.limits.max_tokens}",
                             param="max_tokens", code="invalid_value")
        image = open_image(decode_data_url(body.image, service.limits, "image"), service.limits, "image")
        spec = body.interventions
        if isinstance(spec, list):
            spec = [i.model_dump() if isinstance(i, BaseModel) else i for i in spec]
        if not hasattr(service.pipeline, "engine"):
            raise BadRequest("this server's model cannot be inspected", code="inspection_unavailable")
        async with inspecting:
            return await asyncio.to_thread(run_inspection, service.pipeline, image, body.prompt, spec,
                                           body.max_tokens, body.layers)

    @app.post("/v1/playground/compare")
    @route("/v1/playground/compare")
    async def compare(http: HTTPRequest):
        from lvlm_hallu.serve.errors import BadRequest, NotFound
        from lvlm_hallu.serve.jobstore import default_jobs_dir

        body = parse(CompareQuery, await read_body(http, BODY_LIMIT))
        jobs = []
        for job_id in body.jobs:  # each must be the caller's own (another key gets a 404)
            record = await service._jobs().get(job_id, owner=service.owner(http))
            if record is None:
                raise NotFound(f"no evaluation job {job_id!r}", param="jobs")
            if record["state"] != "succeeded":
                raise BadRequest(f"job {job_id} is {record['state']}; only succeeded jobs compare", param="jobs")
            jobs.append(record)
        root = Path(service.config.eval_jobs_dir or default_jobs_dir())
        return await asyncio.to_thread(compare_jobs, jobs, root, body.level)


__all__ = ["ChairQuery", "CompareQuery", "compare_jobs", "InspectQuery", "chair_marks", "inspection_view", "mount", "mount_page", "robust_vmax",
           "samples"]
