"""POPE: polling-based object probing (Li et al., EMNLP 2023, arXiv:2305.10355).

Implements docs/eval.md, "POPE": build the random / popular / adversarial splits (per image 3
positives and 3 negatives, interleaved yes, no, yes, no, yes, no; images with >= 3 objects;
seeded sampling), read the official question files (JSON lines {question_id, image, text,
label}), parse answers with the official POPE / LLaVA rule by default (alternatives by name),
and compute the metrics with "yes" as the positive class:

    Accuracy = (TP + TN) / N, Precision = TP / (TP + FP), Recall = TP / (TP + FN),
    F1 = 2PR / (P + R), yes-ratio = predicted yes / N (from the predictions, not the labels).

LLaVA-1.5 reports "POPE" as the mean F1 of the three COCO splits.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lvlm_hallu.eval.coco import read_utf8_text
from lvlm_hallu.eval.errors import AnnotationError, ParserError, PopeBuildError

SPLITS = ("random", "popular", "adversarial")
TEMPLATE = "Is there {article} {object} in the image?"
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5 and lmms-eval


@dataclass(frozen=True)
class PopeQuestion:
    question_id: int
    image: str  # image file name, as in the official files
    text: str
    label: str  # "yes" or "no"

    def to_json(self) -> dict:
        return asdict(self)


def question_text(obj: str) -> str:
    """The POPE template with "an" before a vowel (the historical "imange" typo is not kept)."""
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return TEMPLATE.format(article=article, object=obj)


# ---------------------------------------------------------------------------------------------
# Building splits


def _popular_order(lists: Mapping[int, frozenset[str]]) -> list[str]:
    counts = Counter(o for objs in lists.values() for o in objs)
    return [o for o, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _co_occurrence(lists: Mapping[int, frozenset[str]]) -> dict[str, list[str]]:
    """object -> objects that co-occur with it, most frequent first (ties by name)."""
    pairs: dict[str, Counter[str]] = {}
    for objs in lists.values():
        for a in objs:
            c = pairs.setdefault(a, Counter())
            c.update(b for b in objs if b != a)
    return {a: [b for b, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))] for a, c in pairs.items()}


def sample_images(
    objects_by_image: Mapping[int, Iterable[str]], n_images: int, rng: random.Random, per_image: int = 3
) -> dict[int, frozenset[str]]:
    """`n_images` images with >= `per_image` objects, uniformly at random, in sampled order.

    Walks a seeded permutation of all ids and keeps the first eligible ones (a uniform sample of the
    eligible images), reading only the lists it visits: a lazily mined mapping (captions parsed on
    access) then costs a few hundred images, not all of COCO.
    """
    keys = {int(k): k for k in objects_by_image}
    order = rng.sample(sorted(keys), len(keys))
    chosen: dict[int, frozenset[str]] = {}
    for imid in order:
        if len(chosen) == n_images:
            break
        objs = frozenset(objects_by_image[keys[imid]])
        if len(objs) >= per_image:
            chosen[imid] = objs
    if len(chosen) < n_images:
        raise PopeBuildError(f"only {len(chosen)} images have >= {per_image} objects; {n_images} requested")
    return chosen


def build_split(
    objects_by_image: Mapping[int, Iterable[str]],
    kind: str,
    *,
    n_images: int = 500,
    seed: int = 0,
    image_names: Mapping[int, str] | None = None,
    per_image: int = 3,
) -> list[PopeQuestion]:
    """One POPE split: `n_images` sampled images with >= `per_image` objects, 2*per_image questions each.

    As in the official files, the splits share images and positives: with one `seed`, the images
    and each image's positives (a seeded sample of its objects) are drawn first and identically for
    every `kind`; only the negatives, drawn after them, differ. Negatives are absent from the image
    and not asked before for it: random = uniform over all objects of the sampled images; popular =
    most frequent objects over the sampled images; adversarial = most frequent co-occurring objects
    of the current positive, falling back to random.
    """
    if kind not in SPLITS:
        raise PopeBuildError(f"unknown POPE split {kind!r}; valid: {', '.join(SPLITS)}")
    rng = random.Random(seed)
    chosen = sample_images(objects_by_image, n_images, rng, per_image)
    positives = {imid: rng.sample(sorted(objs), per_image) for imid, objs in chosen.items()}
    # From here on the draws depend on `kind`: negatives only.
    universe = sorted(set().union(*chosen.values())) if chosen else []
    popular = _popular_order(chosen)
    co_occur = _co_occurrence(chosen)

    def random_negative(present: frozenset[str], asked: set[str]) -> str:
        # Uniform over the valid candidates == the reference's rejection loop, but it terminates.
        candidates = [o for o in universe if o not in present and o not in asked]
        if not candidates:
            raise PopeBuildError("no absent object left to ask about; the object vocabulary is too small")
        return rng.choice(candidates)

    questions: list[PopeQuestion] = []
    for imid, present in chosen.items():
        name = image_names[imid] if image_names is not None else str(imid)
        asked: set[str] = set(positives[imid])
        for pos in positives[imid]:
            if kind == "random":
                neg = random_negative(present, asked)
            else:
                ranked = popular if kind == "popular" else co_occur.get(pos, [])
                neg = next((o for o in ranked if o not in present and o not in asked), None)
                if neg is None:
                    neg = random_negative(present, asked)
            asked.add(neg)
            for obj, label in ((pos, "yes"), (neg, "no")):
                questions.append(PopeQuestion(len(questions) + 1, name, question_text(obj), label))
    return questions


def build_splits(objects_by_image: Mapping[int, Iterable[str]], **kwargs) -> dict[str, list[PopeQuestion]]:
    """All three splits from the same seed: same images, same positives, split-specific negatives."""
    return {kind: build_split(objects_by_image, kind, **kwargs) for kind in SPLITS}


# ---------------------------------------------------------------------------------------------
# Question files


def read_questions(path: str | Path) -> list[PopeQuestion]:
    """Official POPE question file: JSON lines {question_id, image, text, label}."""
    out = []
    for n, line in enumerate(read_utf8_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q = PopeQuestion(
                int(row["question_id"]), str(row["image"]), str(row["text"]), str(row["label"]).strip().lower()
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise AnnotationError(f"{path}:{n}: not a POPE question ({err})") from err
        if q.label not in ("yes", "no"):
            raise AnnotationError(f"{path}:{n}: label must be yes or no, got {row['label']!r}")
        out.append(q)
    if not out:
        raise AnnotationError(f"{path}: no questions (an empty file would score 0 without asking anything)")
    ids = [q.question_id for q in out]
    if len(set(ids)) != len(ids):
        raise AnnotationError(f"{path}: repeated question_id")
    return out


def write_questions(path: str | Path, questions: Sequence[PopeQuestion]) -> None:
    from lvlm_hallu.eval.report import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(q.to_json()) + "\n" for q in questions))


_IMAGE_ID = re.compile(r"(\d+)(?:\.\w+)?$")


def image_id_of(image: str) -> int | None:
    """Trailing integer of a file name (COCO_val2014_000000310196.jpg -> 310196), else None."""
    m = _IMAGE_ID.search(image)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Answer parsers: (answer, label) -> "yes" | "no" | None (None = unparseable, counted wrong)
#
# Unparseable answers (docs/eval.md): an answer is unparseable when the parser returns None
# (lmms-eval: anything but an exact yes/no) or when it holds no explicit answer word at all (no
# "yes", "no", "not" or "...n't" in any case: empty answers, "I cannot tell", descriptions). The
# metrics count them by the parser's own rule (the official one reads them as "yes"); the report
# shows how many there were, so a model that stops answering cannot hide behind the rule.

_ANSWER_WORD = re.compile(r"\b(yes|no|not)\b|n't\b", re.IGNORECASE)


def has_answer_word(answer: str) -> bool:
    """True when the answer says yes or no explicitly somewhere (case-insensitive)."""
    return _ANSWER_WORD.search(answer or "") is not None


# Answers read against their surface meaning. The official rule looks for the exact words "No",
# "no" and "not" in the first sentence, so "NO", "It isn't." and "Nope" are read as yes. Scores keep
# the rule (they must equal the reference script's); the report counts such answers beside the
# unparseable ones. The surface reading is deliberately plain: an answer means "no" when it holds a
# negation (no, not, none, nope, ...n't, any case) and no "yes", "yes" when it holds "yes" and no
# negation; anything else (both, neither) has no surface reading and is never counted here.
_SURFACE_YES = re.compile(r"\byes\b", re.IGNORECASE)
_SURFACE_NO = re.compile(r"\b(no|not|none|nope)\b|n't\b", re.IGNORECASE)


def surface_reading(answer: str) -> str | None:
    """"yes", "no", or None when the answer says both or neither (module comment above)."""
    yes, no = _SURFACE_YES.search(answer or ""), _SURFACE_NO.search(answer or "")
    if yes and not no:
        return "yes"
    if no and not yes:
        return "no"
    return None


def read_against_surface(answer: str, prediction: str | None) -> bool:
    """The parser read a plain yes or no answer as the other one ("NO" -> yes under the official rule)."""
    surface = surface_reading(answer)
    return surface is not None and prediction is not None and prediction != surface

Parser = Callable[[str, str], "str | None"]


def parse_pope(answer: str, label: str = "") -> str:
    """Official POPE / LLaVA eval_pope.py: first sentence, no commas, split on " ", negation words."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_opera(answer: str, label: str = "") -> str:
    """OPERA / PAI recorder: whole answer, also "NO" and any word ending in "n't" negate."""
    words = answer.replace(".", "").replace(",", "").split(" ")
    negative = any(w in ("No", "not", "no", "NO") for w in words) or any(w.endswith("n't") for w in words)
    return "no" if negative else "yes"


