"""Caption metrics beside CHAIR that see what CHAIR_s cannot: repeats, counts, length (docs/caption-metrics.md).

CHAIR (Rohrbach et al. 2018, arXiv:1809.02156) asks whether a caption names an absent object. A
decoding method can lower CHAIR_s by swapping an absent object for a repeated present one ("a ball
and a car" -> "a ball and a ball"): the caption is no better, CHAIR_s is. These metrics are built
on CHAIR's own word parsing (eval/chair.py: NLTK tokens, POS tags, WordNet lemmas, the double-word
merge, the synonym table), so a mention here is exactly a CHAIR mention; CHAIR itself is untouched.

Per caption, with each mention's *introducer* the word before it once its modifiers are skipped
(adjectives, adverbs, participles, nouns that are not mentions, coordinated adjectives: "a big,
red ball", "two small green trees"):
    hallucinated mentions = mentions of a category absent from the ground truth (repeats count)
    distinct, distinct hallucinated = the sets of mentioned / absent categories
    a mention introduces instances when its introducer is "a", "an", "another" (1) or a number
    word / digits (n), or when it is the category's first mention (1); otherwise ("the ball",
    "it", a bare re-mention) it refers back and introduces none
    repetition = a later mention that introduces instances of a category whose earlier mentions
    already introduced as many as the image holds (its instance count; 1 when unknown; never
    for a crowd annotation)
    overcount = a number claim ("three balls") above the category's instance count, for
    categories present with a known count (a claim about an absent category is a hallucination)
    words = CHAIR tokens holding a letter or digit (a double word counts two; clitics "'s", "n't" none)
Over a caption set (ratios of sums, like CHAIR):
    Halluc/cap = Σ hallucinated mentions / captions
    CHAIR_i distinct = 100 · Σ distinct hallucinated / Σ distinct
    Repeat % = 100 · captions with a repetition / captions
    Overcount % = 100 · captions with an overcount / captions
    Halluc or repeat % = 100 · captions with a hallucinated mention or a repetition / captions
    Words = Σ words / captions
Instance counts come from a COCO instances file: per image and synonym-table category, the
number of annotations (`GroundTruth.counts`); a category with an `iscrowd` annotation has none.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from lvlm_hallu.eval.significance import ratio

if TYPE_CHECKING:
    from pycocotools.coco import COCO

    from lvlm_hallu.eval.chair import CaptionParser, ChairResult, GroundTruth, ParsedCaption

NUMBER_WORDS: Mapping[str, int] = MappingProxyType({w: n for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())})
ARTICLES: Mapping[str, int] = MappingProxyType({"a": 1, "an": 1, "another": 1})
# Penn Treebank tags a modifier may carry between an introducer and its object word.
MODIFIER_TAGS = frozenset({"JJ", "JJR", "JJS", "RB", "RBR", "RBS", "VBN", "VBG", "VBD", "NN", "NNS", "NNP", "NNPS",
                           "HYPH"})
# What may stand before a coordinating "," / "and" / "or" among modifiers ("a big, red ball"; the
# tagger often calls a colour or size word a noun: "a tall, smiling man" tags "tall" NN).
COORDINATED_TAGS = frozenset({"JJ", "JJR", "JJS", "VBN", "VBD", "VBG", "NN"})
MAX_MODIFIERS = 4  # "a small bright red striped ball": further back is another phrase
WORD = re.compile(r"[A-Za-z0-9]")

METRICS = ("Halluc/cap", "CHAIR_i distinct", "Repeat %", "Overcount %", "Halluc or repeat %", "Words")
# Additive per-caption statistics (one row per image), the paired bootstrap's columns.
STATS = ("captions", "hallucinated", "distinct", "distinct_hallucinated", "repeat_caption", "repetitions",
         "count_claims", "overcount_caption", "overcounts", "halluc_or_repeat_caption", "words")


def number_of(word: str) -> int | None:
    """"two" -> 2, "12" -> 12, "ball" -> None."""
    if word.isdigit():
        return int(word)
    return NUMBER_WORDS.get(word)


def introducer(words: Sequence[str], tags: Sequence[str], position: int, mention_positions: Iterable[int]
               ) -> tuple[str | None, int]:
    """(introducer word, instances it introduces) of the object word at `position`.

    Walks back over at most MAX_MODIFIERS modifiers (tags in MODIFIER_TAGS that are not object
    words themselves; "," / "and" / "or" only between modifiers); the word it stops at
    introduces 1 ("a", "an", "another") or n (a number) instances, anything else none.
    """
    mentions = set(mention_positions)
    i, skipped = position - 1, 0
    while i >= 0 and skipped < MAX_MODIFIERS and i not in mentions:
        word, tag = words[i], tags[i]
        if number_of(word) is not None or word in ARTICLES:
            break
        coordinated = (tag == "CC" and word in ("and", "or")) or tag == ","
        if coordinated and skipped > 0 and i > 0 and i - 1 not in mentions and tags[i - 1] in COORDINATED_TAGS:
            i, skipped = i - 1, skipped + 1
            continue
        if tag not in MODIFIER_TAGS:
            break
        i, skipped = i - 1, skipped + 1
    if i < 0 or i in mentions:
        return None, 0
    word = words[i]
    n = number_of(word)
    if n is not None:
        return word, n
    return (word, ARTICLES[word]) if word in ARTICLES else (None, 0)


def word_count(words: Iterable[str]) -> int:
    """Words of a CHAIR token list: tokens with a letter or digit, a merged double word counting two."""
    return sum(len(w.split()) for w in words if WORD.search(w) and not w.startswith("'") and w != "n't")


@dataclass(frozen=True)
class CaptionMentions:
    """One caption's mentions seen as instances: what it repeats, what it overcounts."""

    image_id: int
    words: int
    mentions: int
    hallucinated: int
    distinct: int
    distinct_hallucinated: int
    repetitions: tuple[tuple[str, str, int], ...]  # (word, category, word index) of each repetition
    count_claims: tuple[tuple[str, str, int, int | None], ...]  # (number word, category, claimed, true count)
    overcounts: int

    def row(self) -> tuple[float, ...]:
        """The STATS columns of this caption."""
        return (1, self.hallucinated, self.distinct, self.distinct_hallucinated, bool(self.repetitions),
                len(self.repetitions), len(self.count_claims), self.overcounts > 0, self.overcounts,
                bool(self.hallucinated or self.repetitions), self.words)


