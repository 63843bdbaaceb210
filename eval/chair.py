"""CHAIR: object hallucination in captions (Rohrbach et al., EMNLP 2018, arXiv:1809.02156).

Implements the metric exactly as LVLM papers compute it (docs/eval.md, "CHAIR"): the reference
flavour tokenizes with NLTK (punkt + Treebank), POS-tags, lemmatizes with WordNet using the tag,
merges the double words of a fixed table left to right, drops "seat" when "toilet" is present,
and keeps words that are items of the synonym table, mapped to their line's first item.

    CHAIR_i = hallucinated mentions / all mentions        (every occurrence counts; ratio of sums)
    CHAIR_s = captions with >= 1 hallucinated mention / captions
    Recall  = sum |unique mentioned categories ∩ GT| / sum |GT|
    Len     = mean tokens per caption after the double-word merge (punctuation included)

Ground truth per image is the union of the COCO instance categories and the objects mined from
the human captions by the same pipeline, or a precomputed {image_id: [category, ...]} mapping.
An id missing from the ground truth is an error (a string "226988" is never silently an empty set).
The synonym table's artifacts (" motor bike", " cheesecake", "iPhone" never match) are part of
the metric and kept on purpose.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

from pycocotools.coco import COCO

from lvlm_hallu.eval.coco import (captions_by_image, check_image_id, instance_categories, load_coco, read_utf8_text,
                       validate_image_ids)
from lvlm_hallu.eval.errors import AnnotationError, ImageIdError, NLTKDataError
from lvlm_hallu.eval.nltk_data import RESOURCES as NLTK_RESOURCES  # noqa: F401 (where importers found it)
from lvlm_hallu.eval.nltk_data import download_command, ensure

DEFAULT_SYNONYMS_PATH = Path(__file__).resolve().parent / "data" / "chair_synonyms.txt"

FLAVOUR = "nltk-pos-wordnet"  # the reference flavour name recorded in reports


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class SynonymTable:
    """The CHAIR synonym table: word -> category (its line's first item)."""

    categories: tuple[str, ...]
    to_category: Mapping[str, str]
    source: str = "<memory>"

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<memory>") -> SynonymTable:
        categories: list[str] = []
        to_category: dict[str, str] = {}
        for line in lines:
            # The reference splits each stripped line on ", " (comma and ONE space): a double
            # space leaves a leading space on an item, which then never matches. Kept on purpose.
            items = line.strip().split(", ")
            if items == [""]:
                continue
            categories.append(items[0])
            for item in items:
                to_category[item] = items[0]  # a later line wins, as in the reference dict
        return cls(tuple(categories), MappingProxyType(to_category), source)

    def __contains__(self, word: str) -> bool:
        return word in self.to_category


def load_synonyms(path: str | Path | None = None) -> SynonymTable:
    """Read a synonym table (default: the COCO table shipped with the package)."""
    path = Path(path) if path is not None else DEFAULT_SYNONYMS_PATH
    if not path.is_file():
        raise AnnotationError(f"synonym table not found: {path}")
    return SynonymTable.from_lines(path.read_text(encoding="utf-8").splitlines(), str(path))


def coco_double_words() -> dict[str, str]:
    """The reference double-word table for MSCOCO (docs/eval.md step 3)."""
    identity = [
        "motor bike",
        "motor cycle",
        "air plane",
        "traffic light",
        "street light",
        "traffic signal",
        "stop light",
        "fire hydrant",
        "stop sign",
        "parking meter",
        "suit case",
        "sports ball",
        "baseball bat",
        "baseball glove",
        "tennis racket",
        "wine glass",
        "hot dog",
        "cell phone",
        "mobile phone",
        "teddy bear",
        "hair drier",
        "potted plant",
        "laptop computer",
        "stove top oven",
        "home plate",
        "train track",
    ]
    table = {w: w for w in identity}
    # "baby bird" is a bird, not a person ("baby" is a person synonym).
    for animal in [
        "bird",
        "cat",
        "dog",
        "horse",
        "sheep",
        "cow",
        "elephant",
        "bear",
        "zebra",
        "giraffe",
        "animal",
        "cub",
    ]:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    # "passenger jet" is a jet, not a person ("passenger" is a person synonym).
    for vehicle in ["jet", "train"]:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"
    return table


DEFAULT_DOUBLE_WORDS: Mapping[str, str] = MappingProxyType(coco_double_words())


# ---------------------------------------------------------------------------------------------
# Caption -> objects


def require_nltk_data() -> None:
    """Find or download the NLTK data CHAIR needs (eval/nltk_data.py); NLTKDataError in one line if
    it cannot be had."""
    ensure()


@dataclass(frozen=True)
class Mention:
    """One occurrence of a table word: the merged word, its category, its index in `words`."""

    word: str
    category: str
    position: int


@dataclass(frozen=True)
class ParsedCaption:
    words: tuple[str, ...]  # tokens after lemmatization and the double-word merge
    mentions: tuple[Mention, ...]
    tags: tuple[str, ...] = ()  # each word's Penn Treebank tag (a double word: its second's); eval/mentions.py

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(m.category for m in self.mentions)


class CaptionParser:
    """The caption-to-objects pipeline of docs/eval.md (steps 1-5), shared by GT and generations."""

    def __init__(self, synonyms: SynonymTable | None = None, double_words: Mapping[str, str] | None = None):
        require_nltk_data()
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer

        self.synonyms = synonyms if synonyms is not None else load_synonyms()
        self.double_words = MappingProxyType(dict(double_words if double_words is not None else DEFAULT_DOUBLE_WORDS))
        self._lemmatizer = WordNetLemmatizer()
        self._pos = {"J": wordnet.ADJ, "V": wordnet.VERB, "N": wordnet.NOUN, "R": wordnet.ADV}
        self._noun = wordnet.NOUN

    def lemmas(self, caption: str) -> list[str]:
        """Steps 1-2: lower-case, word_tokenize, pos_tag, lemmatize with the tag's WordNet POS."""
        return [w for w, _ in self.tagged_lemmas(caption)]

    def tagged_lemmas(self, caption: str) -> list[tuple[str, str]]:
        """`lemmas` with each lemma's Penn Treebank tag."""
        import nltk

        try:
            tagged = nltk.pos_tag(nltk.word_tokenize(caption.lower()))
            # Tags outside J/V/N/R lemmatize as nouns, like the reference's `... or wordnet.NOUN`.
            return [(self._lemmatizer.lemmatize(w, pos=self._pos.get(t[:1], self._noun)), t) for w, t in tagged]
        except LookupError as err:
            raise NLTKDataError(f"NLTK data missing for CHAIR; run: {download_command()}") from err

    def merge_double_words(self, words: Sequence[str]) -> list[str]:
        """Step 3: greedy left-to-right merge of adjacent pairs found in the double-word table."""
        return [w for w, _ in self._merge_tagged([(w, "") for w in words])]

    def _merge_tagged(self, tagged: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        merged: list[tuple[str, str]] = []
        i = 0
        while i < len(tagged):
            pair = " ".join(w for w, _ in tagged[i : i + 2])
            if i + 1 < len(tagged) and pair in self.double_words:
                merged.append((self.double_words[pair], tagged[i + 1][1]))
                i += 2
            else:
                merged.append(tagged[i])
                i += 1
        return merged

    def parse(self, caption: str) -> ParsedCaption:
        tagged = self._merge_tagged(self.tagged_lemmas(caption))
        words = [w for w, _ in tagged]
        # Step 4, toilet rule: "the seat of the toilet" must not fire "chair".
        drop_seat = "toilet" in words and "seat" in words
        mentions = tuple(
            Mention(w, self.synonyms.to_category[w], i)
            for i, w in enumerate(words)
            if w in self.synonyms.to_category and not (drop_seat and w == "seat")
        )
        return ParsedCaption(tuple(words), mentions, tuple(t for _, t in tagged))


# ---------------------------------------------------------------------------------------------
# Ground truth


@dataclass(frozen=True)
class GroundTruth:
    """image id -> set of categories; looking up an unknown or non-integer id raises ImageIdError."""

    objects: Mapping[int, frozenset[str]]
    source: str = "<memory>"
    # image id -> {category: instances (None: a crowd)} from an instances file; not part of CHAIR
    # (eval/mentions.py's repeats and count claims), None without one
    counts: Mapping[int, Mapping[str, int | None]] | None = None

    def __getitem__(self, image_id: int) -> frozenset[str]:
        check_image_id(image_id)
        try:
            return self.objects[image_id]
        except KeyError:
            raise ImageIdError(f"image id {image_id} is not in the ground truth ({self.source})") from None

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.objects

    def __len__(self) -> int:
        return len(self.objects)

    def to_json(self) -> dict[str, list[str]]:
        return {str(k): sorted(v) for k, v in sorted(self.objects.items())}

    def save(self, path: str | Path) -> None:
        """Write the {image_id: [category, ...]} mapping (a cache: mining captions takes minutes)."""
        from lvlm_hallu.eval.report import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=0))


