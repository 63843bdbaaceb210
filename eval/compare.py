"""Compare intervention configurations on one benchmark (CHAIR or POPE) and write one report.

The same items (same images, same questions, same prompt and decoding) are answered once per
configuration; configurations are passed through opaquely as `interventions` specs ("none",
"vhr", "var", "vhr+var", or lists of {name, **params}) to whatever executes them (local pipeline,
service client, Ray actors). Each configuration has its own resumable results file, stamped with
the run fingerprint (eval/fingerprint.py), so an interrupted comparison restarts where it stopped
and never reuses another run's answers. Every configuration after the first gets the paired
bootstrap interval (95% unless asked otherwise) of each metric's difference to the first
(eval/significance.py), resampling images: for POPE an image carries its questions in every split.
Metrics follow docs/eval.md: CHAIR (Rohrbach et al. 2018, arXiv:1809.02156) and POPE (Li et al.
2023, arXiv:2305.10355); a CHAIR run also reports the caption metrics of eval/mentions.py
(hallucinated mentions per caption, CHAIR_i over distinct objects, repeats, overstated counts,
length: docs/caption-metrics.md), each with its interval on the same resampled images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lvlm_hallu.eval.chair import FLAVOUR as CHAIR_FLAVOUR
from lvlm_hallu.eval.chair import CaptionParser, GroundTruth, score_captions
from lvlm_hallu.eval.coco import image_ids_hash
from lvlm_hallu.eval.fingerprint import Fingerprint, canonical, items_digest, sha256_text
from lvlm_hallu.eval.mentions import STATS as MENTION_STATS
from lvlm_hallu.eval.mentions import CaptionMentions, score_mentions
from lvlm_hallu.eval.mentions import metrics_from_sums as mention_metrics
from lvlm_hallu.eval.pope import (
    DEFAULT_PARSER,
    PROMPT_SUFFIX,
    PopeQuestion,
    get_parser,
    image_id_of,
    mean_f1,
    read_questions,
    score_answers,
)
from lvlm_hallu.eval.report import ConfigResult, Provenance, Report, ReportPaths, atomic_write_text, sha256_file, write_report
from lvlm_hallu.eval.runner import RESOLVED_FIELD, AnswerFn, Item, RayPool, ResultsFile, check_results_file, run
from lvlm_hallu.eval.significance import (
    BORDERLINE_Z,
    LEVEL,
    MIN_TAIL,
    UnitStats,
    check_level,
    check_resamples,
    paired_bootstrap,
    ratio,
)

CHAIR_PROMPT = "Please describe this image in detail."

# (items, results_path, interventions spec[, description=...]) -> records by key
Executor = Callable[..., Mapping[str, dict]]


class Task(Protocol):
    """A benchmark: items to answer, scoring, provenance, fingerprint and per-unit statistics.

    `score` returns (metrics, details); details may hold "counts" ({name: int}, shown in reports
    next to the metrics, e.g. unparseable POPE answers). `unit_stats` gives the additive per-unit
    statistics the paired bootstrap resamples; `fingerprint_fields` what the answers and scores
    depend on besides model, decoding and interventions.
    """

    name: str

    def items(self) -> list[Item]: ...

    def score(self, records: Mapping[str, dict]) -> tuple[dict[str, float], dict]: ...

    def unit_stats(self, records: Mapping[str, dict], details: Mapping[str, Any]) -> UnitStats: ...

    def provenance_fields(self) -> dict[str, Any]: ...

    def fingerprint_fields(self) -> dict[str, Any]: ...


def config_name(spec: Any) -> str:
    """A readable name for a spec: the preset string itself, or the names joined by "+"."""
    if spec is None:
        return "none"
    if isinstance(spec, str):
        return spec or "none"
    names = [s if isinstance(s, str) else str(s.get("name", "?")) for s in spec]
    return "+".join(names) or "none"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True, eq=False)
class ChairTask:
    """Caption each image with `prompt`; score with CHAIR against `gt`."""

    image_files: Mapping[int, str]  # image id -> image path, in evaluation order
    gt: GroundTruth
    parser: CaptionParser
    prompt: str = CHAIR_PROMPT
    short_caption: bool = False
    name: str = "chair"

    def __post_init__(self) -> None:
        for imid in self.image_files:
            self.gt[imid]  # fail before any generation if an id has no ground truth

    def items(self) -> list[Item]:
        return [Item(str(i), self.prompt, path, {"image_id": i}) for i, path in self.image_files.items()]

    def score(self, records: Mapping[str, dict]) -> tuple[dict[str, float], dict]:
        """CHAIR's four numbers, then the caption metrics of eval/mentions.py (docs/caption-metrics.md)."""
        result = score_captions(
            [(r["image_id"], r["answer"]) for r in records.values()],
            self.gt,
            self.parser,
            short_caption=self.short_caption,
        )
        mentions = score_mentions(result, self.gt, self.parser)
        counts = {"empty captions": result.n_empty, "repeated-object captions": result.n_repeated}
        return {**result.metrics(), **mentions.metrics()}, {**result.to_dict(details=True), "counts": counts,
                                                          "mentions": mentions.to_dict()}

    def unit_stats(self, records: Mapping[str, dict], details: Mapping[str, Any]) -> UnitStats:
        """Per image: mentions, hallucinated mentions, hallucinated caption, GT size, recalled, words,
        then the caption metrics' statistics (eval/mentions.py STATS)."""
        rows = [
            (1, len(c["mentioned"]), len(c["hallucinated"]), bool(c["hallucinated"]), len(c["gt"]),
             len(c["recalled"]), len(c["words"]))
            for c in details["captions"]
        ]
        keys = tuple(str(c["image_id"]) for c in details["captions"])
        table = np.array(rows, dtype=np.float64).reshape(-1, len(CHAIR_STATS))  # (images, 7)
        extra = [CaptionMentions(**c).row() for c in details["mentions"]["captions"]]
        table = np.hstack([table, np.array(extra, dtype=np.float64).reshape(-1, len(MENTION_STATS))])  # (images, 7 + 11)
        columns = CHAIR_STATS + tuple(f"mentions {c}" for c in MENTION_STATS)
        return UnitStats(columns, {"all": table}, {"all": keys}, chair_and_mention_metrics)

    def fingerprint_fields(self) -> dict[str, Any]:
        gt = {str(i): sorted(self.gt[i]) for i in self.image_files}
        return {
            "benchmark": self.name,
            "prompt": self.prompt,
            "items": items_digest(self.items()),
            "scorer": {
                "flavour": CHAIR_FLAVOUR,
                "short_caption": self.short_caption,
                "synonyms_sha256": sha256_text(canonical(dict(self.parser.synonyms.to_category))),
                "double_words_sha256": sha256_text(canonical(dict(self.parser.double_words))),
                "ground_truth_sha256": sha256_text(canonical(gt)),
            },
        }

    def provenance_fields(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "image_ids_hash": image_ids_hash(self.image_files),
            "n_images": len(self.image_files),
            "ground_truth": self.gt.source,
            "metric_flavour": CHAIR_FLAVOUR,
            "options": {"short_caption": self.short_caption, "synonyms": self.parser.synonyms.source},
        }


