"""`lvlm demo`: the point of the project on one screen.

It searches the held-out shapes test split (lvlm/shapes/world.py: scene i depends only on the
split, the seed and i, so the search is reproducible) for an image where the plain model names an
object that is not in the image and the project's default interventions (`DEFAULT_INTERVENTIONS`)
answer without it. It prints both answers side by side with the hallucinated words marked, each
answer's intervention report in one line, and where to look next (`lvlm inspect`, `lvlm eval
compare`).

Hallucinated words follow CHAIR (Rohrbach et al., EMNLP 2018, arXiv:1809.02156) with eval's own
caption parser (`eval.chair.CaptionParser`: NLTK tokens, POS-tagged WordNet lemmas, double-word
merge, synonym table): a mention is hallucinated when its category is not among the image's
ground-truth categories (the scene's instances).

Selection, in test-split order over at most `limit` images, `batch_size` images per batch (plain
and treated rows of an image share one mixed batch):
    fix        plain names >= 1 absent object; treated names none and still >= 1 present object
    preferred  a fix whose absent object is the co-occurrence partner of a present object
               (world.PARTNER: sun -> cloud, tree -> house ...), the prior the world was built with
The search stops after the first batch holding a preferred fix, else shows the first fix; with no
fix it says so. A candidate counts only after a run of that image alone (what the demo then shows)
confirms it. The choice is cached in $LVLM_CACHE/demo/ under a digest of the model weights and
every search setting, and shipped for the embedded model (demo_found.json), so a run costs one
small generation after the model load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer

# The demo's default intervention for the embedded model. Tuned PAI (alpha 0.2, gamma 1.3) lowered
# CHAIR_s on two fresh held-out sets within the recall and POPE bounds, but repeated objects more;
# under the repeat constraint the re-tuning of 2026-12-07 found no PAI setting, so "pai" now runs
# at the paper's values, which no held-out set has measured (docs/shapes-model.md).
DEFAULT_INTERVENTIONS = "pai"
PROMPT = "Describe this image."
SPLIT = "test"
CACHE_VERSION = 1
SceneSource = Callable[[int], tuple[Any, Any]]  # index -> (Scene, PIL image)


# --------------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Judged:
    """One answer scored against one image's ground truth."""

    text: str
    mentioned: tuple[str, ...]  # categories of every mention, in order
    hallucinated: tuple[str, ...]  # unique absent categories, in order of first mention

    @property
    def recalled(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for c in self.mentioned if c not in self.hallucinated))


def judge(parser, text: str, gt: frozenset[str]) -> Judged:
    mentioned = parser.parse(text).categories
    return Judged(text, mentioned, tuple(dict.fromkeys(c for c in mentioned if c not in gt)))


def mention_spans(parser, text: str) -> list[tuple[int, int, str]]:
    """(start, end, category) in `text` of every mention the CHAIR parser finds.

    The parser works on lemmas of NLTK tokens and merges double words, so positions are mapped
    back: tokens are located in the lower-cased text in order, and the merge is replayed with the
    parser's own table to know which tokens each merged word covers.
    """
    import nltk

    low = text.lower()
    tokens = nltk.word_tokenize(low)
    lemmas = parser.lemmas(text)
    spans, at = [], 0
    for tok in tokens:
        start = low.find(tok, at)  # Treebank rewrites quotes ("" -> ``): such a token has no span
        spans.append((start, start + len(tok)) if start >= 0 else None)
        at = start + len(tok) if start >= 0 else at
    covered, i = [], 0  # merged word index -> (first token, last token)
    while i < len(lemmas):
        pair = " ".join(lemmas[i:i + 2])
        width = 2 if i + 1 < len(lemmas) and pair in parser.double_words else 1
        covered.append((i, i + width - 1))
        i += width
    out = []
    for m in parser.parse(text).mentions:
        first, last = covered[m.position]
        if spans[first] is not None and spans[last] is not None:
            out.append((spans[first][0], spans[last][1], m.category))
    return out


