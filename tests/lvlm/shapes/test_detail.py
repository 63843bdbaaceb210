"""The detailed shapes world: determinism, COCO files, priors, and a caption grammar that states
every attribute the world draws (colour, size, position, count) within 40-120 words."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from pycocotools.coco import COCO

from lvlm_hallu.lvlm.shapes import detail, detail_text, text, world
from lvlm_hallu.lvlm.shapes.quality import load_synonyms, mentions

N_SCENES = 400  # about 2 s of drawing


@pytest.fixture(scope="module")
def scenes():
    return [detail.make_scene("train", i)[0] for i in range(N_SCENES)]


def _sentences(caption: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s", caption) if s.strip()]


def test_scene_is_a_function_of_seed_split_and_index():
    a, img_a = detail.make_scene("test", 7)
    b, img_b = detail.make_scene("test", 7)
    c, img_c = detail.make_scene("test", 7, seed=5)
    assert a == b and img_a.tobytes() == img_b.tobytes()
    assert img_a.tobytes() != img_c.tobytes()
    assert a.image_id == world.SPLITS["test"][0] + 8
    assert detail_text.describe(a) == detail_text.describe(b)
    # Its own stream: not the basic world's scene 7.
    assert [i.kind for i in a.instances] != [i.kind for i in world.make_scene("test", 7)[0].instances]


def test_caption_length_is_40_to_120_words_and_long_on_average(scenes):
    lengths = [len(detail_text.describe(s).split()) for s in scenes]
    assert min(lengths) >= detail_text.MIN_WORDS == 40
    assert max(lengths) <= detail_text.MAX_WORDS == 120
    assert 75 <= sum(lengths) / len(lengths) <= 100  # LLaVA's detailed answers run 80-120 words
    assert sum(n > 100 for n in lengths) > len(lengths) // 10


def test_every_object_is_stated_with_its_colour_size_position_and_count(scenes):
    for scene in scenes:
        caption = detail_text.describe(scene)
        groups: dict[str, list] = {}
        for inst in scene.instances:
            groups.setdefault(inst.kind, []).append(inst)
        assert f"a {scene.background} background" in caption
        sentences = _sentences(caption)
        for kind, insts in groups.items():
            first = next(s for s in sentences if re.search(rf"\b({kind}|{text.plural(kind)})\b", s))
            n = len(insts)
            noun = text.plural(kind) if n > 1 else kind
            if n > 1:  # the first mention carries the total count
                assert re.search(rf"\b{detail_text.NUMBERS[n]} (\w+ )?{noun}\b", first), (first, n)
            else:
                assert re.search(rf"\ban? (small |large )?\w+ {kind}\b", first), first
            for inst in insts:
                assert inst.colour in first and detail_text.position(inst) in first, (first, inst)
            sizes = Counter(i.size for i in insts)
            for size in ("small", "large"):
                assert len(re.findall(rf"\b{size}\b", first)) == sizes[size], (first, sizes)


def test_every_drawn_attribute_value_occurs_and_is_named(scenes):
    pairs = Counter((i.kind, i.colour) for s in scenes for i in s.instances)
    assert set(pairs) == {(k, c) for k, cs in detail.KIND_COLOURS.items() for c in cs}
    assert {i.size for s in scenes for i in s.instances} == {"small", "medium", "large"}
    said = " ".join(detail_text.describe(s) for s in scenes[:200])
    for words in [*detail.COLOURS, *world.BACKGROUNDS, "small", "large",
                  *(p for row in detail_text.GRID for p in row), "above", "below", "to the left of",
                  "to the right of", *(t for _, t in detail_text.THEMES)]:
        assert words in said, words
    counts = Counter(len(s.instances) for s in scenes)
    assert max(counts) == detail.MAX_INSTANCES and sum(len(s.counts()) for s in scenes) / len(scenes) > 3.5


def test_descriptions_name_only_present_objects_and_each_kind_once_as_new(scenes):
    table = load_synonyms()
    for scene in scenes[:200]:
        caption = detail_text.describe(scene)
        present = set(scene.counts())
        assert set(mentions(caption, table)) == present
        for kind in present:  # later mentions are definite ("the trees"), never a new instance
            noun = rf"({kind}|{text.plural(kind)})"
            new = re.findall(rf"\b(an?|one|two|three|four|five) ((small|large|{'|'.join(detail.COLOURS)}) )*{noun}\b",
                             caption)
            assert len(new) == 1, (caption, kind)


def test_co_occurrence_priors_hold(scenes):
    for a, b in world.PAIRS:
        with_a = [s for s in scenes if a in s.counts()]
        without = [s for s in scenes if a not in s.counts()]
        p_with = sum(b in s.counts() for s in with_a) / len(with_a)
        p_without = sum(b in s.counts() for s in without) / len(without)
        assert p_with > 0.75 and p_without < 0.3, (a, b, p_with, p_without)
    # Partners are weak evidence more often: small ones make up a larger share among them.
    partners = [i for s in scenes for i in s.instances if i.kind in world.PARTNER]
    assert 0.1 < sum(i.small for i in partners) / len(partners) < 0.4


def test_coco_files_hold_counts_and_attributes(tmp_path):
    inst_path, cap_path = detail.build_split(tmp_path, "val", 6, first=10)
    coco = COCO(str(inst_path))
    caps = COCO(str(cap_path))
    assert sorted(coco.getImgIds()) == sorted(caps.getImgIds()) == [world.SPLITS["val"][0] + 11 + i for i in range(6)]
    assert coco.dataset["info"]["description"].startswith(world.DESCRIPTION_PREFIX)
    for k in range(6):
        scene, _ = detail.make_scene("val", 10 + k)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[scene.image_id]))
        names = Counter(coco.loadCats([a["category_id"]])[0]["name"] for a in anns)
        assert names == Counter(scene.counts())
        assert [a["colour"] for a in anns] == [i.colour for i in scene.instances]
        texts = [c["caption"] for c in caps.loadAnns(caps.getAnnIds(imgIds=[scene.image_id]))]
        assert len(texts) == 5 and texts[0] == detail_text.describe(scene)
    again = tmp_path / "again"
    detail.build_split(again, "val", 6, first=10)
    assert (again / "annotations" / "instances_val.json").read_bytes() == inst_path.read_bytes()


def test_evaluation_generates_and_caches_the_detailed_split(tmp_path, monkeypatch):
    from lvlm_hallu.eval.datasets import synonyms_for
    from lvlm_hallu.eval.world import shapes_world

    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    w = shapes_world(5, detailed=True)
    assert w.size == 200 and w.root.name == "detail-test-seed2-n200" and w.detailed
    assert w.describe()["generated"] == "detailed shapes world, test split"
    coco = COCO(str(w.instances))
    scene, _ = detail.make_scene("test", 3)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[scene.image_id]))
    assert [a["colour"] for a in anns] == [i.colour for i in scene.instances]
    assert synonyms_for(None, coco) == w.synonyms  # the shapes table, read from info.description
    assert shapes_world(5).root.name == "test-seed2-n200"  # the basic world beside it