CHAIR_STATS = ("captions", "mentions", "hallucinated", "hallucinated_caption", "gt", "recalled", "words")


def chair_metrics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CHAIR from summed per-image statistics (R, 7), exactly as eval.chair.score_captions computes it."""
    captions, mentions, halluc, halluc_caps, gt, recalled, words = sums["all"][:, :len(CHAIR_STATS)].T  # each (R,)
    return {
        "CHAIR_s": ratio(halluc_caps, captions, 100.0),
        "CHAIR_i": ratio(halluc, mentions, 100.0),
        "Recall": ratio(recalled, gt, 100.0),
        "Len": ratio(words, captions),
    }


def chair_and_mention_metrics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CHAIR from the first 7 columns, the caption metrics (eval/mentions.py) from the rest."""
    return {**chair_metrics(sums), **mention_metrics(sums["all"][:, len(CHAIR_STATS):])}


POPE_METRICS = {"Acc": "Accuracy", "Prec": "Precision", "Rec": "Recall", "F1": "F1", "Yes": "Yes-ratio"}
POPE_STATS = ("questions", "tp", "fp", "tn", "fn")


def pope_metrics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """POPE per split and the mean F1 from summed one-hot outcomes (R, 5), as eval.pope computes them."""
    out: dict[str, np.ndarray] = {}
    f1s = []
    for split, table in sums.items():
        n, tp, fp, tn, fn = table.T  # each (R,)
        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        f1 = ratio(2 * precision * recall, precision + recall)
        f1s.append(f1)
        values = {"Acc": ratio(tp + tn, n), "Prec": precision, "Rec": recall, "F1": f1, "Yes": ratio(tp + fp, n)}
        out.update({f"{split} {k}": 100 * v for k, v in values.items()})
    out["POPE (mean F1)"] = 100 * np.mean(f1s, axis=0) if f1s else np.zeros(1)
    return out