def segments(parser, text: str, gt: frozenset[str]) -> list[tuple[str, bool]]:
    """`text` cut into (piece, hallucinated) segments: the marked words and what lies between."""
    out, at = [], 0
    shown = text if len(text.lower()) == len(text) else text.lower()  # lower() may change lengths
    for start, end, category in mention_spans(parser, text):
        if category in gt:
            continue
        out += [(shown[at:start], False), (shown[start:end], True)]
        at = end
    out.append((shown[at:], False))
    return [(s, bad) for s, bad in out if s]


def marked(pieces: Sequence[tuple[str, bool]]) -> str:
    """Plain-text marking: hallucinated words in [brackets]."""
    return "".join(f"[{s}]" if bad else s for s, bad in pieces)


# --------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Case:
    """One searched image with its plain and treated answers."""

    index: int  # position in the test split
    image_id: int
    gt: tuple[str, ...]
    plain: Judged
    treated: Judged

    @property
    def fixed(self) -> bool:
        return bool(self.plain.hallucinated) and not self.treated.hallucinated and bool(self.treated.recalled)

    @property
    def partners(self) -> tuple[str, ...]:
        """Absent objects of the plain answer that are co-occurrence partners of present ones."""
        from lvlm_hallu.lvlm.shapes.world import PARTNER

        return tuple(c for c in self.plain.hallucinated if any(PARTNER.get(g) == c for g in self.gt))

    @property
    def preferred(self) -> bool:
        return self.fixed and bool(self.partners)


@dataclass
class Outcome:
    """What the search found: the shown case (or None) and the counts behind the claim."""

    case: Optional[Case]
    searched: int = 0
    plain_hallucinated: int = 0  # images whose plain answer names an absent object
    treated_hallucinated: int = 0
    fixes: int = 0
    results: tuple = field(default=(), repr=False)  # (plain Result, treated Result) of the shown case


def order(cases: Sequence[Case]) -> list[Case]:
    """Fixes in the order the demo tries them: preferred first, then split order."""
    return sorted((c for c in cases if c.fixed), key=lambda c: (not c.preferred, c.index))


class Searcher:
    """Runs plain and treated answers for test images and keeps the counts."""

    def __init__(self, pipe, parser, configs: tuple, *, scenes: SceneSource | None = None,
                 prompt: str = PROMPT, max_new_tokens: int = 32):
        from lvlm_hallu.lvlm.shapes import make_scene

        self.pipe, self.parser, self.configs = pipe, parser, tuple(configs)
        self.scenes = scenes or (lambda i: make_scene(SPLIT, i))
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def requests(self, image) -> list:
        from lvlm_hallu import lvlm

        plain = lvlm.Request(self.prompt, image, max_new_tokens=self.max_new_tokens)
        return [plain, lvlm.Request(self.prompt, image, max_new_tokens=self.max_new_tokens,
                                    interventions=self.configs)]

    def run(self, indices: Sequence[int]) -> tuple[list[Case], list]:
        """Cases of the images at `indices`, answered as one mixed batch; also the raw results."""
        scenes = [self.scenes(i) for i in indices]
        results = self.pipe.generate([r for _, image in scenes for r in self.requests(image)])
        cases = []
        for n, (i, (scene, _)) in enumerate(zip(indices, scenes)):
            gt = frozenset(inst.kind for inst in scene.instances)
            plain, treated = results[2 * n], results[2 * n + 1]
            cases.append(Case(i, scene.image_id, tuple(sorted(gt)), judge(self.parser, plain.text, gt),
                              judge(self.parser, treated.text, gt)))
        return cases, [(results[2 * n], results[2 * n + 1]) for n in range(len(indices))]

    def confirm(self, index: int) -> tuple[Case, tuple]:
        """The image answered alone, as the demo shows it."""
        (case,), (pair,) = self.run([index])
        return case, pair

    def search(self, limit: int, batch_size: int) -> Outcome:
        outcome, fallback = Outcome(None), []
        for start in range(0, limit, batch_size):
            cases, _ = self.run(list(range(start, min(start + batch_size, limit))))
            outcome.searched += len(cases)
            outcome.plain_hallucinated += sum(bool(c.plain.hallucinated) for c in cases)
            outcome.treated_hallucinated += sum(bool(c.treated.hallucinated) for c in cases)
            outcome.fixes += sum(c.fixed for c in cases)
            for case in order(cases):
                if not case.preferred:
                    fallback.append(case)
                    continue
                confirmed, pair = self.confirm(case.index)
                if confirmed.preferred:
                    outcome.case, outcome.results = confirmed, pair
                    return outcome
        for case in fallback:
            confirmed, pair = self.confirm(case.index)
            if confirmed.fixed:
                outcome.case, outcome.results = confirmed, pair
                break
        return outcome


