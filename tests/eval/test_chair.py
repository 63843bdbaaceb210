"""CHAIR: every rule of docs/eval.md on hand-built captions, plus ground truth from COCO files."""

from __future__ import annotations

import json

import pytest

from lvlm_hallu.eval.chair import (
    DEFAULT_DOUBLE_WORDS,
    CaptionParser,
    GroundTruth,
    SynonymTable,
    drop_incomplete_sentence,
    ground_truth_from_coco,
    ground_truth_from_json,
    load_synonyms,
    read_captions,
    score_captions,
)
from lvlm_hallu.eval.errors import ImageIdError, NLTKDataError


def cats(parser, caption):
    return list(parser.parse(caption).categories)


# ---------------------------------------------------------------------------------------------
# Caption -> objects


def test_every_occurrence_is_a_mention(parser):
    assert cats(parser, "There is a dog and another dog.") == ["dog", "dog"]


def test_double_words(parser):
    parsed = parser.parse("A hot dog, a teddy bear and train tracks.")
    assert list(parsed.categories) == ["hot dog", "teddy bear"]  # no dog, no bear, no train
    assert "train track" in parsed.words
    assert cats(parser, "A baby elephant.") == ["elephant"]  # not a person ("baby" is a person word)
    assert cats(parser, "An adult giraffe.") == ["giraffe"]
    assert cats(parser, "A passenger train.") == ["train"]
    assert cats(parser, "A man in a bow tie.") == ["person", "tie"]


def test_double_word_merge_is_greedy_left_to_right(parser):
    assert parser.merge_double_words(["hot", "dog", "dog"]) == ["hot dog", "dog"]
    assert parser.merge_double_words(["baby", "hot", "dog"]) == ["baby", "hot dog"]


def test_toilet_rule(parser):
    assert cats(parser, "A toilet with the seat up next to a chair.") == ["toilet", "chair"]
    assert cats(parser, "An empty seat.") == ["chair"]
    assert cats(parser, "A toilet seat.") == ["toilet"]


def test_lemmatizer_consequences(parser):
    assert cats(parser, "Two men.") == []  # "men" stays "men": not a person
    assert cats(parser, "Two women.") == ["person"]  # women -> woman
    assert cats(parser, "Three children.") == ["person"]
    assert cats(parser, "A man is skiing.") == ["person", "skis"]  # VBG skiing -> ski
    assert cats(parser, "People are seated.") == ["person", "chair"]  # seated -> seat
    assert cats(parser, "The horse is tied to a post.") == ["horse", "tie"]  # tied -> tie
    assert cats(parser, "Two wine glasses.") == ["wine glass"]


def test_synonym_table_artifacts_are_kept(parser):
    table = load_synonyms()
    assert len(table.categories) == 80
    assert table.to_category[" motor bike"] == "motorcycle"  # leading space from a double space
    assert table.to_category[" cheesecake"] == "cake"
    assert "iPhone" in table.to_category
    assert cats(parser, "A motor bike, a cheesecake and an iPhone.") == []
    assert cats(parser, "A motorbike and a cupcake and a smartphone.") == ["motorcycle", "cake", "cell phone"]


def test_injected_tables_for_another_world():
    table = SynonymTable.from_lines(["square, box, block", "circle, ring", "triangle"], "shapes")
    shapes = CaptionParser(table, double_words={"red box": "square", "ring box": "ring box"})
    assert list(shapes.parse("A red box, a ring and a ring box.").categories) == ["square", "circle"]
    assert "dog" not in shapes.synonyms
    assert DEFAULT_DOUBLE_WORDS["hot dog"] == "hot dog"


def test_missing_nltk_data_is_a_typed_error(monkeypatch, tmp_path):
    import nltk

    from lvlm_hallu.eval import nltk_data

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk_data, "shared_dir", lambda: tmp_path / "no-shared")
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LVLM_NLTK_DOWNLOAD", "0")  # no network in this test: eval/nltk_data.py's tests cover it
    with pytest.raises(NLTKDataError, match="nltk.downloader -d .* punkt_tab averaged_perceptron_tagger_eng wordnet"):
        CaptionParser()


# ---------------------------------------------------------------------------------------------
# Scores


def test_scores_by_hand(parser):
    gt = GroundTruth({1: frozenset({"dog", "person"}), 2: frozenset({"cat", "tv"})})
    caps = [
        (1, "A man walks a dog. Another dog runs."),  # 10 tokens; person, dog, dog; none hallucinated
        (2, "A cat on a couch."),  # 6 tokens; cat, couch; couch hallucinated
    ]
    r = score_captions(caps, gt, parser)
    assert (r.n_mentions, r.n_hallucinated_mentions) == (5, 1)
    assert r.chair_i == pytest.approx(1 / 5)  # ratio of sums; the mean of ratios would be 0.25
    assert r.chair_s == pytest.approx(1 / 2)
    assert r.recall == pytest.approx(3 / 4)  # {person, dog} + {cat} over |GT| = 2 + 2
    assert r.length == pytest.approx((10 + 6) / 2)
    assert r.metrics() == pytest.approx({"CHAIR_s": 50.0, "CHAIR_i": 20.0, "Recall": 75.0, "Len": 8.0})
    first, second = r.captions
    assert first.mentioned == (("man", "person"), ("dog", "dog"), ("dog", "dog"))
    assert second.hallucinated == (("couch", "couch"),)
    assert second.gt == ("cat", "tv") and second.recalled == ("cat",)
    assert r.most_hallucinated == (("couch", 1),)