def pope_image_metrics(splits: Sequence[str], sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pope_metrics from per-image sums whose columns are the splits' (questions, TP, FP, TN, FN) side by side."""
    table, width = sums["images"], len(POPE_STATS)
    return pope_metrics({split: table[:, i * width:(i + 1) * width] for i, split in enumerate(splits)})


def _questions_hash(questions: Sequence[PopeQuestion]) -> str:
    # Same bytes as eval.pope.write_questions, so a written split hashes like its file.
    return hashlib.sha256("".join(json.dumps(q.to_json()) + "\n" for q in questions).encode()).hexdigest()


@dataclass(frozen=True, eq=False)
class PopeTask:
    """Ask every question of every split (prompt = question + suffix); score each split."""

    splits: Mapping[str, Sequence[PopeQuestion]]
    images_dir: Path
    parser: str = DEFAULT_PARSER
    prompt_suffix: str = PROMPT_SUFFIX
    question_hashes: Mapping[str, str] = field(default_factory=dict)
    name: str = "pope"

    def __post_init__(self) -> None:
        get_parser(self.parser)  # unknown names fail now, not after hours of generation
        if not self.question_hashes:
            object.__setattr__(self, "question_hashes", {s: _questions_hash(q) for s, q in self.splits.items()})

    @classmethod
    def from_files(cls, files: Mapping[str, str | Path], images_dir: str | Path, **kwargs: Any) -> PopeTask:
        splits = {name: read_questions(path) for name, path in files.items()}
        return cls(splits, Path(images_dir), question_hashes={n: sha256_file(p) for n, p in files.items()}, **kwargs)

    def items(self) -> list[Item]:
        return [
            Item(
                f"{split}/{q.question_id}",
                q.text + self.prompt_suffix,
                str(self.images_dir / q.image),
                {"split": split, "question_id": q.question_id, "label": q.label},
            )
            for split, questions in self.splits.items()
            for q in questions
        ]

    def score(self, records: Mapping[str, dict]) -> tuple[dict[str, float], dict]:
        per_split = {}
        for split, questions in self.splits.items():
            answers = [records[f"{split}/{q.question_id}"]["answer"] for q in questions]
            per_split[split] = score_answers(questions, answers, self.parser)
        metrics: dict[str, float] = {}
        for split, m in per_split.items():
            named = m.metrics()
            for short, full in POPE_METRICS.items():
                metrics[f"{split} {short}"] = named[full]
        metrics["POPE (mean F1)"] = mean_f1(per_split)
        counts = {f"{split} unparseable": m.unparseable for split, m in per_split.items()}
        counts.update({f"{split} read against surface": m.against_surface for split, m in per_split.items()})
        return metrics, {"splits": {s: m.to_dict() for s, m in per_split.items()}, "counts": counts}

    def unit_stats(self, records: Mapping[str, dict], details: Mapping[str, Any]) -> UnitStats:
        """Per image, the unit POPE samples (docs/eval.md, POPE: the splits share each image's positive
        questions): its summed one-hot TP, FP, TN, FN in every split (unparsed answers in none),
        so a resample draws whole images, the same ones in every split."""
        parse = get_parser(self.parser)
        splits = list(self.splits)
        images = sorted({q.image for questions in self.splits.values() for q in questions})
        row = {image: i for i, image in enumerate(images)}
        table = np.zeros((len(images), len(splits), len(POPE_STATS)))
        for s, (split, questions) in enumerate(self.splits.items()):
            for q in questions:
                pred = parse(records[f"{split}/{q.question_id}"]["answer"], q.label)
                yes, pos = pred == "yes", q.label == "yes"
                no = pred == "no"  # pred None (lmms-eval, unparsed) is in no cell: wrong either way
                table[row[q.image], s] += (1, yes and pos, yes and not pos, no and not pos, no and pos)
        columns = tuple(f"{split} {stat}" for split in splits for stat in POPE_STATS)
        return UnitStats(columns, {"images": table.reshape(len(images), -1)}, {"images": tuple(images)},
                         partial(pope_image_metrics, tuple(splits)))

    def fingerprint_fields(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "prompt": "{question}" + self.prompt_suffix,
            "items": items_digest(self.items()),
            "scorer": {
                "parser": self.parser,
                "questions_sha256": {s: _questions_hash(q) for s, q in self.splits.items()},
            },
        }

    def provenance_fields(self) -> dict[str, Any]:
        images = {image_id_of(q.image) or q.image for qs in self.splits.values() for q in qs}
        ids = sorted(i for i in images if isinstance(i, int))
        return {
            "prompt": "{question}" + self.prompt_suffix,
            "image_ids_hash": image_ids_hash(ids) if len(ids) == len(images) else None,
            "n_images": len(images),
            "question_file_hash": dict(self.question_hashes),
            "metric_flavour": f"pope/parser={self.parser}",
            "options": {"parser": self.parser, "splits": list(self.splits)},
        }


# ---------------------------------------------------------------------------------------------
# Executors


def answer_executor(make_answer: Callable[[Any], AnswerFn], *, batch_size: int = 8, progress: bool = True) -> Executor:
    """Executor from a factory spec -> AnswerFn (local pipeline or service client adapters)."""

    def execute(items: Sequence[Item], path: Path, spec: Any, description: str | None = None) -> Mapping[str, dict]:
        return run(
            items,
            make_answer(spec),
            path,
            batch_size=batch_size,
            progress=progress,
            description=description or config_name(spec),
        )

    return execute


def ray_executor(
    pool: RayPool,
    make_adapter: Callable[[Any], Callable[[Any], AnswerFn]],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> Executor:
    """Executor over Ray actors; `make_adapter(spec)` must be picklable (e.g. a functools.partial)."""

    def execute(items: Sequence[Item], path: Path, spec: Any, description: str | None = None) -> Mapping[str, dict]:
        return pool.run(
            items,
            path,
            make_adapter(spec),
            batch_size=batch_size,
            progress=progress,
            description=description or config_name(spec),
        )

    return execute


def local_adapter(spec: Any, **decoding: Any) -> Callable[[Any], AnswerFn]:
    """Picklable model -> AnswerFn for Ray actors: `local_answer` with this spec and decoding."""
    from lvlm_hallu.eval.runner import local_answer

    return partial(local_answer, interventions=spec, **decoding)


# ---------------------------------------------------------------------------------------------
# Driver


def run_fingerprint(task: Task, model: Mapping[str, Any], decoding: Mapping[str, Any]) -> Fingerprint:
    """The run's fingerprint without interventions (they are added per configuration)."""
    return Fingerprint.of(**task.fingerprint_fields(), model=dict(model), decoding=dict(decoding))


@dataclass(frozen=True)
class PlannedConfig:
    """One configuration of a comparison: its spec, name, results file and fingerprint."""

    spec: Any
    name: str
    results_path: Path
    resolved: Any  # values(spec) or else describe(spec): every parameter, or None
    fingerprint: Fingerprint | None


def plan_configs(
    task: Task,
    configs: Sequence[Any],
    out_dir: str | Path,
    *,
    fingerprint: Fingerprint | None = None,
    describe: Callable[[Any], Any] | None = None,
    names: Sequence[str] | None = None,
    values: Callable[[Any], Any] | None = None,
    pending_values: bool = False,
) -> list[PlannedConfig]:
    """Name, describe and fingerprint every configuration, and claim its results file.

    `describe(spec)` gives the configs as requested (model-free); `values(spec)` as the model runs
    them (model-aware defaults and tuned values filled), fingerprinted as RESOLVED_FIELD.
    Claiming writes the fingerprint header into a new results file or checks an existing one, so
    a mismatched resume fails here (FingerprintMismatch), before anything is generated. Callers
    that load a model call this first with `pending_values=True` (the values are not known yet:
    existing files are checked on every other field and no file is created), then `compare`
    with `values`, which claims for good.
    """
    out_dir = Path(out_dir)
    names = list(names) if names is not None else [config_name(c) for c in configs]
    if len(names) != len(configs):
        raise ValueError(f"{len(names)} names for {len(configs)} configurations")
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique: {names}")
    planned = []
    for spec, name in zip(configs, names, strict=True):
        described = describe(spec) if describe is not None else None
        model_values = values(spec) if values is not None and not pending_values else None
        fp = None
        if fingerprint is not None:
            fp = fingerprint.extend(interventions=described if described is not None else spec)
            if model_values is not None:
                fp = fp.extend(**{RESOLVED_FIELD: model_values})
        path = out_dir / f"{task.name}_{slug(name)}.jsonl"
        planned.append(PlannedConfig(spec, name, path, model_values if model_values is not None else described, fp))
    for plan in planned:  # only after every spec was described: a bad one fails before any file exists
        if plan.fingerprint is None:
            continue
        if pending_values:  # check only; the header is written once the values are known
            check_results_file(plan.results_path, plan.fingerprint, ignore=(RESOLVED_FIELD,))
        else:
            ResultsFile(plan.results_path, plan.fingerprint)
    return planned


def _accepts_description(execute: Executor) -> bool:
    try:
        params = inspect.signature(execute).parameters
    except (TypeError, ValueError):
        return False
    return "description" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _answer(task: Task, items: list[Item], execute: Executor, plan: PlannedConfig) -> dict[str, dict]:
    """Run the items of one configuration; one progress bar per split (POPE) named by benchmark,
    configuration and split."""
    if not _accepts_description(execute):  # an older three-argument executor: one unnamed pass
        return dict(execute(items, plan.results_path, plan.spec))
    groups: dict[str | None, list[Item]] = {}
    for it in items:
        groups.setdefault(it.meta.get("split"), []).append(it)
    records: dict[str, dict] = {}
    for split, group in groups.items():
        label = " ".join(x for x in (task.name, plan.name, split) if x)
        records.update(execute(group, plan.results_path, plan.spec, description=label))
    return {it.key: records[it.key] for it in items}


def compare(
    task: Task,
    configs: Sequence[Any],
    execute: Executor,
    out_dir: str | Path,
    provenance: Provenance,
    *,
    stem: str | None = None,
    charts: bool = True,
    describe: Callable[[Any], Any] | None = None,
    names: Sequence[str] | None = None,
    fingerprint: Fingerprint | None = None,
    resamples: int | None = None,
    bootstrap_seed: int = 0,
    level: float = LEVEL,
    values: Callable[[Any], Any] | None = None,
) -> tuple[Report, ReportPaths]:
    """Run `task` once per configuration, score it, and write the report (JSON, Markdown, PNG).

    `describe(spec)` (e.g. resolve + asdict) records each configuration with all its parameters,
    defaults included; every spec is described before anything runs, so a bad one fails early.
    `values(spec)` records them as the loaded model runs them (`plan_configs`), in the report and
    the fingerprint.
    `names` label the configurations (default: derived from the specs); they name the files too.
    `fingerprint` (`run_fingerprint`) stamps every results file and refuses a mismatched resume.
    Every configuration after the first gets paired bootstrap intervals against the first
    (`resamples` resamples, default and minimum by `level`: eval/significance.py; `bootstrap_seed`,
    two-sided at `level`).
    """
    check_level(level)  # before anything runs
    resamples = check_resamples(resamples, level)  # enough beyond each bound, also before anything runs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = plan_configs(task, configs, out_dir, fingerprint=fingerprint, describe=describe, names=names,
                           values=values)
    items = task.items()
    results, stats = [], []
    for plan in planned:
        records = _answer(task, items, execute, plan)
        metrics, details = task.score(records)
        details_path = atomic_write_text(
            out_dir / f"{task.name}_{slug(plan.name)}_details.json", json.dumps(details, indent=1, default=str)
        )
        info: dict[str, Any] = {"results_file": plan.results_path.name, "details_file": details_path.name}
        if plan.resolved is not None:
            info["interventions_resolved"] = plan.resolved
        if plan.fingerprint is not None:
            info["fingerprint"] = plan.fingerprint.digest
        stats.append(task.unit_stats(records, details) if hasattr(task, "unit_stats") else None)
        intervals = None
        if results and stats[0] is not None and stats[-1] is not None:
            found = paired_bootstrap(stats[0], stats[-1], resamples=resamples, seed=bootstrap_seed, level=level,
                                     names=[m for m in metrics if m in results[0].metrics])
            intervals = {m: iv.to_dict() for m, iv in found.items()}
        results.append(ConfigResult(plan.name, plan.spec, metrics, info, details.get("counts"), intervals))
    # Task facts fill what the caller left unknown; the caller's explicit values win.
    filled = {k: v for k, v in task.provenance_fields().items() if getattr(provenance, k) is None}
    if fingerprint is not None and provenance.fingerprint is None:
        filled["fingerprint"] = {"digest": fingerprint.digest, "fields": dict(fingerprint.fields)}
    provenance = dataclasses.replace(provenance, benchmark=task.name, **filled)
    significance = None
    if len(results) > 1:
        unit = "image" if task.name == "chair" else "image (its questions in every split)"
        significance = {"baseline": results[0].name, "method": "paired bootstrap, percentile interval",
                        "level": level, "resamples": resamples, "seed": bootstrap_seed, "unit": unit,
                        "min_per_tail": MIN_TAIL, "borderline_z": BORDERLINE_Z}
    report = Report(provenance, tuple(results), significance)
    return report, write_report(report, out_dir, stem or f"{task.name}_report", charts=charts)
