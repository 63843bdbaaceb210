"""Caption metrics beside CHAIR (eval/mentions.py, docs/caption-metrics.md) on hand-counted captions:
repeats told from back-references, count claims, synonyms, plurals, length; their bootstrap in
a comparison; instance counts from COCO files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lvlm_hallu.eval.chair import GroundTruth, ground_truth_from_coco, score_captions
from lvlm_hallu.eval.compare import ChairTask
from lvlm_hallu.eval.mentions import STATS, analyse, instance_counts, introducer, score_mentions, word_count
from lvlm_hallu.eval.significance import paired_bootstrap

DOGS = frozenset({"dog", "person"})  # one person, two dogs
COUNTS = {"dog": 2, "person": 1}


def seen(parser, caption, truth=DOGS, counts=COUNTS):
    return analyse(1, parser.parse(caption), truth, counts)


def reps(parser, caption, truth=DOGS, counts=COUNTS):
    return [(w, c) for w, c, _ in seen(parser, caption, truth, counts).repetitions]


# ---------------------------------------------------------------------------------------------
# Repeats: a new instance (a / an / another / a number) beyond what the image holds


def test_a_second_new_instance_of_a_single_object_is_a_repeat(parser):
    assert reps(parser, "There is a man and a man.") == [("man", "person")]  # one person in the image
    assert reps(parser, "A dog and a dog.") == []  # two dogs: two new instances are right
    assert reps(parser, "A dog, a dog and a dog.") == [("dog", "dog")]  # the third is one too many
    assert reps(parser, "A dog and another dog. Another dog barks.") == [("dog", "dog")]


def test_back_references_are_not_repeats(parser):
    assert reps(parser, "A man with a dog. The man throws a ball to the dog and the dog runs.") == []
    assert reps(parser, "A man. He smiles, the man is happy.") == []
    assert reps(parser, "Two dogs. The dogs play; one dog sleeps.") == [("dog", "dog")]  # "one" is a new instance


def test_modifiers_between_the_article_and_the_object(parser):
    assert reps(parser, "A man, a tall, smiling man and another very old man.") == [("man", "person")] * 2
    assert reps(parser, "A man and a red and white striped man.") == [("man", "person")]
    # "and" between two object words is no adjective coordination: "man" is a bare re-mention
    assert reps(parser, "A man and dog and man.") == []


def test_synonyms_and_plurals_are_one_category(parser):
    # kitten, cat, felines: one category (the synonym table), plural lemmatized
    r = seen(parser, "A kitten next to a cat and two felines.", truth=DOGS)
    assert [(w, c) for w, c, _ in r.repetitions] == [("cat", "cat"), ("feline", "cat")]
    assert (r.hallucinated, r.distinct, r.distinct_hallucinated) == (3, 1, 1)
    assert reps(parser, "A man with a puppy and a terrier.") == []  # two dogs
    assert reps(parser, "A man with puppies and a terrier.") == []  # "puppies": first mention, one or more
    assert reps(parser, "A man with two puppies and a terrier.") == [("terrier", "dog")]


def test_absent_objects_repeat_after_one_mention_and_crowds_never(parser):
    assert reps(parser, "A dog, a car and a car.") == [("car", "car")]
    assert reps(parser, "A dog, a cat and the cat.") == []
    crowd = {"person": None, "dog": 2}
    assert reps(parser, "A man, a woman, a boy and a girl.", counts=crowd) == []
    # no instance counts (a ground truth from captions or a JSON mapping): one instance assumed
    assert reps(parser, "A man and a woman.", counts=None) == [("woman", "person")]


# ---------------------------------------------------------------------------------------------
# Count claims: a number before an object word vs. the image's instances


def test_count_claims_against_instance_counts(parser):
    r = seen(parser, "A man walks two dogs. Later 3 dogs and one man.")
    assert r.count_claims == (("two", "dog", 2, 2), ("3", "dog", 3, 2), ("one", "person", 1, 1))
    assert r.overcounts == 1  # 3 > 2; an understatement (a subset) is no error
    assert seen(parser, "A man with one dog.").overcounts == 0
    assert seen(parser, "Two men and two small, brown dogs.").count_claims == (("two", "dog", 2, 2),)  # "men" is no table word
    assert seen(parser, "Two women.").count_claims == (("two", "person", 2, 1),)  # women -> woman -> person
    # claims about absent objects are hallucinations, and unknown counts are not checked
    assert seen(parser, "Three cats.").count_claims == ()
    assert seen(parser, "Four dogs.", counts={"dog": None}).count_claims == (("four", "dog", 4, None),)
    assert seen(parser, "Four dogs.", counts={"dog": None}).overcounts == 0


def test_introducer_walks_back_over_modifiers_only():
    words = ["a", "big", ",", "red", "ball", "on", "the", "ball", "and", "two", "very", "small", "ball"]
    tags = ["DT", "JJ", ",", "JJ", "NN", "IN", "DT", "NN", "CC", "CD", "RB", "JJ", "NN"]
    mentions = [4, 7, 12]
    assert introducer(words, tags, 4, mentions) == ("a", 1)
    assert introducer(words, tags, 7, mentions) == (None, 0)  # "the"
    assert introducer(words, tags, 12, mentions) == ("two", 2)
    far = ["a", "very", "big", "old", "red", "ball"]  # four modifiers: MAX_MODIFIERS
    assert introducer(far, ["DT", "RB", "JJ", "JJ", "JJ", "NN"], 5, [5]) == ("a", 1)
    farther = ["a", "very", "big", "old", "shiny", "red", "ball"]  # five: another phrase
    assert introducer(farther, ["DT", "RB", "JJ", "JJ", "JJ", "JJ", "NN"], 6, [6]) == (None, 0)


# ---------------------------------------------------------------------------------------------
# Length, and the caption-set metrics


def test_word_count_counts_words_not_punctuation_or_clitics(parser):
    assert word_count(parser.parse("A hot dog.").words) == 3  # CHAIR's Len is 3 tokens: a, hot dog, "."
    assert word_count(parser.parse("The dog's ball, 2 cats!").words) == 5
    assert word_count(parser.parse("It isn't a dog.").words) == 4
    assert word_count(()) == 0


def test_metrics_over_captions_by_hand(parser):
    gt = GroundTruth({1: DOGS, 2: frozenset({"cat"})}, counts={1: COUNTS, 2: {"cat": 1}})
    caps = [
        (1, "A man walks two dogs and a cat."),  # 8 words; cat hallucinated; no repeat
        (2, "A cat and a cat. Two cats and a dog and the dog."),  # 13 words; 2 repeats, overcount, 2 dog mentions
    ]
    result = score_mentions(score_captions(caps, gt, parser), gt, parser)
    first, second = result.captions
    assert (first.hallucinated, first.distinct, first.distinct_hallucinated, first.words) == (1, 3, 1, 8)
    assert (second.hallucinated, second.distinct, second.distinct_hallucinated, second.words) == (2, 2, 1, 13)
    assert [c for _, c, _ in second.repetitions] == ["cat", "cat"] and second.overcounts == 1
    assert result.metrics() == pytest.approx({
        "Halluc/cap": 3 / 2, "CHAIR_i distinct": 100 * 2 / 5, "Repeat %": 50.0, "Overcount %": 50.0,
        "Halluc or repeat %": 100.0, "Words": 21 / 2})
    assert result.totals()["repetitions"] == 2 and result.table().shape == (2, len(STATS))


def test_chair_numbers_are_unchanged_by_the_tags(parser):
    """The parse carries tags now; CHAIR's words and mentions are what they were."""
    parsed = parser.parse("A hot dog and two teddy bears near a toilet seat.")
    assert len(parsed.tags) == len(parsed.words) and parsed.tags[parsed.words.index("hot dog")] == "NN"
    assert list(parsed.categories) == ["hot dog", "teddy bear", "toilet"]
    assert parser.merge_double_words(["hot", "dog", "dog"]) == ["hot dog", "dog"]


