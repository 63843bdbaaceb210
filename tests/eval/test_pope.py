"""POPE: answer parsers, metrics on a hand-built confusion matrix, split-builder invariants."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from lvlm_hallu.eval.coco import image_file_names, instance_categories, load_coco
from lvlm_hallu.eval.errors import AnnotationError, ParserError, PopeBuildError
from lvlm_hallu.eval.pope import (
    PARSERS,
    PopeQuestion,
    build_split,
    build_splits,
    get_parser,
    mean_f1,
    metrics_from_predictions,
    question_text,
    read_against_surface,
    read_questions,
    score_answers,
    surface_reading,
    write_questions,
)

# ---------------------------------------------------------------------------------------------
# Parsers

ANSWERS = ["Yes.", "NO", "No\n", "I don't know.", "Yes, but it is not clearly visible."]

# parser -> label -> outcome per answer (None = unparseable, counted wrong)
EXPECTED = {
    # first sentence, commas removed, split on " ", case-sensitive No/not/no
    "pope": {"yes": ["yes", "yes", "yes", "yes", "no"], "no": ["yes", "yes", "yes", "yes", "no"]},
    # whole answer; also NO and words ending in n't
    "opera": {"yes": ["yes", "no", "yes", "no", "no"], "no": ["yes", "no", "yes", "no", "no"]},
    # substring test on the lower-cased answer, depending on the label ("know" contains "no")
    "vcd": {"yes": ["yes", "no", "no", "no", "yes"], "no": ["yes", "no", "no", "no", "no"]},
    # exact yes/no after lower().strip()
    "lmms-eval": {"yes": [None, "no", "no", None, None], "no": [None, "no", "no", None, None]},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("label", ["yes", "no"])
def test_parser_outcomes(name, label):
    parse = get_parser(name)
    assert [parse(a, label) for a in ANSWERS] == EXPECTED[name][label]


def test_parser_registry():
    assert get_parser("pai") is get_parser("opera")
    assert set(PARSERS) == {"pope", "opera", "pai", "vcd", "lmms-eval"}
    with pytest.raises(ParserError, match="valid: pope"):
        get_parser("gpt")


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_on_a_hand_built_confusion_matrix():
    labels = ["yes"] * 5 + ["no"] * 5
    preds = ["yes", "yes", "yes", "no", "no"] + ["yes", "no", "no", "no", "no"]  # TP 3, FN 2, FP 1, TN 4
    m = metrics_from_predictions(preds, labels)
    assert (m.tp, m.fn, m.fp, m.tn, m.n) == (3, 2, 1, 4, 10)
    assert m.accuracy == pytest.approx(0.7)
    assert m.precision == pytest.approx(0.75)
    assert m.recall == pytest.approx(0.6)
    assert m.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m.yes_ratio == pytest.approx(0.4)  # from predictions; the labels would give 0.5
    assert m.metrics()["Accuracy"] == pytest.approx(70.0)


def test_zero_denominators_and_unparsed():
    m = metrics_from_predictions(["no", "no"], ["yes", "no"])
    assert (m.precision, m.recall, m.f1, m.yes_ratio) == (0.0, 0.0, 0.0, 0.0)
    empty = metrics_from_predictions([], [])
    assert empty.accuracy == 0.0
    q = [PopeQuestion(1, "a.jpg", "?", "yes"), PopeQuestion(2, "a.jpg", "?", "no")]
    lm = score_answers(q, ["Yes.", "no"], parser="lmms-eval")
    assert (lm.unparsed, lm.tn, lm.tp, lm.accuracy) == (1, 1, 0, 0.5)
    official = score_answers(q, ["Yes.", "no"])
    assert official.accuracy == 1.0 and official.parser == "pope"


def test_mean_f1_over_splits():
    a = metrics_from_predictions(["yes", "no"], ["yes", "no"])  # F1 1
    b = metrics_from_predictions(["yes", "yes"], ["yes", "no"])  # P 0.5, R 1 -> F1 2/3
    assert mean_f1({"random": a, "popular": b}) == pytest.approx(100 * (1 + 2 / 3) / 2)


# ---------------------------------------------------------------------------------------------
# Split builder on a synthetic COCO-format dataset

VOCAB = [
    "apple",
    "bench",
    "cat",
    "dog",
    "elephant",
    "fork",
    "giraffe",
    "horse",
    "oven",
    "pizza",
    "umbrella",
    "vase",
    "zebra",
    "kite",
    "sink",
    "book",
    "clock",
    "bed",
    "cup",
    "bowl",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """600 images; groups of objects co-occur (a prior for the adversarial split); 40 have < 3 objects."""
    rng = random.Random(1)
    groups = [VOCAB[0:5], VOCAB[5:10], VOCAB[10:15], VOCAB[15:20]]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(VOCAB)]
    cid = {n: i + 1 for i, n in enumerate(VOCAB)}
    images, anns = [], []
    for imid in range(1, 601):
        images.append({"id": imid, "file_name": f"img_{imid:06d}.png", "width": 8, "height": 8})
        k = rng.randint(1, 2) if imid <= 40 else rng.randint(3, 7)
        group = groups[imid % 4]
        objs = set(rng.sample(group, min(k, 4)))
        while len(objs) < k:
            objs.add(rng.choice(VOCAB))
        for o in sorted(objs):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": imid,
                    "category_id": cid[o],
                    "bbox": [0, 0, 1, 1],
                    "area": 1,
                    "iscrowd": 0,
                }
            )
    path = tmp_path_factory.mktemp("pope") / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    coco = load_coco(path)
    objects = {i: set(v) for i, v in instance_categories(coco).items()}
    return objects, image_file_names(coco)


def _per_image(questions):
    assert len(questions) % 6 == 0
    return [questions[i : i + 6] for i in range(0, len(questions), 6)]


def _obj(q):
    m = re.fullmatch(r"Is there an? (.+) in the image\?", q.text)
    assert m, q.text
    return m.group(1)


@pytest.mark.parametrize("kind", ["random", "popular", "adversarial"])
def test_builder_invariants(synthetic, kind):
    objects, names = synthetic
    qs = build_split(objects, kind, n_images=500, seed=7, image_names=names)
    assert len(qs) == 3000
    assert Counter(q.label for q in qs) == {"yes": 1500, "no": 1500}
    assert [q.label for q in qs] == ["yes", "no"] * 1500
    assert [q.question_id for q in qs] == list(range(1, 3001))
    by_name = {v: k for k, v in names.items()}
    groups = _per_image(qs)
    assert len({g[0].image for g in groups}) == 500
    for g in groups:
        assert len({q.image for q in g}) == 1
        present = objects[by_name[g[0].image]]
        assert len(present) >= 3
        asked = [_obj(q) for q in g]
        assert len(set(asked)) == 6  # no object asked twice for one image
        for q, o in zip(g, asked):
            assert (o in present) == (q.label == "yes")
            assert q.text == question_text(o)


def test_popular_and_adversarial_orderings(synthetic):
    objects, names = synthetic
    by_name = {v: k for k, v in names.items()}
    splits = build_splits(objects, n_images=500, seed=7, image_names=names)
    sampled = {by_name[g[0].image] for g in _per_image(splits["popular"])}
    assert sampled == {by_name[g[0].image] for g in _per_image(splits["adversarial"])}  # same images
    counts = Counter(o for i in sampled for o in objects[i])
    popular = sorted(counts, key=lambda o: (-counts[o], o))
    co = {a: Counter() for a in counts}
    for i in sampled:
        for a in objects[i]:
            co[a].update(b for b in objects[i] if b != a)
    for g in _per_image(splits["popular"]):
        present = objects[by_name[g[0].image]]
        asked: list[str] = []
        for pos_q, neg_q in zip(g[0::2], g[1::2]):
            asked.append(_obj(pos_q))
            expected = next(o for o in popular if o not in present and o not in asked)
            assert _obj(neg_q) == expected
            asked.append(expected)
    fallbacks = 0
    for g in _per_image(splits["adversarial"]):
        present = objects[by_name[g[0].image]]
        asked = []
        for pos_q, neg_q in zip(g[0::2], g[1::2]):
            pos = _obj(pos_q)
            asked.append(pos)
            ranked = sorted(co[pos], key=lambda o: (-co[pos][o], o))
            expected = next((o for o in ranked if o not in present and o not in asked), None)
            if expected is None:
                fallbacks += 1
            else:
                assert _obj(neg_q) == expected
            asked.append(_obj(neg_q))
    assert fallbacks < 100  # the co-occurrence prior decides nearly every negative


def test_builder_is_seeded_and_checks_its_input(synthetic):
    objects, names = synthetic
    a = build_split(objects, "random", n_images=50, seed=3)
    assert a == build_split(objects, "random", n_images=50, seed=3)
    assert a != build_split(objects, "random", n_images=50, seed=4)
    with pytest.raises(PopeBuildError, match="have >= 3 objects"):
        build_split(objects, "random", n_images=590, seed=0)
    with pytest.raises(PopeBuildError):
        build_split(objects, "sideways", n_images=5)


def test_template_article():
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("dog") == "Is there a dog in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"


def test_question_files_roundtrip(tmp_path, synthetic):
    objects, names = synthetic
    qs = build_split(objects, "adversarial", n_images=20, seed=0, image_names=names)
    path = tmp_path / "coco_pope_adversarial.json"
    write_questions(path, qs)
    assert read_questions(path) == qs
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"question_id", "image", "text", "label"}
    path.write_text('{"question_id": 1, "image": "x.jpg", "text": "?", "label": "maybe"}\n')
    with pytest.raises(AnnotationError):
        read_questions(path)


# ---------------------------------------------------------------------------------------------
# The official files' structure: shared positives; unparseable answers counted


def test_splits_share_images_and_positives_on_coco_data(synthetic):
    """Built from a COCO-format instances file: the splits differ only in their negatives."""
    objects, names = synthetic
    splits = build_splits(objects, n_images=500, seed=11, image_names=names)
    positives = {k: [(q.image, q.text) for q in qs if q.label == "yes"] for k, qs in splits.items()}
    assert len(positives["random"]) == 1500
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    negatives = {k: [q.text for q in qs if q.label == "no"] for k, qs in splits.items()}
    # pairwise: a chained != never compares random with adversarial
    for a, b in (("random", "popular"), ("random", "adversarial"), ("popular", "adversarial")):
        assert negatives[a] != negatives[b], (a, b)
    # any single split gives the same positives as the three built together
    alone = build_split(objects, "adversarial", n_images=500, seed=11, image_names=names)
    assert alone == splits["adversarial"]


def test_sampler_reads_only_the_lists_it_visits(synthetic):
    """A lazily mined mapping is read for a few more images than sampled, not for all of them."""
    from collections.abc import Mapping

    objects, names = synthetic

    class Counting(Mapping):
        def __init__(self):
            self.read = set()

        def __getitem__(self, k):
            self.read.add(k)
            return objects[k]

        def __iter__(self):
            return iter(objects)

        def __len__(self):
            return len(objects)

    lazy = Counting()
    qs = build_split(lazy, "popular", n_images=50, seed=2, image_names=names)
    assert qs == build_split(objects, "popular", n_images=50, seed=2, image_names=names)
    assert 50 <= len(lazy.read) < 100  # 40 of 600 images have < 3 objects


def test_mined_objects_match_the_full_ground_truth(parser, tiny_coco):
    from lvlm_hallu.eval.chair import MinedObjects, ground_truth_from_coco

    mined = []
    lazy = MinedObjects(load_coco(tiny_coco.instances, "instances"), load_coco(tiny_coco.captions, "captions"),
                        parser, on_mine=mined.append)
    full = ground_truth_from_coco(tiny_coco.instances, tiny_coco.captions, parser=parser)
    assert list(lazy) == [1, 2, 3] and mined == []
    assert lazy[2] == full[2] and lazy[1] == full[1] == {"person", "dog", "dining table"}
    assert mined == [2, 1]
    lazy[1]
    assert mined == [2, 1]  # cached


def test_unparseable_answers_are_counted_and_follow_the_parser(tmp_path):
    q = [PopeQuestion(i + 1, "a.jpg", "?", label) for i, label in enumerate(["yes", "no", "yes", "no", "no"])]
    answers = ["", "I cannot tell.", "Yes", "No, there is not.", "There isn't one."]
    official = score_answers(q, answers)
    assert official.unparseable == 2  # "" and "I cannot tell." say neither yes nor no
    # the official rule reads both as "yes" (TP and FP); "isn't" is not a negation word to it: FP
    assert (official.tp, official.fp, official.tn) == (2, 2, 1)
    assert score_answers(q, answers, parser="opera").tn == 2  # OPERA's rule reads "n't"
    lmms = score_answers(q, answers, parser="lmms-eval")
    assert lmms.unparsed == 4 and lmms.unparseable == 4  # only the exact "Yes" is read


@pytest.mark.parametrize("answer, surface", [
    ("NO", "no"), ("It isn't.", "no"), ("Nope.", "no"), ("No, there is not.", "no"), ("yes", "yes"),
    ("YES, a dog.", "yes"), ("Yes. There is no cat.", None), ("I cannot tell.", None), ("", None),
])
def test_surface_reading(answer, surface):
    assert surface_reading(answer) == surface


def test_answers_read_against_their_surface_are_counted_but_scored_by_the_rule():
    """The confirmed case: "NO" and "It isn't" are yes to the official rule. The scores keep the rule
    (parity with the reference script); the report counts them beside the unparseable ones."""
    labels = ["no", "no", "no", "yes", "no", "yes"]
    answers = ["NO", "It isn't.", "No", "Yes", "I cannot tell.", "Yes. No cat."]
    q = [PopeQuestion(i + 1, "a.jpg", "?", label) for i, label in enumerate(labels)]
    official = score_answers(q, answers)
    # the reference rule: first sentence, exact "No"/"no"/"not" -> no; everything else -> yes
    assert [get_parser("pope")(a) for a in answers] == ["yes", "yes", "no", "yes", "yes", "yes"]
    assert (official.tp, official.fp, official.tn, official.fn) == (2, 3, 1, 0)
    assert official.against_surface == 2 and official.unparseable == 1
    assert official.to_dict()["against_surface"] == 2
    opera = score_answers(q, answers, parser="opera")  # reads "NO" and "n't": nothing against the surface
    assert opera.against_surface == 0 and (opera.tn, opera.fp) == (3, 1)
    assert not read_against_surface("NO", None)  # unparsed answers are counted as unparseable instead


def test_pope_report_counts_answers_read_against_their_surface(tmp_path):
    from lvlm_hallu.eval.compare import PopeTask

    qs = [PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes"),
          PopeQuestion(2, "a.jpg", "Is there a cat in the image?", "no")]
    task = PopeTask({"random": qs}, tmp_path)
    records = {"random/1": {"key": "random/1", "answer": "Yes"}, "random/2": {"key": "random/2", "answer": "NO"}}
    metrics, details = task.score(records)
    assert details["counts"] == {"random unparseable": 0, "random read against surface": 1}
    assert metrics["random Acc"] == 50.0  # "NO" scored as the rule reads it: yes, a false positive


def test_an_empty_question_file_is_an_error(tmp_path):
    empty = tmp_path / "q.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(AnnotationError, match="no questions"):
        read_questions(empty)
