"""Resumable evaluation runner: local model, remote service, or Ray actors (docs/eval.md, "Running").

Items with stable keys are answered in batches by an `answer(batch) -> list[str]` callable. Each
result is appended to a JSON-lines file as soon as its batch finishes (write, flush, fsync), so
a crash loses at most the batches in flight. A restarted run reads the file, skips finished keys,
discards a torn last line (the only line a crash can leave half-written) and never writes a key
twice. Given a run fingerprint (eval/fingerprint.py), the file's first line records it and a resume
with another fingerprint is refused with the list of differences, so runs are never mixed. The
adapters build `answer` from an `lvlm` pipeline (`generate(requests)`), from any client
with the service SDK's `chat(image, prompt, ...)`, or spread batches over Ray actors that each hold
a model built by a user factory (eval/cluster.py); the driver alone writes the results file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvlm_hallu.eval.errors import ResultsFileError
from lvlm_hallu.eval.fingerprint import HEADER_KEY, Fingerprint, check_header


@dataclass(frozen=True)
class Item:
    """One unit of work: a stable key, a prompt, an optional image path, metadata copied to the record."""

    key: str
    prompt: str
    image: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


AnswerFn = Callable[[Sequence[Item]], Sequence[str]]


# ---------------------------------------------------------------------------------------------
# The results file


class ResultsFile:
    """Append-only JSON-lines results keyed by item key, safe to reopen after a crash.

    With `fingerprint`, a new file starts with the header line {"fingerprint": ..., "digest": ...};
    an existing file must carry the same fingerprint (FingerprintMismatch lists what differs).
    Without it the header, if any, is kept in `header` and not checked.
    """

    def __init__(self, path: str | Path, fingerprint: Fingerprint | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.header: dict | None = None
        self.records: dict[str, dict] = self._load()
        if fingerprint is not None:
            if self.header is None and not self.records:
                self._write_lines([fingerprint.header()])
                self.header = fingerprint.header()
            else:
                check_header(self.header, fingerprint, self.path)

    def _load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        # A crash can only tear the last line (no trailing newline): drop it and truncate the file
        # there, so the next append starts on a clean line.
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        records: dict[str, dict] = {}
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if n == 1 and isinstance(rec, dict) and HEADER_KEY in rec and "key" not in rec:
                    self.header = rec
                    continue
                key = rec["key"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ResultsFileError(f"{self.path}:{n}: corrupt record before the last line ({err})") from err
            records.setdefault(key, rec)  # first write wins; duplicates are never produced by us
        return records

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def append(self, records: Iterable[dict]) -> None:
        fresh = [r for r in records if r["key"] not in self.records]
        if not fresh:
            return
        self._write_lines(fresh)
        for r in fresh:
            self.records[r["key"]] = r

    def _write_lines(self, rows: Sequence[dict]) -> None:
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())


def check_results_file(path: str | Path, expected: Fingerprint, ignore: Sequence[str] = ()) -> None:
    """Check an existing results file against `expected` minus the `ignore` fields (not known
    yet); a missing or empty file passes and nothing is written (FingerprintMismatch otherwise)."""
    if not Path(path).exists():
        return
    found = ResultsFile(path)
    if found.header is not None or found.records:
        check_header(found.header, expected, path, ignore=ignore)


# The fingerprint field of the configs as the loaded model runs them (eval/fingerprint.py).
RESOLVED_FIELD = "interventions_resolved"


def model_context(pipeline: Any) -> tuple[Any, dict[str, Any]] | None:
    """(facts, profile) of a loaded model, what its model-aware intervention values come from;
    None for a model without them (a test double)."""
    facts, profile = getattr(pipeline, "facts", None), getattr(pipeline, "profile", None)
    if facts is None or not callable(profile):
        return None
    return facts, dict(profile())


def intervention_values(resolve: Callable[[Any], Sequence[Any]] | None,
                        context: tuple[Any, Mapping[str, Any]] | None) -> Callable[[Any], list[dict]] | None:
    """`values(spec)`: the configs of `spec` as the model of `context` runs them, every parameter
    with its model-aware value and source (interventions.defaults.describe); None without both."""
    if resolve is None or context is None:
        return None
    from lvlm_hallu.eval.errors import EvalError
    from lvlm_hallu.interventions.defaults import describe
    from lvlm_hallu.interventions.registry import InterventionError

    facts, profile = context

    def values(spec: Any) -> list[dict[str, Any]]:
        try:
            return describe(resolve(spec), facts, profile)
        except InterventionError as err:  # e.g. "tuned" for a model without tuned values
            raise EvalError(f"interventions {spec!r}: {err}") from err

    return values


def make_record(item: Item, answer: str) -> dict:
    return {"key": item.key, **item.meta, "answer": str(answer)}


def _batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _check_keys(items: Sequence[Item]) -> None:
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"item keys must be unique; repeated: {dupes}")


def _progress(total: int, done: int, description: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    task = progress.add_task(description, total=total, completed=done)
    return progress, task


def run(
    items: Sequence[Item],
    answer: AnswerFn,
    results_path: str | Path,
    *,
    batch_size: int = 8,
    progress: bool = True,
    description: str = "eval",
    fingerprint: Fingerprint | None = None,
) -> dict[str, dict]:
    """Answer every unfinished item, appending records as batches finish; return all records by key.

    `fingerprint` (eval/fingerprint.py) is written into a new results file and checked on resume.
    """
    _check_keys(items)
    results = ResultsFile(results_path, fingerprint)
    todo = [it for it in items if it.key not in results]
    bar, task = _progress(len(items), len(items) - len(todo), description, progress)
    with bar:
        for batch in _batches(todo, batch_size):
            answers = list(answer(batch))
            if len(answers) != len(batch):
                raise RuntimeError(f"answer() returned {len(answers)} answers for {len(batch)} items")
            results.append(make_record(it, a) for it, a in zip(batch, answers, strict=True))
            bar.advance(task, len(batch))
    return {it.key: results.records[it.key] for it in items}


# ---------------------------------------------------------------------------------------------
# Adapters


def load_image(path: str | None):
    """PIL image in RGB (LLaVA processors expect 3 channels), or None for a text-only item."""
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def split_spec(spec: Any) -> tuple[Any, ...]:
    """A preset string "vhr+var" -> ("vhr", "var"); "none"/None -> (); lists pass through."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        return tuple(s.strip() for s in spec.split("+") if s.strip() not in ("", "none"))
    return tuple(spec)