# ---------------------------------------------------------------------------------------------
# Instance counts from COCO files; the metrics in a comparison


def test_instance_counts_from_coco_with_crowds(parser, tiny_coco):
    gt = ground_truth_from_coco(tiny_coco.instances, tiny_coco.captions, parser=parser)
    assert gt.counts == {1: {"person": 1, "dog": 2}, 2: {"cat": 1}, 3: {"toilet": 1}}
    data = json.loads(tiny_coco.instances.read_text())
    data["annotations"].append({"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8], "area": 64,
                                "iscrowd": 1})
    tiny_coco.instances.write_text(json.dumps(data))
    from lvlm_hallu.eval.coco import load_coco

    counts = instance_counts(load_coco(tiny_coco.instances), parser.synonyms.to_category, [1])
    assert counts == {1: {"person": None, "dog": 2}}
    assert ground_truth_from_coco(None, tiny_coco.captions, parser=parser).counts is None


def swap_records(n, swapped):
    """n images of one man and one dog; the baseline names an absent cat, the swap a second dog."""
    text = "A man with a dog and a dog." if swapped else "A man with a dog and a cat."
    return {str(i): {"key": str(i), "image_id": i, "answer": text if i % 4 else "A man with a dog."}
            for i in range(1, n + 1)}


def test_a_comparison_sees_the_swap_with_intervals(parser):
    n = 40
    gt = GroundTruth({i: frozenset({"person", "dog"}) for i in range(1, n + 1)},
                     counts={i: {"person": 1, "dog": 1} for i in range(1, n + 1)})
    task = ChairTask({i: f"{i}.jpg" for i in range(1, n + 1)}, gt, parser)
    stats, metrics = [], []
    for swapped in (False, True):
        records = swap_records(n, swapped)
        m, details = task.score(records)
        metrics.append(m)
        stats.append(task.unit_stats(records, details))
        assert stats[-1].point() == pytest.approx(m)  # the bootstrap's sums give the scorer's numbers
    assert metrics[0]["CHAIR_s"] == 75.0 and metrics[1]["CHAIR_s"] == 0.0
    assert metrics[0]["Repeat %"] == 0.0 and metrics[1]["Repeat %"] == 75.0
    found = paired_bootstrap(stats[0], stats[1], resamples=400, seed=0)
    assert found["CHAIR_s"].high < 0 and found["Repeat %"].low > 0 and found["Repeat %"].diff == 75.0
    assert found["Words"].diff == 0.0 and found["Halluc or repeat %"].diff == 0.0
    same = paired_bootstrap(stats[1], stats[1], resamples=400)
    assert all((iv.low, iv.high) == (0.0, 0.0) for iv in same.values())
    assert np.isfinite([iv.diff for iv in found.values()]).all()