# --------------------------------------------------------------------------------- cache


def model_digest(model) -> str:
    """SHA-256 over the config and every parameter's bytes (what the answers depend on)."""
    import torch

    h = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_sha: str, configs: tuple, **settings: Any) -> str:
    fields = {"version": CACHE_VERSION, "model": model_sha, "split": SPLIT,
              "interventions": [repr(c) for c in configs], **settings}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolved_values(pipe, configs: tuple) -> dict[str, Any]:
    """The paper and tuned values each configuration's method resolves against on this model, so
    that re-tuned (or re-shipped) values are a new search, not the old search's counts."""
    from lvlm_hallu.interventions.defaults import preset_values
    from lvlm_hallu.lvlm.profile import backbone

    return {c.name: preset_values(c.name, backbone(pipe), pipe.profile()) for c in configs}


def cache_dir() -> Path:
    return Path(os.environ.get("LVLM_CACHE", Path.home() / ".cache" / "lvlm")) / "demo"


# Search results for the shipped model, so that a fresh clone's first `make demo` takes one small
# generation too; `lvlm demo --ship` rewrites the entry after the model or its defaults change.
SHIPPED = Path(__file__).resolve().with_name("demo_found.json")


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache is only a cache: search again


def find(searcher: Searcher, key: str, *, limit: int, batch_size: int, refresh: bool = False,
         ship: bool = False) -> Outcome:
    """The cached (or shipped) outcome when it still reproduces, else a fresh search, then cached.

    `ship` also stores the outcome as the package's entry (one entry: the shipped model's)."""
    path = cache_dir() / f"{key}.json"
    saved = None if refresh else (_read(path) or _read(SHIPPED).get(key))
    outcome = None
    if saved:
        counts = {k: saved[k] for k in ("searched", "plain_hallucinated", "treated_hallucinated", "fixes")}
        if saved["index"] is None:
            outcome = Outcome(None, **counts)
        else:
            case, pair = searcher.confirm(saved["index"])
            if case.fixed:  # another torch build may break a greedy tie differently: then search again
                outcome = Outcome(case, results=pair, **counts)
    if outcome is None:
        outcome = searcher.search(limit, batch_size)
        saved = {k: v for k, v in asdict(outcome).items() if k not in ("case", "results")}
        saved["index"] = outcome.case.index if outcome.case else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved))
    if ship:
        SHIPPED.write_text(json.dumps({key: saved}, indent=1) + "\n")
    return outcome


# --------------------------------------------------------------------------------- output