def ground_truth_from_coco(
    instances: COCO | str | Path | None,
    captions: COCO | str | Path | None = None,
    *,
    parser: CaptionParser,
    image_ids: Iterable[int] | None = None,
) -> GroundTruth:
    """Union of instance categories and categories mined from the human captions.

    `image_ids` restricts the work to those images (mining 200k captions is slow); each of them
    must exist in one of the files.
    """
    if instances is None and captions is None:
        raise AnnotationError("ground truth needs an instances file, a captions file, or a JSON mapping")
    objects: dict[int, set[str]] = {}
    sources = []
    counts = None
    wanted = None if image_ids is None else set(check_image_id(i) for i in image_ids)
    if instances is not None:
        from lvlm_hallu.eval.mentions import instance_counts

        coco = instances if isinstance(instances, COCO) else load_coco(instances)
        sources.append(str(instances) if not isinstance(instances, COCO) else "instances")
        counts = instance_counts(coco, parser.synonyms.to_category, wanted)
        for imid, names in instance_categories(coco).items():
            if wanted is not None and imid not in wanted:
                continue
            cats = objects.setdefault(imid, set())
            for name in names:
                if name not in parser.synonyms.to_category:
                    raise AnnotationError(f"category {name!r} is not in the synonym table {parser.synonyms.source}")
                cats.add(parser.synonyms.to_category[name])
    if captions is not None:
        coco = captions if isinstance(captions, COCO) else load_coco(captions)
        sources.append(str(captions) if not isinstance(captions, COCO) else "captions")
        for imid, caps in captions_by_image(coco).items():
            if wanted is not None and imid not in wanted:
                continue
            cats = objects.setdefault(imid, set())
            for cap in caps:
                cats.update(parser.parse(cap).categories)
    if wanted is not None:
        validate_image_ids(sorted(wanted), objects)
    return GroundTruth(MappingProxyType({k: frozenset(v) for k, v in objects.items()}), " + ".join(sources), counts)