def local_answer(
    pipeline: Any,
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    interventions: Any = None,
    resolve: Callable[[Any], tuple[Any, ...]] | None = None,
    image_loader: Callable[[str | None], Any] = load_image,
) -> AnswerFn:
    """`answer` over an `lvlm` pipeline: one `lvlm.types.Request` per item, one `generate` per batch.

    `interventions` is passed through opaquely: `resolve` (e.g. `interventions.resolve`) turns the
    spec into configs once; without it the spec's names are passed as a tuple.
    """
    from lvlm_hallu.lvlm.types import Request

    configs = tuple(resolve(interventions)) if resolve is not None else split_spec(interventions)

    def answer(batch: Sequence[Item]) -> list[str]:
        requests = [
            Request(
                prompt=it.prompt,
                image=image_loader(it.image),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=tuple(stop),
                interventions=configs,
            )
            for it in batch
        ]
        return [r.text for r in pipeline.generate(requests)]

    return answer


def remote_answer(
    client: Any,
    *,
    max_tokens: int = 512,
    temperature: float = 0.0,
    interventions: Any = None,
    concurrency: int | None = None,
    image_loader: Callable[[str | None], Any] = load_image,
) -> AnswerFn:
    """`answer` over a service client with `chat(image, prompt, *, interventions, max_tokens, temperature)`.

    The batch's requests are sent concurrently so the server's dynamic batching can group them.
    """

    def one(it: Item) -> str:
        out = client.chat(
            image_loader(it.image),
            it.prompt,
            interventions=interventions,
            max_tokens=max_tokens,
            temperature=temperature,
        )
        return str(getattr(out, "text", out))  # "str-like": a str or a response with .text

    def answer(batch: Sequence[Item]) -> list[str]:
        with ThreadPoolExecutor(max_workers=concurrency or max(1, len(batch))) as pool:
            return list(pool.map(one, batch))

    return answer


# ---------------------------------------------------------------------------------------------
# Ray: eval/cluster.py (replicas scheduled by the driver, images as bytes or URIs, re-queued batches)


def __getattr__(name: str) -> Any:
    """`RayPool` / `run_ray` are eval.cluster's `ClusterPool` / `run_cluster` (same arguments)."""
    if name in ("RayPool", "run_ray"):
        from lvlm_hallu.eval import cluster

        return cluster.ClusterPool if name == "RayPool" else cluster.run_cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