def _brief(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        if value and all(isinstance(v, (list, tuple)) for v in value.values()):
            used = sum(bool(v) for v in value.values())
            return f"{sum(len(v) for v in value.values())} in {used}/{len(value)}"
        if len(value) <= 4 and all(isinstance(v, (str, int, float, bool)) for v in value.values()):
            return "{" + ", ".join(f"{k}: {_brief(v)}" for k, v in value.items()) + "}"
        return f"{{{len(value)} keys}}"
    if isinstance(value, (list, tuple)):
        return str(list(value)) if len(value) <= 4 else f"{len(value)} items"
    return str(value)


def report_line(result) -> str:
    """An answer's intervention report and timings in one line."""
    parts = []
    for name, value in result.report.items():
        if name == "attention_backend":
            continue
        if isinstance(value, dict) and not all(isinstance(v, (list, tuple)) for v in value.values()):
            parts.append(f"{name}(" + ", ".join(f"{k}={_brief(v)}" for k, v in value.items()) + ")")
        else:
            parts.append(f"{name}={_brief(value)}")
    t = result.timings
    parts.append(f"prefill {t.prefill_ms:.0f} ms, {result.completion_tokens} tok at "
                 f"{t.decode_tokens_per_s:.3g} tok/s, attention {result.report.get('attention_backend')}")
    return " | ".join(parts if len(parts) > 1 else ["no interventions", *parts])


def render(console, outcome: Outcome, parser, spec: str, image_path: Path | None, model: str) -> None:
    from rich.table import Table
    from rich.text import Text

    case = outcome.case
    counts = (f"{outcome.searched} held-out test images searched: the plain model names an absent object "
              f"in {outcome.plain_hallucinated}, with {spec} in {outcome.treated_hallucinated}; "
              f"{spec} removes every absent object while keeping a present one in {outcome.fixes}.")
    if case is None:
        console.print(Text(f"No image found where {spec} removes the plain model's hallucination. " + counts))
        console.print("Try another spec (--interventions) or a wider search (--limit); details: lvlm eval compare.")
        return
    kind = (f"names {', '.join(case.partners)}: the usual partner of what is there, but absent"
            if case.partners else f"names {', '.join(case.plain.hallucinated)}, "
            f"{'which are' if len(case.plain.hallucinated) > 1 else 'which is'} not there")
    console.print(Text(f"Held-out shapes image {SPLIT} #{case.index} (id {case.image_id}), "
                       f"objects in it: {', '.join(case.gt)}. The plain model {kind}."))
    table = Table(show_lines=False, expand=False)
    table.add_column("plain")
    table.add_column(spec)
    cells = []
    for judged in (case.plain, case.treated):
        text = Text()
        for piece, bad in segments(parser, judged.text.strip(), frozenset(case.gt)):
            text.append(f"[{piece}]" if bad else piece, style="bold red" if bad else None)
        absent = ", ".join(judged.hallucinated) or "none"
        text.append(f"\nabsent: {absent}", style="dim")
        cells.append(text)
    table.add_row(*cells)
    console.print(f'Prompt: "{PROMPT}"', highlight=False)
    console.print(table)
    for label, result in zip(("plain", spec), outcome.results):
        console.print(Text(f"{label}: {report_line(result)}"), highlight=False)
    console.print(Text("[word] = an object the answer names that is not in the image (CHAIR's parser "
                       "against the scene's ground truth). " + counts))
    console.print(Text("More (commands as they run here):\n" + "\n".join(f"  {c}" for c in hints(model, spec, image_path))),
                  soft_wrap=True)


def as_dict(outcome: Outcome, spec: str, image_path: Path | None, model: str) -> dict[str, Any]:
    """The demo's result as data (`lvlm demo --json`): the shown case, both answers, the counts."""
    case = outcome.case
    counts = {k: getattr(outcome, k) for k in ("searched", "plain_hallucinated", "treated_hallucinated", "fixes")}
    shown = None
    if case is not None:
        def answer(judged):
            return {"text": judged.text.strip(), "mentioned": list(judged.mentioned),
                    "hallucinated": list(judged.hallucinated)}

        shown = {"split": SPLIT, "index": case.index, "image_id": case.image_id, "objects": list(case.gt),
                 "image": str(image_path) if image_path else None, "prompt": PROMPT,
                 "plain": answer(case.plain), "treated": answer(case.treated)}
    return {"model": model, "interventions": spec, "case": shown, "counts": counts,
            "more": hints(model, spec, image_path)}


def hints(model: str, spec: str, image_path: Path | None) -> list[str]:
    """The follow-up commands, spelled with this installation's `lvlm` so they run as printed
    from any shell (the venv need not be active): an inspection of the shown image and a CHAIR
    comparison on 200 held-out images of the generated shapes world."""
    import shlex
    import sys

    beside = Path(sys.executable).with_name("lvlm")
    lvlm = shlex.quote(str(beside)) if beside.is_file() else "lvlm"
    image = shlex.quote(str(image_path)) if image_path else "IMAGE.png"
    return [f"{lvlm} inspect --model {shlex.quote(model)} --image {image} --prompt {shlex.quote(PROMPT)} "
            f"--interventions {shlex.quote(spec)}",
            f"{lvlm} eval compare --benchmark chair --interventions {shlex.quote('none,' + spec)} "
            f"--model {shlex.quote(model)} -n 200 --prompt {shlex.quote(PROMPT)}"]


def command(
    interventions: str = typer.Option(DEFAULT_INTERVENTIONS, "--interventions", help="the treated column's spec"),
    model: str = typer.Option("shapes", "--model", "-m", help="a model trained on the shapes world"),
    limit: int = typer.Option(64, "--limit", min=1, help="test images searched at most"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="images per batch"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1),
    refresh: bool = typer.Option(False, "--refresh", help="search again even if a cached result exists"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto: cuda when a GPU is available"),
    ship: bool = typer.Option(False, "--ship", help="maintainers: store the result in the package (lvlm_hallu/demo_found.json)"),
    as_json: bool = typer.Option(False, "--json", help="print the shown image, both answers and the counts as JSON"),
) -> None:
    """Show one held-out image where the default interventions remove a hallucinated object."""
    from rich.console import Console

    from lvlm_hallu import lvlm
    from lvlm_hallu.eval.chair import CaptionParser, load_synonyms
    from lvlm_hallu.eval.errors import EvalError
    from lvlm_hallu.interventions import InterventionError, resolve
    from lvlm_hallu.lvlm.errors import LVLMError
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH, make_scene

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this command's screen is the demo; the load takes a second
    from lvlm_hallu.lvlm.cli import resolve_device

    err = Console(stderr=True, soft_wrap=True)  # an error stays one line at any terminal width
    try:
        configs = resolve(interventions)
        if not configs:
            raise InterventionError("the demo compares the plain model with interventions: name at least one")
        parser = CaptionParser(load_synonyms(SYNONYMS_PATH))  # finds or fetches NLTK's data first
        device = resolve_device(device)
        with err.status(f"loading {model}"):
            pipe = lvlm.load(model, device=device)
        searcher = Searcher(pipe, parser, configs, max_new_tokens=max_new_tokens)
        key = cache_key(model_digest(pipe.model), configs, prompt=PROMPT, max_new_tokens=max_new_tokens,
                        limit=limit, batch_size=batch_size, presets=resolved_values(pipe, configs))
        with err.status(f"searching up to {limit} held-out test images ({batch_size} per batch, cached after)"):
            outcome = find(searcher, key, limit=limit, batch_size=batch_size, refresh=refresh, ship=ship)
    except (LVLMError, InterventionError, EvalError, OSError, ValueError) as error:
        from rich.markup import escape

        err.print("[red]error:[/red] " + escape(" ".join(str(error).split())))
        raise typer.Exit(2) from None
    image_path = None
    if outcome.case is not None:  # saved for the `lvlm inspect` pointer; a fresh clone has no cache folder yet
        image_path = cache_dir() / f"{SPLIT}_{outcome.case.image_id}.png"
        try:
            image_path.parent.mkdir(parents=True, exist_ok=True)
            make_scene(SPLIT, outcome.case.index)[1].save(image_path)
        except OSError as error:
            err.print(f"[yellow]note:[/yellow] could not save the image ({error}); the demo goes on")
            image_path = None
    if as_json:
        print(json.dumps(as_dict(outcome, interventions, image_path, model), indent=2))
        return
    render(Console(), outcome, parser, interventions, image_path, model)