class MinedObjects(Mapping[int, frozenset[str]]):
    """image id -> instance categories ∪ objects of its human captions, mined on first access.

    The same union as `ground_truth_from_coco`, for callers that visit only some images (POPE's
    sampler): all of COCO val2014 has 200k captions, a POPE sample needs a few thousand.
    `on_mine(image_id)` is called after each mined image (a progress bar).
    """

    def __init__(self, instances: COCO | None, captions: COCO | None, parser: CaptionParser, on_mine=None):
        self._instances = instance_categories(instances) if instances is not None else {}
        self._captions = captions_by_image(captions) if captions is not None else {}
        self._parser = parser
        self._on_mine = on_mine
        # The instances file lists the images (and their file names) when there is one.
        self._ids = sorted(self._instances) if instances is not None else sorted(self._captions)
        self._done: dict[int, frozenset[str]] = {}

    def __getitem__(self, image_id: int) -> frozenset[str]:
        if image_id in self._done:
            return self._done[image_id]
        if image_id not in self._instances and image_id not in self._captions:
            raise KeyError(image_id)
        to_category = self._parser.synonyms.to_category
        cats = set()
        for name in self._instances.get(image_id, ()):
            if name not in to_category:
                raise AnnotationError(f"category {name!r} is not in the synonym table {self._parser.synonyms.source}")
            cats.add(to_category[name])
        for cap in self._captions.get(image_id, ()):
            cats.update(self._parser.parse(cap).categories)
        self._done[image_id] = frozenset(cats)
        if self._on_mine is not None:
            self._on_mine(image_id)
        return self._done[image_id]

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def ground_truth_from_json(path: str | Path) -> GroundTruth:
    """Read a {image_id: [category, ...]} mapping; JSON keys are strings of digits."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AnnotationError(f"cannot read ground-truth mapping {path}: {err}") from err
    if not isinstance(raw, dict):
        raise AnnotationError(f"{path}: expected a JSON object {{image_id: [category, ...]}}")
    if not raw:
        raise AnnotationError(f"{path}: the ground-truth mapping is empty")
    objects: dict[int, frozenset[str]] = {}
    for key, cats in raw.items():
        try:
            imid = int(key)  # JSON object keys are always strings; the mapping file is the one place they are ids
        except ValueError as err:
            raise ImageIdError(f"{path}: key {key!r} is not an integer image id") from err
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise AnnotationError(f"{path}: value of {key} must be a list of category names")
        objects[imid] = frozenset(cats)
    return GroundTruth(MappingProxyType(objects), str(path))


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class CaptionRecord:
    image_id: int
    caption: str


def read_captions(
    path: str | Path, *, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[CaptionRecord]:
    """Generated captions from JSON lines {image_id, caption} (a JSON list is accepted too).

    LLaVA-style answer logs name the fields differently ({"question_id": ..., "text": ...}): pass
    `image_id_key="question_id", caption_key="text"`. A null caption is an error naming its
    records (it would otherwise be scored as the text "None"); an empty caption is a caption with
    no mentions, counted in `ChairResult.n_empty`.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"captions file not found: {path}")
    text = read_utf8_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}: not a JSON list: {err}") from err
    else:
        rows = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise AnnotationError(f"{path}:{n}: not JSON: {err}") from err
    out, nulls = [], []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or image_id_key not in row or caption_key not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise AnnotationError(
                f"{path}: record {n} needs {image_id_key!r} and {caption_key!r} (it has {found}); "
                "name other fields with --image-id-key / --caption-key (LLaVA logs: question_id / text)"
            )
        caption = row[caption_key]
        if caption is None:
            nulls.append(n)
            continue
        if not isinstance(caption, str):
            raise AnnotationError(f"{path}: record {n}: caption must be a string, got {type(caption).__name__}")
        out.append(CaptionRecord(check_image_id(row[image_id_key]), caption))
    if nulls:
        shown = ", ".join(map(str, nulls[:10])) + (" ..." if len(nulls) > 10 else "")
        raise AnnotationError(f"{path}: {len(nulls)} record(s) have a null {caption_key!r} (records {shown})")
    if not out:
        raise AnnotationError(f"{path}: no captions to score (an empty file would score CHAIR 0.0)")
    return out


