"""Compare intervention configurations on one benchmark (CHAIR or POPE) and write one report.

The same items (same images, same questions, same prompt and decoding) are answered once per
configuration; configurations are passed through opaquely as `interventions` specs ("none",
"vhr", "var", "vhr+var", or lists of {name, **params}) to whatever executes them (local pipeline,
service client, Ray actors). Each configuration has its own resumable results file, so an
interrupted comparison restarts where it stopped. Metrics follow docs/eval.md: CHAIR (Rohrbach et
al. 2018, arXiv:1809.02156) and POPE (Li et al. 2023, arXiv:2305.10355).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from eval.chair import FLAVOUR as CHAIR_FLAVOUR
from eval.chair import CaptionParser, GroundTruth, score_captions
from eval.coco import image_ids_hash
from eval.pope import (
    DEFAULT_PARSER,
    PROMPT_SUFFIX,
    PopeQuestion,
    get_parser,
    image_id_of,
    mean_f1,
    read_questions,
    score_answers,
)
from eval.report import ConfigResult, Provenance, Report, ReportPaths, atomic_write_text, sha256_file, write_report
from eval.runner import AnswerFn, Item, RayPool, run

CHAIR_PROMPT = "Please describe this image in detail."

# (items, results_path, interventions spec) -> records by key
Executor = Callable[[Sequence[Item], Path, Any], Mapping[str, dict]]


class Task(Protocol):
    name: str

    def items(self) -> list[Item]: ...

    def score(self, records: Mapping[str, dict]) -> tuple[dict[str, float], dict]: ...

    def provenance_fields(self) -> dict[str, Any]: ...


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
        result = score_captions(
            [(r["image_id"], r["answer"]) for r in records.values()],
            self.gt,
            self.parser,
            short_caption=self.short_caption,
        )
        return result.metrics(), result.to_dict(details=True)

    def provenance_fields(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "image_ids_hash": image_ids_hash(self.image_files),
            "n_images": len(self.image_files),
            "ground_truth": self.gt.source,
            "metric_flavour": CHAIR_FLAVOUR,
            "options": {"short_caption": self.short_caption, "synonyms": self.parser.synonyms.source},
        }


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
            metrics[f"{split} Acc"] = m.metrics()["Accuracy"]
            metrics[f"{split} F1"] = m.metrics()["F1"]
            metrics[f"{split} Yes"] = m.metrics()["Yes-ratio"]
        metrics["POPE (mean F1)"] = mean_f1(per_split)
        return metrics, {"splits": {s: m.to_dict() for s, m in per_split.items()}}

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

    def execute(items: Sequence[Item], path: Path, spec: Any) -> Mapping[str, dict]:
        return run(
            items, make_answer(spec), path, batch_size=batch_size, progress=progress, description=config_name(spec)
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

    def execute(items: Sequence[Item], path: Path, spec: Any) -> Mapping[str, dict]:
        return pool.run(
            items, path, make_adapter(spec), batch_size=batch_size, progress=progress, description=config_name(spec)
        )

    return execute


def local_adapter(spec: Any, **decoding: Any) -> Callable[[Any], AnswerFn]:
    """Picklable model -> AnswerFn for Ray actors: `local_answer` with this spec and decoding."""
    from eval.runner import local_answer

    return partial(local_answer, interventions=spec, **decoding)


# ---------------------------------------------------------------------------------------------
# Driver


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
) -> tuple[Report, ReportPaths]:
    """Run `task` once per configuration, score it, and write the report (JSON, Markdown, PNG).

    `describe(spec)` (e.g. resolve + asdict) records each configuration with all its parameters,
    defaults included; every spec is described before anything runs, so a bad one fails early.
    `names` label the configurations (default: derived from the specs); they name the files too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else [config_name(c) for c in configs]
    if len(names) != len(configs):
        raise ValueError(f"{len(names)} names for {len(configs)} configurations")
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique: {names}")
    described = [describe(c) for c in configs] if describe is not None else [None] * len(configs)
    items = task.items()
    results = []
    for spec, name, full in zip(configs, names, described, strict=True):
        results_path = out_dir / f"{task.name}_{slug(name)}.jsonl"
        records = execute(items, results_path, spec)
        metrics, details = task.score(records)
        details_path = atomic_write_text(
            out_dir / f"{task.name}_{slug(name)}_details.json", json.dumps(details, indent=1, default=str)
        )
        info = {"results_file": results_path.name, "details_file": details_path.name}
        if full is not None:
            info["interventions_resolved"] = full
        results.append(ConfigResult(name, spec, metrics, info))
    # Task facts fill what the caller left unknown; the caller's explicit values win.
    filled = {k: v for k, v in task.provenance_fields().items() if getattr(provenance, k) is None}
    provenance = dataclasses.replace(provenance, benchmark=task.name, **filled)
    report = Report(provenance, tuple(results))
    return report, write_report(report, out_dir, stem or f"{task.name}_report", charts=charts)