def parse_vcd(answer: str, label: str) -> str:
    """VCD eval_pope.py: substring test that depends on the label ("no" also matches "not", "know")."""
    text = answer.lower().strip()
    if label == "yes":
        return "yes" if "yes" in text else "no"
    return "no" if "no" in text else "yes"


def parse_lmms_eval(answer: str, label: str = "") -> str | None:
    """lmms-eval: exact "yes"/"no" after lower() and strip(); anything else is wrong."""
    text = answer.lower().strip()
    return text if text in ("yes", "no") else None


PARSERS: Mapping[str, Parser] = {
    "pope": parse_pope,
    "opera": parse_opera,
    "pai": parse_opera,
    "vcd": parse_vcd,
    "lmms-eval": parse_lmms_eval,
}
DEFAULT_PARSER = "pope"


def get_parser(name: str) -> Parser:
    try:
        return PARSERS[name]
    except KeyError:
        raise ParserError(f"unknown POPE answer parser {name!r}; valid: {', '.join(PARSERS)}") from None


# ---------------------------------------------------------------------------------------------
# Metrics


@dataclass(frozen=True)
class PopeMetrics:
    tp: int
    fp: int
    tn: int
    fn: int
    unparsed: int  # answers the parser could not map (lmms-eval flavour only): wrong, in no cell
    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    parser: str = DEFAULT_PARSER
    unparseable: int = 0  # unparsed + answers without a yes/no word (counted by the parser's rule)
    against_surface: int = 0  # plain yes/no answers the parser read as the opposite (scored by its rule)

    def metrics(self) -> dict[str, float]:
        """x100, as papers print them."""
        return {
            "Accuracy": 100 * self.accuracy,
            "Precision": 100 * self.precision,
            "Recall": 100 * self.recall,
            "F1": 100 * self.f1,
            "Yes-ratio": 100 * self.yes_ratio,
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "metrics": self.metrics()}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def metrics_from_predictions(
    predictions: Sequence[str | None], labels: Sequence[str], parser: str = DEFAULT_PARSER, unparseable: int = 0,
    against_surface: int = 0,
) -> PopeMetrics:
    """Confusion counts and metrics; "yes" is the positive class; zero denominators give 0."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = unparsed = 0
    for pred, label in zip(predictions, labels, strict=True):
        if pred is None:
            unparsed += 1
        elif pred == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            tn += label == "no"
            fn += label == "yes"
    n = len(labels)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return PopeMetrics(
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        unparsed=unparsed,
        n=n,
        accuracy=_ratio(tp + tn, n),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        yes_ratio=_ratio(tp + fp, n),
        parser=parser,
        unparseable=max(unparseable, unparsed),
        against_surface=against_surface,
    )


def score_answers(
    questions: Sequence[PopeQuestion], answers: Sequence[str], parser: str = DEFAULT_PARSER
) -> PopeMetrics:
    parse = get_parser(parser)
    preds = [parse(a, q.label) for q, a in zip(questions, answers, strict=True)]
    unclear = sum(p is None or not has_answer_word(a) for p, a in zip(preds, answers, strict=True))
    misread = sum(read_against_surface(a, p) for p, a in zip(preds, answers, strict=True))
    return metrics_from_predictions(preds, [q.label for q in questions], parser, unclear, misread)


def mean_f1(per_split: Mapping[str, PopeMetrics]) -> float:
    """LLaVA-1.5's "POPE" number: the mean F1 over the splits (x100)."""
    return 100 * _ratio(sum(m.f1 for m in per_split.values()), len(per_split))