def drop_incomplete_sentence(text: str) -> str:
    """Short-caption protocol, the reference cut: keep the text up to its last "." ("" without one).

    "A dog. Nice!" -> "A dog."; "A dog sits. A cat on the" -> "A dog sits."; "A cat on the" -> "".
    """
    return text[: text.rfind(".") + 1]


@dataclass(frozen=True)
class CaptionScore:
    """Per-caption details: what was mentioned, what was hallucinated, the ground truth."""

    image_id: int
    caption: str  # as scored (after the short-caption cut when that option is on)
    words: tuple[str, ...]
    mentioned: tuple[tuple[str, str], ...]  # (word, category) per mention, in order
    hallucinated: tuple[tuple[str, str], ...]
    gt: tuple[str, ...]
    recalled: tuple[str, ...]  # unique mentioned categories that are in the GT


@dataclass(frozen=True)
class ChairResult:
    chair_s: float  # fractions in [0, 1]; metrics() gives the papers' x100 numbers
    chair_i: float
    recall: float
    length: float
    n_captions: int
    n_hallucinated_captions: int
    n_mentions: int
    n_hallucinated_mentions: int
    n_gt: int
    n_recalled: int
    most_hallucinated: tuple[tuple[str, int], ...]
    captions: tuple[CaptionScore, ...] = field(repr=False)
    short_caption: bool = False
    flavour: str = FLAVOUR
    n_empty: int = 0  # captions with no text (scored as captions without mentions)
    # Captions that name one category in more than one mention ("a house, a tree and a house").
    # Not a CHAIR quantity and no effect on it: contrastive decoding can trade a hallucinated
    # object for a repeated present one, which lowers CHAIR_s while the caption gets worse.
    n_repeated: int = 0

    def metrics(self) -> dict[str, float]:
        """The four numbers as papers print them: CHAIR_s, CHAIR_i, Recall x100; Len as is."""
        return {
            "CHAIR_s": 100.0 * self.chair_s,
            "CHAIR_i": 100.0 * self.chair_i,
            "Recall": 100.0 * self.recall,
            "Len": self.length,
        }

    def to_dict(self, details: bool = True) -> dict:
        out = asdict(self)
        out["metrics"] = self.metrics()
        out["most_hallucinated"] = [list(x) for x in self.most_hallucinated]
        if not details:
            out.pop("captions")
        return out