def test_an_empty_caption_counts_in_every_per_caption_denominator(parser):
    """An empty answer is a caption with no hallucination: CHAIR_s and Len divide by all captions
    (skipping it would turn 1/3 into 1/2), CHAIR_i and Recall are unchanged by it except for the
    empty caption's own ground truth, which Recall still owes."""
    gt = GroundTruth({1: frozenset({"dog"}), 2: frozenset({"cat"}), 3: frozenset({"tv"})})
    caps = [(1, "A dog and a cat."), (2, "A cat."), (3, "")]  # 6, 3 and 0 tokens; one hallucinated cat
    r = score_captions(caps, gt, parser)
    assert (r.n_captions, r.n_hallucinated_captions) == (3, 1)
    assert r.chair_s == pytest.approx(1 / 3)
    assert r.length == pytest.approx((6 + 3 + 0) / 3)
    assert r.chair_i == pytest.approx(1 / 3)  # dog, cat | cat: one of three mentions
    assert r.recall == pytest.approx(2 / 3)  # dog and cat recalled, tv of the empty caption not
    assert r.captions[2].words == () and r.captions[2].mentioned == ()
    # the short-caption protocol can empty a caption too: it still counts
    short = score_captions([(1, "A cat"), (2, "A cat.")], gt, parser, short_caption=True)
    assert short.n_captions == 2 and short.captions[0].caption == ""
    assert short.chair_s == pytest.approx(0.0) and short.length == pytest.approx((0 + 3) / 2)


def test_len_counts_tokens_after_the_merge(parser):
    gt = GroundTruth({1: frozenset({"hot dog"})})
    r = score_captions([(1, "A hot dog.")], gt, parser)
    assert r.captions[0].words == ("a", "hot dog", ".")
    assert r.length == 3 and r.chair_i == 0 and r.recall == 1


def test_two_hallucinated_mentions_of_one_category(parser):
    gt = GroundTruth({7: frozenset({"person"})})
    r = score_captions([(7, "A dog and a dog and a man.")], gt, parser)
    assert r.n_hallucinated_mentions == 2 and r.chair_i == pytest.approx(2 / 3)
    assert r.most_hallucinated == (("dog", 2),)


def test_short_caption_protocol(parser):
    assert drop_incomplete_sentence("A dog sits. A cat on the") == "A dog sits."
    assert drop_incomplete_sentence("A dog sits.") == "A dog sits."
    assert drop_incomplete_sentence("A cat on the") == ""
    gt = GroundTruth({1: frozenset({"dog"})})
    text = "A dog sits. A cat on the"
    assert score_captions([(1, text)], gt, parser).chair_s == 1.0  # off by default
    short = score_captions([(1, text)], gt, parser, short_caption=True)
    assert short.chair_s == 0.0 and short.short_caption and short.captions[0].caption == "A dog sits."


def test_string_and_unknown_image_ids_are_rejected(parser, tmp_path):
    gt = GroundTruth({226988: frozenset({"dog"})})
    with pytest.raises(ImageIdError, match="not an integer"):
        score_captions([("226988", "A dog.")], gt, parser)
    with pytest.raises(ImageIdError, match="not in the ground truth"):
        score_captions([(5, "A dog.")], gt, parser)
    path = tmp_path / "caps.jsonl"
    path.write_text(json.dumps({"image_id": "226988", "caption": "A dog."}) + "\n")
    with pytest.raises(ImageIdError):
        read_captions(path)
    path.write_text(json.dumps({"image_id": 226988, "caption": "A dog."}) + "\n")
    assert score_captions(read_captions(path), gt, parser).chair_s == 0.0


# ---------------------------------------------------------------------------------------------
# Ground truth


def test_ground_truth_from_coco_instances_and_captions(parser, tiny_coco):
    gt = ground_truth_from_coco(tiny_coco.instances, tiny_coco.captions, parser=parser)
    assert gt[1] == {"person", "dog", "dining table"}  # table comes from a human caption
    assert gt[2] == {"cat"}  # "kitten" -> cat
    assert gt[3] == {"toilet"}  # "seat" dropped by the toilet rule
    only_instances = ground_truth_from_coco(tiny_coco.instances, parser=parser)
    assert only_instances[1] == {"person", "dog"}
    with pytest.raises(ImageIdError):
        gt[99]
    with pytest.raises(ImageIdError):
        gt["1"]
    subset = ground_truth_from_coco(tiny_coco.instances, tiny_coco.captions, parser=parser, image_ids=[2])
    assert set(subset.objects) == {2}
    with pytest.raises(ImageIdError):
        ground_truth_from_coco(tiny_coco.instances, tiny_coco.captions, parser=parser, image_ids=[42])


def test_ground_truth_json_roundtrip(parser, tiny_coco, tmp_path):
    gt = ground_truth_from_coco(tiny_coco.instances, tiny_coco.captions, parser=parser)
    path = tmp_path / "gt.json"
    gt.save(path)
    again = ground_truth_from_json(path)
    assert dict(again.objects) == dict(gt.objects)
    r = score_captions([(1, "A man with a dog and a cat.")], again, parser)
    assert r.captions[0].hallucinated == (("cat", "cat"),)
