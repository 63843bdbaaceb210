"""The shapes world generator: determinism, COCO validity (pycocotools), split hygiene, priors."""

from __future__ import annotations

import json
import random

import pytest
from pycocotools.coco import COCO

from lvlm_hallu.lvlm.shapes import CATEGORIES, PAIRS, SPLITS, SYNONYMS_PATH, build_split, make_scene, world
from lvlm_hallu.lvlm.shapes.quality import load_synonyms, mentions

N = 12


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    build_split(out, "test", N)
    return out


def test_same_seed_same_bytes(test_split, tmp_path):
    build_split(tmp_path, "test", N)
    for name in ("instances_test.json", "captions_test.json"):
        assert (tmp_path / "annotations" / name).read_bytes() == (test_split / "annotations" / name).read_bytes()
    pngs = sorted(p.name for p in (test_split / "images").iterdir())
    assert len(pngs) == N
    for name in pngs:
        assert (tmp_path / "images" / name).read_bytes() == (test_split / "images" / name).read_bytes()


def test_other_seed_other_images(test_split, tmp_path):
    build_split(tmp_path, "test", 3, seed=123)
    a = sorted((test_split / "images").iterdir())[0].read_bytes()
    b = sorted((tmp_path / "images").iterdir())[0].read_bytes()
    assert a != b


def test_scene_does_not_depend_on_n():
    # Image i is a function of (seed, split, i) only: a bigger --n extends, never reshuffles.
    scene, img = make_scene("val", 5)
    scene2, img2 = make_scene("val", 5)
    assert scene == scene2 and img.tobytes() == img2.tobytes()
    assert scene.image_id == SPLITS["val"][0] + 6


def test_coco_files_load_with_consistent_ids(test_split):
    inst = COCO(str(test_split / "annotations" / "instances_test.json"))
    caps = COCO(str(test_split / "annotations" / "captions_test.json"))
    img_ids = sorted(inst.getImgIds())
    assert img_ids == sorted(caps.getImgIds()) and len(img_ids) == N
    assert all(isinstance(i, int) for i in img_ids)
    cats = inst.loadCats(inst.getCatIds())
    assert [c["name"] for c in sorted(cats, key=lambda c: c["id"])] == CATEGORIES
    anns = inst.loadAnns(inst.getAnnIds())
    assert len({a["id"] for a in anns}) == len(anns)
    for a in anns:
        x, y, w, h = a["bbox"]
        assert a["image_id"] in img_ids and a["category_id"] in inst.getCatIds()
        assert a["iscrowd"] == 0 and w > 0 and h > 0 and 0 < a["area"] <= w * h
        assert 0 <= x and x + w <= world.IMAGE_SIZE and 0 <= y and y + h <= world.IMAGE_SIZE
    for i in img_ids:
        assert len(caps.getAnnIds(imgIds=[i])) == 5


def test_captions_mention_only_present_objects(test_split):
    table = load_synonyms()
    inst = COCO(str(test_split / "annotations" / "instances_test.json"))
    data = json.loads((test_split / "annotations" / "captions_test.json").read_text())
    for c in data["annotations"]:
        present = {inst.cats[a["category_id"]]["name"] for a in inst.imgToAnns[c["image_id"]]}
        assert mentions(c["caption"], table), c
        assert set(mentions(c["caption"], table)) <= present, c


