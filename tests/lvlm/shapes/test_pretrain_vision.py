"""Stage 1 of the detailed model: the tower's dense labels, its training, and train.py's use of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from lvlm_hallu.lvlm.shapes import detail, pretrain_vision as pv, train, world

TINY = ["--preset", "tiny", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2", "--threads", "1",
        "--tokenizer-scenes", "200", "--log-every", "1", "--world", "detail"]


def scene_with(*instances) -> world.Scene:
    return world.Scene(image_id=1, background="sky", instances=list(instances))


def test_patch_labels_mark_the_kinds_and_colours_covering_a_quarter_of_a_patch():
    kinds = len(world.CATEGORIES)
    box = detail.DetailInstance("boat", [12.0, 12.0, 12.0, 12.0], 144.0, colour="red")  # patch (1, 1) exactly
    half = detail.DetailInstance("star", [6.0, 36.0, 12.0, 12.0], 144.0, colour="white")  # halves of (3, 0), (3, 1)
    sliver = detail.DetailInstance("key", [84.0, 0.0, 3.0, 12.0], 36.0, colour="gray")  # 3/12 of patch (0, 7)
    thin = detail.DetailInstance("fish", [84.0, 84.0, 2.0, 12.0], 24.0, colour="blue")  # 2/12 of (7, 7): no
    labels = pv.patch_labels(scene_with(box, half, sliver, thin)).reshape(pv.GRID, pv.GRID, -1)
    assert labels.shape == (8, 8, kinds + len(detail.COLOURS))
    on = {(r, c, k) for r, c, k in zip(*np.nonzero(labels))}
    boat, star, key = (world.CATEGORIES.index(k) for k in ("boat", "star", "key"))
    red, white, gray = (kinds + pv.COLOUR_NAMES.index(c) for c in ("red", "white", "gray"))
    assert on == {(1, 1, boat), (1, 1, red), (3, 0, star), (3, 0, white), (3, 1, star), (3, 1, white),
                  (0, 7, key), (0, 7, gray)}


def test_pretraining_lowers_the_loss_and_train_starts_from_its_frozen_tower(tmp_path):
    stage1 = tmp_path / "vision"
    res = pv.pretrain(stage1, steps=6, batch_size=8, lr=3e-3, seed=0, threads=1, preset="tiny", log_every=3)
    log = [json.loads(x) for x in (stage1 / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6] and 0 <= log[-1]["kind_auc"] <= 1
    assert json.loads((stage1 / "spent.json").read_text())["step"] == 6 and res["spent"]["cpu_s"] > 0
    tower = torch.load(stage1 / "vision.pt")

    first = tmp_path / "lm"
    train.train(train.parse_args(["--out", str(first), "--steps", "2", *TINY]))
    second = tmp_path / "joint"
    train.train(train.parse_args(["--out", str(second), "--steps", "2", "--init-from", str(first),
                                  "--vision-from", str(stage1 / "vision.pt"), "--freeze-vision",
                                  "--reset-projector", *TINY]))
    a = LlavaForConditionalGeneration.from_pretrained(first / "model").state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(second / "model").state_dict()
    prefix = "model.vision_tower."
    assert all(torch.equal(b[prefix + k], v) for k, v in tower.items())  # loaded, then frozen
    assert not all(torch.equal(a[prefix + k], v) for k, v in tower.items())
    proj = [k for k in a if "multi_modal_projector" in k]
    assert proj and all(not torch.equal(a[k], b[k]) for k in proj)


def test_earlier_stages_count_against_the_budget(tmp_path):
    earlier = tmp_path / "stage1"
    earlier.mkdir()
    (earlier / "spent.json").write_text(json.dumps({"train_s": 7200.0, "cpu_s": 3600.0, "step": 10}))
    args = ["--out", str(tmp_path / "run"), "--steps", "3", "--budget-hours", "1.5", "--earlier-runs", str(earlier)]
    out = train.train(train.parse_args([*args, "--budget-clock", "wall", *TINY]))
    assert out["stopped"] == "budget" and out["steps"] == 0  # 2 h of wall time already spent
    out = train.train(train.parse_args([*args, "--budget-clock", "cpu", *TINY]))
    assert out["stopped"] is None and out["steps"] == 3  # 1 h of CPU time: half an hour left
    assert train.earlier_spent([earlier, earlier]).cpu_s == 7200.0
    with pytest.raises(FileNotFoundError, match="no spent.json"):
        train.earlier_spent([tmp_path])