def analyse(image_id: int, parsed: ParsedCaption, truth: frozenset[str],
            counts: Mapping[str, int | None] | None) -> CaptionMentions:
    """Repetitions and count claims of one parsed caption (`parsed.tags` aligned with its words).

    `counts`: category -> instances in the image (None: a crowd, many); None when the ground
    truth has no instance counts for the image."""
    counts = counts or {}
    positions = [m.position for m in parsed.mentions]
    introduced: Counter[str] = Counter()
    repetitions, claims = [], []
    overcounts = 0
    for m in parsed.mentions:
        word, n = introducer(parsed.words, parsed.tags, m.position, positions)
        first = m.category not in introduced
        if m.category in truth and m.category in counts and counts[m.category] is None:
            budget = None  # a crowd: no repeat is too many
        elif m.category not in truth:
            budget = 1  # absent: the first mention is the hallucination, a second one a repeat
        else:
            budget = max(1, counts.get(m.category) or 1)
        if not first and n > 0 and budget is not None and introduced[m.category] >= budget:
            repetitions.append((m.word, m.category, m.position))
        introduced[m.category] += max(n, 1) if first else n
        if word is not None and number_of(word) is not None and m.category in truth:
            true = counts.get(m.category)
            claims.append((word, m.category, n, true))
            overcounts += true is not None and n > true
    cats = {m.category for m in parsed.mentions}
    absent = [m for m in parsed.mentions if m.category not in truth]
    return CaptionMentions(image_id, word_count(parsed.words), len(parsed.mentions), len(absent), len(cats),
                           len({m.category for m in absent}), tuple(repetitions), tuple(claims), overcounts)


@dataclass(frozen=True)
class MentionResult:
    captions: tuple[CaptionMentions, ...]

    def table(self) -> np.ndarray:
        """(captions, len(STATS)) per-caption statistics."""
        return np.array([c.row() for c in self.captions], dtype=np.float64).reshape(-1, len(STATS))

    def metrics(self) -> dict[str, float]:
        sums = self.table().sum(axis=0, keepdims=True)  # (1, C)
        return {k: float(v[0]) for k, v in metrics_from_sums(sums).items()}

    def totals(self) -> dict[str, int]:
        return {name: int(v) for name, v in zip(STATS, self.table().sum(axis=0))}

    def to_dict(self) -> dict:
        return {"metrics": self.metrics(), "totals": self.totals(), "captions": [asdict(c) for c in self.captions]}


def metrics_from_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """The METRICS from summed per-caption statistics (R, len(STATS)), as ratios of sums."""
    col = {name: sums[:, i] for i, name in enumerate(STATS)}  # each (R,)
    n = col["captions"]
    return {
        "Halluc/cap": ratio(col["hallucinated"], n),
        "CHAIR_i distinct": ratio(col["distinct_hallucinated"], col["distinct"], 100.0),
        "Repeat %": ratio(col["repeat_caption"], n, 100.0),
        "Overcount %": ratio(col["overcount_caption"], n, 100.0),
        "Halluc or repeat %": ratio(col["halluc_or_repeat_caption"], n, 100.0),
        "Words": ratio(col["words"], n),
    }


def score_mentions(chair: ChairResult, gt: GroundTruth, parser: CaptionParser) -> MentionResult:
    """The caption metrics of the captions CHAIR scored (as scored: after the short-caption cut).

    Each caption is parsed again by the same parser; its mentions are CHAIR's, word for word."""
    out = []
    counts = getattr(gt, "counts", None) or {}
    for score in chair.captions:
        parsed = parser.parse(score.caption)
        if tuple((m.word, m.category) for m in parsed.mentions) != score.mentioned:
            raise RuntimeError(f"image {score.image_id}: the parse disagrees with CHAIR's mentions "
                               "(a parser with state between calls?)")
        out.append(analyse(score.image_id, parsed, frozenset(score.gt), counts.get(score.image_id)))
    return MentionResult(tuple(out))


def instance_counts(coco: COCO, to_category: Mapping[str, str], image_ids: Iterable[int] | None = None
                    ) -> dict[int, dict[str, int | None]]:
    """image id -> {synonym-table category: instance annotations (None: it has a crowd annotation)}.

    COCO category names map through the synonym table like CHAIR's instance ground truth (two
    COCO categories of one table line add up); images without annotations get {}."""
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    wanted = None if image_ids is None else set(image_ids)
    out: dict[int, dict[str, int | None]] = {}
    for imid in coco.getImgIds():
        if wanted is not None and imid not in wanted:
            continue
        per: dict[str, int | None] = {}
        for ann in coco.imgToAnns.get(imid, []):
            category = to_category.get(names.get(ann["category_id"], ""))
            if category is None:
                continue
            if ann.get("iscrowd") or per.get(category, 0) is None:
                per[category] = None
            else:
                per[category] = per.get(category, 0) + 1
        out[int(imid)] = per
    return out
