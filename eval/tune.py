"""`lvlm tune`: calibrate each intervention's main parameters on a validation split (docs/tuning.md).

For one model and one validation split (COCO-format images + instances and/or captions; the shapes
world's "val" split for the embedded model, never "test"), each method's main parameters are
searched on a grid inside the paper's own range:
- VHR (arXiv 2412.13949): α ≥ 1 (α > 1 reinforces; α < 1 is not VHR) and the layer band
  ("paper" {1} ∪ last round(14·L/32), "late" last round(14·L/32), "first" {1}, "half" {1} ∪ last half);
- PAI (arXiv 2407.21771): α ≥ 0, the start layer, the logit contrast on/off;
- VAR (arXiv 2503.03321): p ∈ (0, 1], ρ ∈ [0, 1], τ ∈ (0, √E) (φ ≤ √E: a larger τ never fires);
- VTE (arXiv 2411.19628): the fixed exit layer k ∈ [0, L−1).
Every configuration is compared with no intervention on the same images and questions. The
objective is CHAIR_s + w·CHAIR_i (w = 1), under constraints relative to no intervention:
Recall drops at most `max_recall_drop` points, POPE (adversarial) F1 at most `max_f1_drop` points,
and the caption metrics of eval/mentions.py (docs/caption-metrics.md) may not buy the objective
with worse captions: captions that repeat an object rise at most `max_repeat_rise` points,
captions that overstate a count at most `max_overcount_rise` points, and captions shorten by at
most `max_length_drop` % of their words (a method that swaps "a ball and a car" for "a ball and a
ball" lowers CHAIR_s while naming as many absent objects; the repeat constraint refuses it).
VHR, PAI and VAR take the feasible configuration with the lowest objective; VTE takes the
earliest exit (the largest saving) whose recall drop stays within `vte_max_recall_drop`.

Captions and answers come from the eval runners (eval/runner.py `run` + `local_answer`, scored by
eval/compare.py's ChairTask and PopeTask), one resumable results file per configuration; each
configuration's metrics are cached on disk under a key of (method, parameters, evaluation
settings), so a restarted search skips what it has. The choice and the whole table of every
method go into the model's profile (`lvlm.profile.save_tuned`), where requests select them with
`{"name": "vhr", "preset": "tuned"}` or "vhr:tuned"; `--ship` writes them into the package for
the embedded model (lvlm/shapes/assets/tuned.json), where they become its defaults.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from lvlm_hallu.eval.errors import EvalError

METHODS = ("vhr", "pai", "var", "vte")
GRIDS = ("small", "full")
POPE_TOKENS = 16  # new tokens for a yes/no answer
Metrics = Mapping[str, float]  # CHAIR_s, CHAIR_i, Recall, Len (x100 like papers), caption metrics, F1 (POPE)
# Bumped when the metrics a configuration is judged on change: older cache entries are re-scored
# (the answers are kept in their results files, so that costs no generation).
METRICS_VERSION = 2
Evaluate = Callable[[str | None, Mapping[str, Any]], Metrics]  # (method or None = no intervention, params)


class TuneError(ValueError):
    """Bad input to the search (space outside a method's range, split without images ...)."""


@dataclass(frozen=True)
class Constraints:
    max_recall_drop: float = 3.0  # points of CHAIR recall lost at most
    max_f1_drop: float = 1.0  # points of POPE F1 lost at most
    vte_max_recall_drop: float = 2.0  # VTE: the recall an exit may cost
    weight_i: float = 1.0  # objective = CHAIR_s + weight_i * CHAIR_i
    max_repeat_rise: float = 2.0  # points of "Repeat %" (captions repeating an object) gained at most
    max_overcount_rise: float = 2.0  # points of "Overcount %" (captions overstating a count) gained at most
    max_length_drop: float = 20.0  # % of the captions' words lost at most ("Words")


@dataclass(frozen=True)
class Shape:
    """The model numbers a search space depends on."""

    num_layers: int
    hidden_size: int
    tau: float  # VAR's default threshold for this model (published or scaled)
    sink_dims: tuple[int, ...] = ()


# ---------------------------------------------------------------------------------------------
# Search spaces


def vhr_bands(num_layers: int) -> dict[str, tuple[int, ...]]:
    from lvlm_hallu.interventions.vhr import default_layers, late_band

    k = late_band(num_layers)
    late = tuple(range(num_layers - k, num_layers))
    half = tuple(range(num_layers - max(1, k // 2), num_layers))
    middle = tuple(range(min(2, num_layers - 1), max(3, num_layers - 2)))
    return {"paper": default_layers(num_layers), "late": late, "first": (1,),
            "half": tuple(sorted({1, *half})), "middle": middle}


def vhr_positions() -> tuple[str, ...]:
    from lvlm_hallu.interventions.vhr import POSITIONS

    return POSITIONS


def default_space(method: str, shape: Shape, grid: str = "small") -> dict[str, list[Any]]:
    L, tau = shape.num_layers, shape.tau
    small = grid == "small"
    spaces = {
        "vhr": {"alpha": [1.5, 2.0, 3.0] if small else [1.25, 1.5, 2.0, 2.5, 3.0],
                "layers": ["paper", "late", "middle"] if small else ["paper", "late", "first", "half", "middle"]},
        "pai": {"alpha": [0.2, 0.5, 1.0] if small else [0.1, 0.2, 0.4, 0.7, 1.0],
                "start_layer": [min(2, L - 1)] if small else sorted({1, min(2, L - 1), L // 2}),
                "contrast": [False, True],
                "gamma": [1.1, 3.0] if small else [1.1, 1.5, 2.0, 3.0]},
        "var": {"p": [0.4, 0.8] if small else [0.2, 0.4, 0.6, 0.8],
                "rho": [0.5, 0.8] if small else [0.2, 0.5, 0.8],
                "tau": [round(tau, 4)] if small else [round(tau * f, 4) for f in (0.75, 1.0, 1.5)],
                "require_visual_sink": [True, False]},
        "vte": {"exit_layer": list(range(1, max(2, L - 1)))},
    }
    if method not in spaces:
        raise TuneError(f"no search space for {method!r}; methods: {', '.join(METHODS)}")
    return spaces[method]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# (method, param) -> check(value, shape) returning an error message or None: the paper's range.
RANGES: dict[str, dict[str, Callable[[Any, Shape], str | None]]] = {
    "vhr": {
        "alpha": lambda v, s: None if _number(v) and 1 <= v <= 100 else
        f"alpha={v!r}: VHR reinforces heads, alpha must be in [1, 100] (alpha < 1 is not VHR)",
        "layers": lambda v, s: None if (isinstance(v, str) and v in vhr_bands(s.num_layers)) or (
            isinstance(v, (list, tuple)) and v and all(_int(x) and 0 <= x < s.num_layers for x in v)) else
        f"layers={v!r}: a band ({', '.join(vhr_bands(s.num_layers))}) or layer indices in 0..{s.num_layers - 1}",
        "positions": lambda v, s: None if v in vhr_positions() else
        f"positions={v!r}: the prompt positions VHR scales at prefill, all or last",
    },
    "pai": {
        "alpha": lambda v, s: None if _number(v) and 0 <= v <= 100 else
        f"alpha={v!r}: PAI amplifies image attention, alpha must be in [0, 100]",
        "start_layer": lambda v, s: None if _int(v) and 0 <= v < s.num_layers else
        f"start_layer={v!r}: must be a layer in 0..{s.num_layers - 1}",
        "contrast": lambda v, s: None if isinstance(v, bool) else f"contrast={v!r}: must be true or false",
        "gamma": lambda v, s: None if _number(v) and 1 <= v <= 100 else
        f"gamma={v!r}: the contrast subtracts the text-only prior, gamma must be in [1, 100] (gamma < 1 adds it)",
    },
    "var": {
        "p": lambda v, s: None if _number(v) and 0 < v <= 1 else f"p={v!r}: the fraction recycled must be in (0, 1]",
        "rho": lambda v, s: None if _number(v) and 0 <= v <= 1 else f"rho={v!r}: must be in [0, 1]",
        "tau": lambda v, s: None if _number(v) and 0 < v < math.sqrt(s.hidden_size) else
        f"tau={v!r}: must be in (0, sqrt(E) = {math.sqrt(s.hidden_size):.2f}); phi <= sqrt(E) never passes a larger tau",
        "require_visual_sink": lambda v, s: None if isinstance(v, bool) else
        f"require_visual_sink={v!r}: must be true or false",
    },
    "vte": {
        "exit_layer": lambda v, s: None if _int(v) and 0 <= v < s.num_layers - 1 else
        f"exit_layer={v!r}: must be a layer in 0..{s.num_layers - 2} (k = L - 1 never exits)",
    },
}


def check_space(method: str, space: Mapping[str, Sequence[Any]], shape: Shape) -> None:
    if method not in RANGES:
        raise TuneError(f"unknown method {method!r} to tune; valid: {', '.join(METHODS)}")
    for param, values in space.items():
        check = RANGES[method].get(param)
        if check is None:
            raise TuneError(f"{method}: {param!r} is not searched; searchable: {', '.join(RANGES[method])}")
        if not values:
            raise TuneError(f"{method}.{param}: the search space is empty")
        for value in values:
            problem = check(value, shape)
            if problem:
                raise TuneError(f"{method}: {problem}")


def _split_values(text: str) -> list[str]:
    """'1.5,2,3' -> 3 values; commas inside [...] stay ('[1,5],late' -> 2 values)."""
    return [v.strip() for v in re.split(r",(?![^\[]*\])", text) if v.strip()]


def parse_override(text: str) -> tuple[str, str, list[Any]]:
    """'vhr.alpha=1.5,2,3' -> ('vhr', 'alpha', [1.5, 2, 3]); values are JSON, else strings."""
    name, sep, values = text.partition("=")
    method, dot, param = name.strip().partition(".")
    if not sep or not dot or not values.strip():
        raise TuneError(f"--space expects METHOD.PARAM=V1,V2,..., got {text!r}")
    parsed = []
    for v in _split_values(values):
        try:
            parsed.append(json.loads(v))
        except json.JSONDecodeError:
            parsed.append(v)
    return method, param, parsed


def build_spaces(methods: Sequence[str], shape: Shape, grid: str = "small",
                 overrides: Sequence[str] = ()) -> dict[str, dict[str, list[Any]]]:
    if grid not in GRIDS:
        raise TuneError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TuneError(f"cannot tune {', '.join(unknown)}; methods: {', '.join(METHODS)}")
    spaces = {m: default_space(m, shape, grid) for m in methods}
    for text in overrides:
        method, param, values = parse_override(text)
        if method not in spaces:
            raise TuneError(f"--space {text!r}: {method!r} is not among the methods tuned ({', '.join(methods)})")
        spaces[method][param] = values
    for method, space in spaces.items():
        check_space(method, space, shape)
    return spaces


def configurations(method: str, space: Mapping[str, Sequence[Any]], shape: Shape) -> list[dict[str, Any]]:
    """The grid's parameter dicts, with VHR band names turned into explicit layer lists."""
    names = list(space)
    out = []
    for values in itertools.product(*(space[n] for n in names)):
        params = dict(zip(names, values))
        if method == "vhr" and isinstance(params.get("layers"), str):
            params["layers"] = list(vhr_bands(shape.num_layers)[params["layers"]])
        elif "layers" in params:
            params["layers"] = list(params["layers"])
        if method == "pai" and not params.get("contrast", True):
            params.pop("gamma", None)  # the contrast strength means nothing without the contrast
        if params not in out:
            out.append(params)
    return out


# ---------------------------------------------------------------------------------------------
# Search


def config_key(method: str | None, params: Mapping[str, Any], eval_key: str) -> str:
    blob = json.dumps({"method": method, "params": params, "eval": eval_key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class MetricsCache:
    """One JSON file per evaluated configuration, keyed by (method, params, evaluation settings).

    `key(method, params)`, when given, names the entry instead (SplitEvaluator.key: the settings
    plus the values the loaded model runs the configuration with)."""

    def __init__(self, root: str | Path, eval_key: str,
                 key: Callable[[str | None, Mapping[str, Any]], str] | None = None):
        self.root, self.eval_key = Path(root), eval_key
        self.key = key or (lambda method, params: config_key(method, params, eval_key))
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, method: str | None, params: Mapping[str, Any]) -> Path:
        return self.root / f"{method or 'none'}-{self.key(method, params)}.json"

    def get(self, method: str | None, params: Mapping[str, Any]) -> dict[str, float] | None:
        path = self.path(method, params)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a torn write: evaluate again
        if entry.get("metrics_version") != METRICS_VERSION or "metrics" not in entry:
            return None  # scored before the caption metrics: score again (the answers are kept)
        return entry["metrics"]

    def put(self, method: str | None, params: Mapping[str, Any], metrics: Metrics) -> None:
        path = self.path(method, params)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"method": method, "params": params, "eval": self.eval_key,
                                   "metrics_version": METRICS_VERSION, "metrics": dict(metrics)}, indent=1))
        tmp.replace(path)


def objective(metrics: Metrics, constraints: Constraints) -> float:
    return float(metrics["CHAIR_s"]) + constraints.weight_i * float(metrics["CHAIR_i"])


def judge(method: str, metrics: Metrics, base: Metrics, constraints: Constraints) -> tuple[bool, str]:
    """(feasible, why not) from the changes relative to no intervention.

    A caption metric the baseline has is required of the configuration too (a configuration
    that lacks it cannot show it is no worse)."""
    budget = constraints.vte_max_recall_drop if method == "vte" else constraints.max_recall_drop
    recall_drop = float(base["Recall"]) - float(metrics["Recall"])
    if recall_drop > budget + 1e-9:
        return False, f"recall -{recall_drop:.1f} > {budget:g}"
    if "F1" in metrics and "F1" in base:
        f1_drop = float(base["F1"]) - float(metrics["F1"])
        if f1_drop > constraints.max_f1_drop + 1e-9:
            return False, f"POPE F1 -{f1_drop:.1f} > {constraints.max_f1_drop:g}"
    for name, label, rise in (("Repeat %", "repeats", constraints.max_repeat_rise),
                              ("Overcount %", "overcounts", constraints.max_overcount_rise)):
        if name not in base:
            continue
        if name not in metrics:
            return False, f"{label} not measured"
        gained = float(metrics[name]) - float(base[name])
        if gained > rise + 1e-9:
            return False, f"{label} +{gained:.1f} > {rise:g}"
    if "Words" in base:
        if "Words" not in metrics:
            return False, "length not measured"
        lost = 100.0 * (1.0 - float(metrics["Words"]) / float(base["Words"])) if float(base["Words"]) else 0.0
        if lost > constraints.max_length_drop + 1e-9:
            return False, f"words -{lost:.1f}% > {constraints.max_length_drop:g}%"
    return True, ""


def select(method: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The chosen row: VTE's earliest feasible exit; the others' lowest feasible objective
    (ties keep grid order)."""
    feasible = [r for r in rows if r["feasible"]]
    if not feasible:
        return None
    if method == "vte":
        return min(feasible, key=lambda r: r["params"]["exit_layer"])
    return min(feasible, key=lambda r: r["objective"])


def search(spaces: Mapping[str, Mapping[str, Sequence[Any]]], evaluate: Evaluate, shape: Shape, *,
           constraints: Constraints = Constraints(), cache: MetricsCache | None = None,
           progress: bool = True) -> dict[str, dict[str, Any]]:
    """Evaluate no intervention and every configuration; return {method: profile entry}."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    grids = {m: configurations(m, space, shape) for m, space in spaces.items()}
    todo: list[tuple[str | None, dict[str, Any]]] = [(None, {})] + [(m, p) for m, ps in grids.items() for p in ps]

    def measured(method, params) -> dict[str, float]:
        hit = cache.get(method, params) if cache is not None else None
        if hit is None:
            hit = {k: float(v) for k, v in evaluate(method, params).items()}
            if cache is not None:
                cache.put(method, params, hit)
        return hit

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress)
    results: list[dict[str, float]] = []
    with bar:
        task = bar.add_task("tune", total=len(todo))
        for method, params in todo:
            bar.update(task, description=f"tune {method or 'none'} {_describe(params)}")
            results.append(measured(method, params))
            bar.advance(task)
    base = results[0]
    entries, i = {}, 1
    for method, params_list in grids.items():
        rows = []
        for params in params_list:
            metrics = results[i]
            i += 1
            feasible, why = judge(method, metrics, base, constraints)
            rows.append({"params": params, "metrics": metrics, "objective": round(objective(metrics, constraints), 4),
                         "feasible": feasible, "violation": why})
        chosen = select(method, rows)
        entries[method] = {
            "params": chosen["params"] if chosen else None,
            "metrics": chosen["metrics"] if chosen else None,
            "baseline": base,
            "objective": chosen["objective"] if chosen else None,
            "baseline_objective": round(objective(base, constraints), 4),
            # computed for every method, VTE too (its exit is chosen for the compute it saves, but
            # "improves" says whether it beats no intervention on the objective); unrounded on both
            # sides: a no-op's rounded objective can sit below the baseline's own
            "improves": bool(chosen and objective(chosen["metrics"], constraints) < objective(base, constraints)),
            "constraints": asdict(constraints),
            "space": {k: list(v) for k, v in spaces[method].items()},
            "table": rows,
            "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    return entries


# The caption metrics shown in the tables (eval/mentions.py): the constrained ones and hallucinated mentions.
CAPTION_COLUMNS = ("Halluc/cap", "Repeat %", "Overcount %", "Words")


def _describe(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def markdown(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """The search tables as Markdown (chosen row marked)."""
    lines = []
    for method, entry in entries.items():
        base = entry["baseline"]
        extra = [k for k in CAPTION_COLUMNS if k in base]
        lines += [f"## {method}", "", f"no intervention: CHAIR_s {base['CHAIR_s']:.1f}, CHAIR_i {base['CHAIR_i']:.1f}, "
                  f"Recall {base['Recall']:.1f}" + (f", POPE F1 {base['F1']:.1f}" if "F1" in base else "")
                  + "".join(f", {k} {base[k]:.2f}" for k in extra), "",
                  "| params | CHAIR_s | CHAIR_i | Recall | F1 | Len | " + "".join(f"{k} | " for k in extra)
                  + "objective | feasible |", "|---|---|---|---|---|---|" + "---|" * len(extra) + "---|---|"]
        for row in entry["table"]:
            m = row["metrics"]
            mark = " **chosen**" if row["params"] == entry["params"] else ""
            lines.append(f"| {_describe(row['params'])}{mark} | {m['CHAIR_s']:.1f} | {m['CHAIR_i']:.1f} | "
                         f"{m['Recall']:.1f} | {m.get('F1', float('nan')):.1f} | {m.get('Len', float('nan')):.1f} | "
                         + "".join(f"{m.get(k, float('nan')):.2f} | " for k in extra)
                         + f"{row['objective']:.1f} | {'yes' if row['feasible'] else row['violation']} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The validation split and the real evaluation (eval runners)


# What marks an image as a test image, read from the split's content (ids and file names), so
# renaming the file or rewriting its description does not hide it: the shapes world's test ids
# (lvlm/shapes/world.py SPLITS: 3,000,001 and up, files "test_<id>.png") and COCO's test sets
# ("COCO_test2014_...", "test2015", "test2017").
_SHAPES_TEST_IDS = (3_000_000, 4_000_000)
_TEST_FILE = re.compile(r"^test_\d+\.png$|(^|[_/])test20\d\d")


def held_out_reason(coco: Mapping[str, Any]) -> str:
    """Why a COCO-format split is a test split ("" if it is not): its images' ids or file names, or
    a description that says so."""
    images = coco.get("images") or []
    lo, hi = _SHAPES_TEST_IDS
    by_id = [im["id"] for im in images if isinstance(im.get("id"), int) and lo < im["id"] <= hi]
    by_name = [im.get("file_name", "") for im in images if _TEST_FILE.search(str(im.get("file_name", "")))]
    description = str((coco.get("info") or {}).get("description", ""))
    if by_id:
        return f"{len(by_id)} of {len(images)} images have shapes test ids (first {by_id[0]})"
    if by_name:
        return f"{len(by_name)} of {len(images)} images are test files (first {by_name[0]})"
    if re.search(r"\bsplit test\b", description):
        return f"described as {description!r}"
    return ""


@dataclass
class Split:
    chair: Any  # eval.compare.ChairTask
    pope: Any  # eval.compare.PopeTask or None
    key: dict[str, Any]  # what identifies the evaluation (image ids, questions, prompt)


def load_split(images: Path | None, instances: Path | None, captions: Path | None, *, synonyms: Path | None,
               n: int, pope_n: int, seed: int = 0, prompt: str | None = None,
               allow_test_split: bool = False) -> Split:
    """CHAIR on `n` sampled images and POPE (adversarial) on `pope_n` images of a COCO-format split."""
    from lvlm_hallu.eval.chair import CaptionParser, ground_truth_from_coco, load_synonyms
    from lvlm_hallu.eval.compare import CHAIR_PROMPT, ChairTask, PopeTask
    from lvlm_hallu.eval.coco import image_file_names, image_ids, image_ids_hash, load_coco, sample_image_ids
    from lvlm_hallu.eval.datasets import synonyms_for
    from lvlm_hallu.eval.pope import build_split

    if images is None or not Path(images).is_dir():
        raise TuneError(f"--images must be a folder with the split's images, got {images}")
    if instances is None and captions is None:
        raise TuneError("the validation split needs --instances and/or --captions (COCO format)")
    source_path = instances or captions
    raw = json.loads(Path(source_path).read_text())
    if not raw.get("images"):
        raise TuneError(f"{source_path} lists no images: a validation split needs images")
    held_out = held_out_reason(raw)
    if held_out and not allow_test_split:
        raise TuneError(f"{source_path} is a test split ({held_out}); tune on a validation split "
                        "(shapes: the 'val' split) and keep test images for the final measurement")
    source = load_coco(source_path)
    names = image_file_names(source)
    ids = sample_image_ids(image_ids(source), min(n, len(names)), seed)
    files = {i: str(Path(images) / names[i]) for i in ids}
    missing = [f for f in files.values() if not Path(f).is_file()]
    if missing:
        raise TuneError(f"{len(missing)} of {len(files)} images of the split are missing under {images} "
                        f"(first: {missing[0]})")
    inst = source if instances else None  # source_path is the instances file when one is given
    parser = CaptionParser(load_synonyms(synonyms_for(synonyms, source)))
    gt = ground_truth_from_coco(inst, captions, parser=parser)
    chair = ChairTask({i: files[i] for i in ids}, gt, parser, prompt=prompt or CHAIR_PROMPT)
    pope = None
    questions_hash = None
    if pope_n > 0:
        present = {i: objs for i, objs in gt.objects.items() if i in names and (Path(images) / names[i]).is_file()}
        try:
            questions = build_split(present, "adversarial", n_images=pope_n, seed=seed, image_names=names)
        except ValueError as err:
            raise TuneError(f"POPE on the validation split: {err}") from err
        pope = PopeTask({"adversarial": questions}, Path(images))
        questions_hash = pope.question_hashes["adversarial"]
    key = {"images": image_ids_hash(ids), "n": len(ids), "pope_questions": questions_hash,
           "prompt": chair.prompt, "ground_truth": gt.source.replace(str(Path(source_path).parent), "")}
    return Split(chair, pope, key)


class SplitEvaluator:
    """Evaluate one configuration on the split through the eval runners; results files per config.

    Every results file carries a run fingerprint (eval/fingerprint.py): the task, `model` (its
    identity: id plus config and weights digests), the decoding, the configuration as requested
    and as the loaded model runs it. `key` names a configuration's files after the settings and
    those model-aware values, so a re-profiled model or re-shipped defaults start new files
    instead of resuming old answers; a file that still differs is refused (FingerprintMismatch).
    """

    def __init__(self, pipeline: Any, split: Split, runs_dir: Path, *, max_new_tokens: int = 64,
                 batch_size: int = 8, eval_key: str = "", model: Mapping[str, Any] | None = None):
        from lvlm_hallu.eval.runner import intervention_values, model_context
        from lvlm_hallu.interventions import resolve

        self.pipeline, self.split, self.runs_dir = pipeline, split, Path(runs_dir)
        self.max_new_tokens, self.batch_size, self.eval_key = max_new_tokens, batch_size, eval_key
        self.model = dict(model) if model is not None else {"id": getattr(pipeline, "model_id", None)}
        self.values = intervention_values(resolve, model_context(pipeline))

    def spec(self, method: str | None, params: Mapping[str, Any]) -> Any:
        # "paper": parameters outside the search keep the paper's values, not shipped tuned ones
        return None if method is None else [{"name": method, "preset": "paper", **params}]

    def resolved(self, method: str | None, params: Mapping[str, Any]) -> Any:
        spec = self.spec(method, params)
        return None if spec is None or self.values is None else self.values(spec)

    def key(self, method: str | None, params: Mapping[str, Any]) -> str:
        return config_key(method, {"params": dict(params), "resolved": self.resolved(method, params)},
                          self.eval_key)

    def fingerprint(self, task: Any, method: str | None, params: Mapping[str, Any], max_new_tokens: int) -> Any:
        from lvlm_hallu.eval.compare import run_fingerprint
        from lvlm_hallu.eval.runner import RESOLVED_FIELD

        decoding = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0}
        fp = run_fingerprint(task, self.model, decoding).extend(interventions=self.spec(method, params))
        resolved = self.resolved(method, params)
        return fp if resolved is None else fp.extend(**{RESOLVED_FIELD: resolved})

    def __call__(self, method: str | None, params: Mapping[str, Any]) -> dict[str, float]:
        from lvlm_hallu.eval.runner import local_answer, run
        from lvlm_hallu.interventions import resolve

        stem = f"{method or 'none'}-{self.key(method, params)}"
        spec = self.spec(method, params)
        chair_answer = local_answer(self.pipeline, max_new_tokens=self.max_new_tokens, interventions=spec,
                                    resolve=resolve)
        records = run(self.split.chair.items(), chair_answer, self.runs_dir / f"{stem}_chair.jsonl",
                      batch_size=self.batch_size, progress=False,
                      fingerprint=self.fingerprint(self.split.chair, method, params, self.max_new_tokens))
        metrics = dict(self.split.chair.score(records)[0])
        if self.split.pope is not None:
            pope_answer = local_answer(self.pipeline, max_new_tokens=POPE_TOKENS, interventions=spec,
                                       resolve=resolve)
            records = run(self.split.pope.items(), pope_answer, self.runs_dir / f"{stem}_pope.jsonl",
                          batch_size=self.batch_size, progress=False,
                          fingerprint=self.fingerprint(self.split.pope, method, params, POPE_TOKENS))
            metrics["F1"] = dict(self.split.pope.score(records)[0])["adversarial F1"]
        return metrics


def model_shape(pipeline: Any, profile: Mapping[str, Any]) -> Shape:
    from lvlm_hallu.interventions.defaults import Backbone, sink_threshold

    backbone = Backbone.of(pipeline.facts, profile)
    return Shape(backbone.num_layers, backbone.hidden_size, float(sink_threshold(backbone).value),
                 tuple(profile.get("sink_dims") or ()))


def eval_key_of(eval_info: Mapping[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(eval_info or {}, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tune(pipeline: Any, spaces: Mapping[str, Mapping[str, Sequence[Any]]], evaluate: Evaluate, out: Path, *,
         constraints: Constraints = Constraints(), eval_info: Mapping[str, Any] | None = None,
         ship: bool = False, progress: bool = True, command: str | None = None) -> dict[str, dict[str, Any]]:
    """Search, then store the entries in the model's profile (and the package with `ship`).

    Every entry records the run that chose it: `eval` (the evaluation settings) and `command` (the
    `lvlm tune` command line, when given), so a shipped file whose methods come from several runs
    says which run wrote each.
    """
    from lvlm_hallu.lvlm.profile import load_or_compute, save_tuned, ship_tuned

    profile = load_or_compute(pipeline)
    shape = model_shape(pipeline, profile)
    cache = MetricsCache(Path(out) / "configs", eval_key_of(eval_info), key=getattr(evaluate, "key", None))
    entries = search(spaces, evaluate, shape, constraints=constraints, cache=cache, progress=progress)
    for entry in entries.values():
        entry["eval"] = dict(eval_info or {})
        entry["command"] = command
    save_tuned(pipeline, entries)
    if ship:
        ship_tuned(pipeline, entries)
    Path(out).mkdir(parents=True, exist_ok=True)
    from lvlm_hallu.eval.report import atomic_write_text

    atomic_write_text(Path(out) / "tune_report.json", json.dumps(entries, indent=1, default=list))
    atomic_write_text(Path(out) / "tune_report.md", markdown(entries))
    return entries


# ---------------------------------------------------------------------------------------------
# Command line (mounted as `lvlm tune` by lvlm_hallu/cli.py)


def command_line(ctx: Any) -> str:
    """The running `lvlm tune` command with the options given (values that differ from their
    defaults), rebuilt from the click context's parsed parameters."""
    import shlex
    words = ["lvlm", "tune"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if (getattr(param, "param_type_name", "") != "option" or value == param.default or value in ((), [])
                or param.name == "progress"):
            continue
        flag = param.opts[0]
        if param.is_flag:
            words.append(flag if value else (param.secondary_opts or [flag])[0])
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            words += [flag, str(v)]
    return shlex.join(words)


def tune_command(
    ctx: typer.Context,
    model: str = typer.Option("shapes", "--model", "-m", help="model name, hub id or local path for lvlm.load"),
    images: Path | None = typer.Option(None, "--images", help="folder with the validation images"),
    instances: Path | None = typer.Option(None, "--instances", help="COCO instances file of the validation split"),
    captions: Path | None = typer.Option(None, "--captions", help="COCO captions file of the validation split"),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="CHAIR synonym table (default: COCO; shapes: its own)"),
    methods: str = typer.Option("vhr,pai,var,vte", "--methods", help="comma-separated methods to tune"),
    n: int = typer.Option(64, "-n", min=1, help="CHAIR images per configuration"),
    pope_n: int = typer.Option(32, "--pope-n", min=0, help="POPE (adversarial) images per configuration; 0: no F1 constraint"),
    seed: int = typer.Option(0, "--seed", help="seed of the image and question samples"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="caption length (CHAIR)"),
    grid: str = typer.Option("small", "--grid", help="small | full: size of each method's default grid"),
    space: list[str] = typer.Option([], "--space", help="METHOD.PARAM=V1,V2 replaces one axis (repeatable), "
                                    "e.g. vhr.alpha=1.5,2,3 or vhr.layers=paper,late,[1,6,7]"),
    max_recall_drop: float = typer.Option(3.0, "--max-recall-drop", help="recall points a method may lose"),
    max_f1_drop: float = typer.Option(1.0, "--max-f1-drop", help="POPE adversarial F1 points a method may lose"),
    vte_max_recall_drop: float = typer.Option(2.0, "--vte-max-recall-drop", help="recall points VTE's exit may lose"),
    weight_i: float = typer.Option(1.0, "--chair-i-weight", help="objective = CHAIR_s + w * CHAIR_i"),
    max_repeat_rise: float = typer.Option(2.0, "--max-repeat-rise",
                                          help="points of captions repeating an object a method may add"),
    max_overcount_rise: float = typer.Option(2.0, "--max-overcount-rise",
                                             help="points of captions overstating a count a method may add"),
    max_length_drop: float = typer.Option(20.0, "--max-length-drop",
                                          help="percent of the captions' words a method may lose"),
    val_n: int = typer.Option(200, "--val-n", min=1, help="shapes without --images: size of the generated val split"),
    batch_size: str = typer.Option("32", "--batch-size", help="rows per generate call (per-step overhead dominates "
                                   "small models), or auto: the most rows the memory estimate of `lvlm info` fits"),
    out: Path = typer.Option(Path("runs/tune"), "--out", help="results, cache and report folder (resumable)"),
    ship: bool = typer.Option(False, "--ship", help="embedded model: write the choice into the package (its defaults)"),
    allow_test_split: bool = typer.Option(False, "--allow-test-split", help="tune on a split described as test"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, float16, bfloat16 [default: float16 on CUDA, "
                                     "float32 on CPU]"),
    device_map: str | None = typer.Option(None, "--device-map", help="split the model across devices (accelerate): "
                                          "auto | balanced | sequential | JSON {module: device}"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Search each intervention's parameters on a validation split; store the choice as preset "tuned"."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        from lvlm_hallu import lvlm
        from lvlm_hallu.eval.fingerprint import model_identity
        from lvlm_hallu.lvlm.profile import cache_path, load_or_compute, shipped_models

        names = [m.strip() for m in methods.split(",") if m.strip()]
        if ship and model not in shipped_models():
            raise TuneError(f"--ship is for the embedded models ({', '.join(shipped_models())}); the results of "
                            f"{model!r} go to its profile")
        from lvlm_hallu.lvlm.shapes import EMBEDDED, SYNONYMS_PATH, split_builder

        if model in EMBEDDED and images is None and instances is None and captions is None:
            data = out / "data"  # the val split of the world the embedded model was trained on
            build_split = split_builder(EMBEDDED[model][1])
            instances, captions = build_split(data, "val", val_n)  # deterministic: rebuilding is harmless
            images, synonyms = data / "images", synonyms or SYNONYMS_PATH
        elif model in EMBEDDED and synonyms is None:
            synonyms = SYNONYMS_PATH
        split = load_split(images, instances, captions, synonyms=synonyms, n=n, pope_n=pope_n, seed=seed,
                           allow_test_split=allow_test_split)  # bad data fails before the model loads
        from lvlm_hallu.eval.context import Placement
        from lvlm_hallu.lvlm.devices import parse_device_map

        placement = Placement(device, dtype, parse_device_map(device_map))
        if batch_size != "auto" and (not batch_size.isdigit() or int(batch_size) < 1):
            raise TuneError(f"--batch-size must be a positive integer or auto, got {batch_size!r}")
        pipe = lvlm.load(model, device=device, **placement.load_kwargs())
        profile = load_or_compute(pipe)
        shape = model_shape(pipe, profile)
        if "var" in names and not shape.sink_dims:
            console.print("[yellow]var skipped:[/yellow] the profile has no sink dimensions (`lvlm profile`), "
                          "so VAR cannot act on this model")
            names.remove("var")
        spaces = build_spaces(names, shape, grid, space)
        identity = model_identity(model)  # weights digests: a checkpoint changed in place is a new run
        info = {"model": pipe.model_id, "weights": identity, "profile": cache_path(pipe).name,
                "max_new_tokens": max_new_tokens, "seed": seed, "placement": placement.fields(), **split.key}
        if batch_size == "auto":  # rows of the whole context: the tuner's prompts are not measured here
            from lvlm_hallu.eval.context import auto_batch_size

            rows, how = auto_batch_size(model, placement, None)
            console.print(how)
        else:
            rows = int(batch_size)
        evaluate = SplitEvaluator(pipe, split, out / "runs", max_new_tokens=max_new_tokens, batch_size=rows,
                                  eval_key=eval_key_of(info), model=identity)
        constraints = Constraints(max_recall_drop, max_f1_drop, vte_max_recall_drop, weight_i, max_repeat_rise,
                                  max_overcount_rise, max_length_drop)
        entries = tune(pipe, spaces, evaluate, out, constraints=constraints, eval_info=info, ship=ship,
                       progress=progress, command=command_line(ctx))
    except (TuneError, EvalError, ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    print(markdown(entries))
    for method, entry in entries.items():
        choice = _describe(entry["params"]) if entry["params"] is not None else "none within the constraints"
        note = "" if entry["params"] is None or entry["improves"] else " (does not beat no intervention here)"
        console.print(f"{method}: {choice}{note}")
    console.print(f"stored in {cache_path(pipe)}" + (" and the package (shipped defaults)" if ship else "")
                  + f"; tables in {out / 'tune_report.md'}")