def test_splits_are_disjoint():
    ids = {s: {make_scene(s, i)[0].image_id for i in range(20)} for s in SPLITS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert make_scene("train", 0)[1].tobytes() != make_scene("test", 0)[1].tobytes()


def test_co_occurrence_priors_hold():
    rng = random.Random(0)
    scenes = [{k for k, _ in world.sample_kinds(rng)} for _ in range(3000)]
    for a, b in PAIRS:
        with_a = [s for s in scenes if a in s]
        without_a = [s for s in scenes if a not in s]
        p_b_given_a = sum(b in s for s in with_a) / len(with_a)
        p_b_given_not_a = sum(b in s for s in without_a) / len(without_a)
        assert p_b_given_a > 0.75, (a, b, p_b_given_a)
        assert p_b_given_not_a < 0.25, (a, b, p_b_given_not_a)


def test_partners_are_often_weak_evidence():
    # The temptation to hallucinate: objects that joined through a prior are often small or faint.
    scenes = [make_scene("train", i)[0] for i in range(300)]
    weak = [i.small or i.faint for s in scenes for i in s.instances]
    assert 0.1 < sum(weak) / len(weak) < 0.5


def test_synonym_table_format():
    lines = SYNONYMS_PATH.read_text().splitlines()
    assert [ln.split(", ")[0] for ln in lines] == CATEGORIES
    table = load_synonyms()
    assert table["boxes"] == "box" and table["fish"] == "fish" and table["sailboat"] == "boat"


def test_letterboxed_scene_pads_with_the_clip_mean_colour():
    pad = world.LETTERBOX_PAD
    for i in range(8):
        scene, img = make_scene("val", i, letterbox=1.0)
        assert scene.letterbox and img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
        rows = list(range(pad)) + list(range(world.IMAGE_SIZE - pad, world.IMAGE_SIZE))
        px = img.load()
        assert {px[x, y] for y in rows for x in range(world.IMAGE_SIZE)} == {world.PAD_RGB}
        # The picture itself is not the pad colour everywhere (noise and a gradient).
        assert len({px[x, world.IMAGE_SIZE // 2] for x in range(world.IMAGE_SIZE)}) > 1
        assert scene.instances
        for inst in scene.instances:
            x, y, w, h = inst.bbox
            assert 0 <= x and x + w <= world.IMAGE_SIZE
            assert pad <= y and y + h <= world.IMAGE_SIZE - pad, (i, inst)


def test_letterbox_share_is_deterministic_and_zero_changes_nothing():
    boxed = [make_scene("train", i, letterbox=0.5)[0].letterbox for i in range(200)]
    assert boxed == [make_scene("train", i, letterbox=0.5)[0].letterbox for i in range(200)]
    assert 70 < sum(boxed) < 130
    for i in range(5):
        s0, img0 = make_scene("test", i)
        s1, img1 = make_scene("test", i, letterbox=0.0)
        assert s0 == s1 and not s0.letterbox and img0.tobytes() == img1.tobytes()
    # Unboxed scenes of a letterboxed split are the plain world's scenes.
    for i in [j for j, b in enumerate(boxed[:40]) if not b][:5]:
        assert make_scene("train", i, letterbox=0.5)[1].tobytes() == make_scene("train", i)[1].tobytes()


def test_letterbox_outside_zero_one_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="letterbox"):
        make_scene("val", 0, letterbox=1.5)
    with pytest.raises(SystemExit):
        world.main(["--out", str(tmp_path), "--n", "1", "--letterbox", "-0.1"])
    assert "--letterbox" in capsys.readouterr().err
    assert not (tmp_path / "images").exists()


def test_letterboxed_split_records_its_share(tmp_path):
    inst_path, _ = build_split(tmp_path, "val", 4, letterbox=1.0)
    data = json.loads(inst_path.read_text())
    assert data["info"]["letterbox"] == 1.0
    assert all(a["bbox"][1] >= world.LETTERBOX_PAD for a in data["annotations"])


def test_a_range_of_the_split_is_the_same_scenes_a_larger_split_holds(test_split, tmp_path):
    inst_path, cap_path = build_split(tmp_path, "test", 3, first=N - 3)
    whole, part = COCO(str(test_split / "annotations" / "instances_test.json")), COCO(str(inst_path))
    ids = sorted(part.getImgIds())
    assert ids == sorted(whole.getImgIds())[-3:] == [SPLITS["test"][0] + i + 1 for i in range(N - 3, N)]
    for i in ids:
        name = part.imgs[i]["file_name"]
        assert (tmp_path / "images" / name).read_bytes() == (test_split / "images" / name).read_bytes()
        boxes = lambda c: sorted((a["category_id"], tuple(a["bbox"])) for a in c.loadAnns(c.getAnnIds(imgIds=[i])))
        assert boxes(part) == boxes(whole)
    caps = lambda path: sorted((c["image_id"], c["caption"]) for c in json.loads(path.read_text())["annotations"]
                               if c["image_id"] in ids)
    assert caps(cap_path) == caps(test_split / "annotations" / "captions_test.json")
    with pytest.raises(ValueError, match="first"):
        build_split(tmp_path, "test", 3, first=-1)
    with pytest.raises(SystemExit):
        world.main(["--out", str(tmp_path / "x"), "--first", "-2"])


def test_the_documented_module_command_runs_without_a_runpy_warning(tmp_path):
    """`python -m lvlm_hallu.lvlm.shapes.world` as the model card writes it: the package must not import the
    module first (runpy then warns that running it "may result in unpredictable behaviour")."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "lvlm_hallu.lvlm.shapes.world", "--out", str(tmp_path),
         "--split", "val", "--n", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr
    assert len(list((tmp_path / "images").iterdir())) == 2
