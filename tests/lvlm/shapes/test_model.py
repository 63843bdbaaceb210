"""The shipped shapes model: offline round trip, LLaVA-1.5 prompt format, and caption quality.

Recall threshold: docs/shapes-model.md reports caption object recall on 2,000 held-out test
images; the test uses the first 16 test images with a margin below the reported number.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor
from typer.testing import CliRunner

from lvlm_hallu.lvlm.shapes import MODEL_DIR, PARTNER, CATEGORIES, make_scene
from lvlm_hallu.lvlm.shapes.quality import DESCRIBE, caption_metrics, generate, load_synonyms
from lvlm_hallu.lvlm.shapes.text import POPE_SUFFIX, question
from lvlm_hallu.cli import app

MIN_RECALL = 0.55  # model card: 68.5 on 2,000 test images (77 on these 16); margin for other CPUs
MAX_FILES_MB = 64  # issue #10: the embedded model ships in at most 64 MB


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(MODEL_DIR, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    return processor, model


def test_files_are_small_and_complete():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < MAX_FILES_MB * 2**20


def test_processor_round_trip(shipped):
    processor, model = shipped
    assert isinstance(processor, LlavaProcessor)
    tok = processor.tokenizer
    assert tok.padding_side == "left" and tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE}]}],
        add_generation_prompt=True)
    assert prompt == "USER: <image>\nDescribe this image. ASSISTANT:"
    batch = processor(text=[prompt], images=[make_scene("test", 0)[1]], return_tensors="pt")
    n_image = (batch["input_ids"] == model.config.image_token_id).sum().item()
    assert n_image == model.config.image_seq_length == 64
    assert batch["pixel_values"].shape == (1, 3, 96, 96)
    assert tok.decode(tok(" There are two trees.", add_special_tokens=False)["input_ids"]) == " There are two trees."


def test_greedy_captions_recall_objects(shipped):
    processor, model = shipped
    scenes = [make_scene("test", i) for i in range(16)]
    caps = generate(model, processor, [img for _, img in scenes], [DESCRIBE] * len(scenes))
    gt = {s.image_id: set(s.counts()) for s, _ in scenes}
    m = caption_metrics({s.image_id: c for (s, _), c in zip(scenes, caps)}, gt, load_synonyms())
    assert all(c.startswith("There") and c.endswith(".") for c in caps), caps
    assert m["recall"] >= MIN_RECALL, (m, caps)


def test_yes_no_answers(shipped):
    processor, model = shipped
    scene, img = make_scene("test", 1)
    present = sorted(scene.counts())[0]
    answers = generate(model, processor, [img], [f"Is there a {present} in the image?"], max_new_tokens=4)
    assert answers[0] in {"Yes", "No"}


def test_absent_partners_are_hallucinated_more_often(shipped):
    # The point of the embedded model: it says "yes" to an absent co-occurrence partner (sun ->
    # cloud) far more often than to an unrelated absent object (model card: 70% vs 13%).
    processor, model = shipped
    partner, other = [], []
    for i in range(120):
        scene, img = make_scene("test", i)
        present = set(scene.counts())
        partners = {PARTNER[k] for k in present if k in PARTNER} - present
        partner += [(img, k) for k in sorted(partners)]
        unrelated = [k for k in CATEGORIES if k not in present and k not in partners]
        other.append((img, unrelated[i % len(unrelated)]))
    asked = partner + other
    answers = generate(model, processor, [a[0] for a in asked],
                       [question(a[1]) + POPE_SUFFIX for a in asked], max_new_tokens=3, batch_size=32)
    yes = [a.startswith("Yes") for a in answers]
    rate_partner = sum(yes[: len(partner)]) / len(partner)
    rate_other = sum(yes[len(partner):]) / len(other)
    assert rate_partner > rate_other + 0.2, (rate_partner, rate_other)


def test_profile_finds_the_bos_sink_dimension_by_itself(tmp_path, monkeypatch):
    # Issue #10: `lvlm profile --model shapes --json` discovers a massive-activation dimension on
    # the shipped model (no published value for this backbone, none set by hand). Model card:
    # dimension 194, phi up to 7.2 on BOS against the scaled threshold 5.0; no visual sink.
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    res = CliRunner().invoke(app, ["profile", "--model", "shapes", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["sink_dims"] and data["sink_dims_source"] == "calibrated", data
    assert data["tau"] == 5.0 and data["tau_source"] == "scaled"
    assert all(data["sink_dim_magnitude"][str(d)] > data["tau"] for d in data["sink_dims"])
    assert all(n >= 1 for n in data["sink_counts"].values())  # BOS at least, in every VAR layer