def _ratio(num: int | float, den: int | float) -> float:
    return num / den if den else 0.0


def score_captions(
    records: Iterable[CaptionRecord | tuple[int, str]],
    gt: GroundTruth,
    parser: CaptionParser,
    *,
    short_caption: bool = False,
    top_k: int = 10,
) -> ChairResult:
    """Score generated captions against the ground truth (all sums over the whole file)."""
    records = [r if isinstance(r, CaptionRecord) else CaptionRecord(*r) for r in records]
    # Validate every id before any work: one bad id must fail the run, not skew it.
    for r in records:
        gt[r.image_id]
    scores: list[CaptionScore] = []
    halluc_counter: Counter[str] = Counter()
    n_hcaps = n_mentions = n_hments = n_gt = n_recalled = n_words = 0
    for r in records:
        caption = drop_incomplete_sentence(r.caption) if short_caption else r.caption
        parsed = parser.parse(caption)
        truth = gt[r.image_id]
        mentioned = tuple((m.word, m.category) for m in parsed.mentions)
        hallucinated = tuple(x for x in mentioned if x[1] not in truth)
        recalled = tuple(sorted({c for _, c in mentioned if c in truth}))
        halluc_counter.update(c for _, c in hallucinated)
        n_mentions += len(mentioned)
        n_hments += len(hallucinated)
        n_hcaps += bool(hallucinated)
        n_gt += len(truth)
        n_recalled += len(recalled)
        n_words += len(parsed.words)
        scores.append(
            CaptionScore(r.image_id, caption, parsed.words, mentioned, hallucinated, tuple(sorted(truth)), recalled)
        )
    most = tuple(sorted(halluc_counter.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k])
    n = len(records)
    return ChairResult(
        chair_s=_ratio(n_hcaps, n),
        chair_i=_ratio(n_hments, n_mentions),
        recall=_ratio(n_recalled, n_gt),
        length=_ratio(n_words, n),
        n_captions=n,
        n_hallucinated_captions=n_hcaps,
        n_mentions=n_mentions,
        n_hallucinated_mentions=n_hments,
        n_gt=n_gt,
        n_recalled=n_recalled,
        most_hallucinated=most,
        captions=tuple(scores),
        short_caption=short_caption,
        n_empty=sum(not r.caption.strip() for r in records),
        n_repeated=sum(len({c for _, c in s.mentioned}) < len(s.mentioned) for s in scores),
    )
