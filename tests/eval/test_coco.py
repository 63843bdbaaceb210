"""COCO loading (pycocotools), seeded sampling, image-id validation, image lists."""

from __future__ import annotations

import pytest

from lvlm_hallu.eval.coco import (
    captions_by_image,
    image_file_names,
    image_ids,
    image_ids_hash,
    instance_categories,
    load_coco,
    read_image_list,
    resolve_annotation_paths,
    sample_image_ids,
    validate_image_ids,
    write_image_list,
)
from lvlm_hallu.eval.errors import AnnotationError, ImageIdError


def test_load_instances_and_captions(tiny_coco):
    inst = load_coco(tiny_coco.instances)
    caps = load_coco(tiny_coco.captions)
    assert image_ids(inst) == [1, 2, 3]
    assert image_file_names(inst)[2] == "COCO_val2014_000000000002.jpg"
    cats = instance_categories(inst)
    assert cats == {1: ["person", "dog", "dog"], 2: ["cat"], 3: ["toilet"]}
    # parity with pycocotools' own index
    for imid, names in cats.items():
        anns = inst.loadAnns(inst.getAnnIds(imgIds=[imid]))
        assert sorted(names) == sorted(inst.loadCats([a["category_id"]])[0]["name"] for a in anns)
    assert captions_by_image(caps)[1] == ["A man and his dog sit at a table.", "Two dogs near a person."]
    with pytest.raises(AnnotationError):
        load_coco(tiny_coco.root / "missing.json")


def test_seeded_sampling():
    ids = list(range(1000, 1100))
    a = sample_image_ids(ids, 10, seed=0)
    assert a == sample_image_ids(list(reversed(ids)), 10, seed=0)  # file order does not matter
    assert a != sample_image_ids(ids, 10, seed=1)
    assert len(set(a)) == 10 and set(a) <= set(ids)
    with pytest.raises(AnnotationError):
        sample_image_ids(ids, 101, seed=0)


def test_validate_image_ids():
    known = {1: "a", 2: "b"}
    assert validate_image_ids([2, 1], known) == [2, 1]
    with pytest.raises(ImageIdError, match="not an integer"):
        validate_image_ids(["1"], known)
    with pytest.raises(ImageIdError):
        validate_image_ids([True], known)
    with pytest.raises(ImageIdError, match="not in the ground truth: 3"):
        validate_image_ids([1, 3], known)


def test_image_lists_and_hash(tmp_path):
    path = tmp_path / "ids.txt"
    write_image_list(path, [5, 3, 9])
    assert read_image_list(path) == [5, 3, 9]
    (tmp_path / "ids.json").write_text("[5, 3]")
    assert read_image_list(tmp_path / "ids.json") == [5, 3]
    (tmp_path / "bad.json").write_text('["5"]')
    with pytest.raises(ImageIdError):
        read_image_list(tmp_path / "bad.json")
    assert image_ids_hash([3, 5]) == image_ids_hash([5, 3]) != image_ids_hash([3, 6])


def test_resolve_annotation_paths(tiny_coco):
    inst, caps = resolve_annotation_paths(tiny_coco.root, None, None)
    assert (inst, caps) == (tiny_coco.instances, tiny_coco.captions)
    inst, caps = resolve_annotation_paths(tiny_coco.root, None, "/x/caps.json")
    assert str(caps) == "/x/caps.json"
