"""Measurements along the answer: hallucination by relative position (hand-counted captions) and
image attention per answer token (equal to what generate computed at each step)."""

from __future__ import annotations

import pytest
import torch

from lvlm_hallu.lvlm.shapes import detail, positions
from lvlm_hallu.lvlm.shapes import model as M
from lvlm_hallu.lvlm.shapes.quality import load_synonyms


@pytest.fixture(scope="module")
def tiny():
    processor = M.build_processor(M.build_tokenizer(n_scenes=60, world_name="detail"))
    torch.manual_seed(0)
    model = M.build_model(M.Preset.from_name("tiny"), processor.tokenizer)
    model.set_attn_implementation("eager")
    return model.eval(), processor


def test_objects_are_placed_at_their_relative_position_and_counted_once_when_first():
    table = load_synonyms()
    caption = "There is a red ball. The ball is next to a cloud."  # 12 words; ball at 4 and 6, cloud at 11
    assert positions.introduced(caption, table) == [(4 / 12, "ball", True), (6 / 12, "ball", False),
                                                     (11 / 12, "cloud", True)]
    records = [(caption, {"ball"}), ("Two boxes and two trees.", {"box"}),  # 5 words: boxes 1, trees 4
               ("A house and a tree.", {"tree"})]  # 5 words: house 1 (absent partner of the tree), tree 4
    out = positions.by_position(records, table, bins=2)
    assert [(r["objects"], r["hallucinated"], r["partners"]) for r in out["first_mentions"]] == [(3, 1, 1), (3, 2, 0)]
    assert [(r["objects"], r["hallucinated"]) for r in out["all_mentions"]] == [(3, 1), (4, 2)]
    assert out["first_mentions"][1]["rate"] == pytest.approx(2 / 3, abs=1e-4) and out["first_mentions"][0]["bin"] == "0.00-0.50"


def test_token_words_follow_the_words_of_the_answer(tiny):
    _, processor = tiny
    ids = processor.tokenizer(" The small red ball, a tree.</s>", add_special_tokens=False)["input_ids"]
    words = positions._word_of_tokens(processor, ids)
    tokens = [processor.tokenizer.decode([t]) for t in ids]
    assert [w for w, tok in zip(words, tokens) if tok.strip() in ("ball", "tree")] == [3, 5]
    assert words[tokens.index(",")] == -1 and words[-1] == -1


def test_image_attention_is_what_generate_attended_at_each_step(tiny):
    model, processor = tiny
    _, image = detail.make_scene("test", 0)
    prompt = positions.PROMPT
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                             output_attentions=True, return_dict_in_generate=True)
    answer = gen.sequences[0, batch["input_ids"].shape[1]:].tolist()
    got = positions.image_attention(model, processor, image, prompt, answer)  # (layers, 6)
    image_keys = batch["input_ids"][0] == model.config.image_token_id
    assert got.shape == (model.config.text_config.num_hidden_layers, 6)
    for t, step in enumerate(gen.attentions):  # step t: the query that produced answer token t
        for layer, att in enumerate(step):
            row = att[0, :, -1, : image_keys.shape[0]]  # (heads, prompt keys)
            assert got[layer, t] == pytest.approx(row[:, image_keys].sum(-1).mean().item(), abs=1e-5)
    assert 0.0 < got.min() and got.max() < 1.0


def test_measure_counts_every_answer_token_and_plots(tiny, tmp_path):
    model, processor = tiny
    res = positions.measure(model, processor, n=2, bins=4, max_new_tokens=24)
    att = res["image_attention_by_position"]
    assert sum(att["tokens"]) == res["answer_tokens"] and 2 <= res["answer_tokens"] <= 48
    assert len(att["per_layer"]) == model.config.text_config.num_hidden_layers and len(att["uniform"]) == 4
    # the uniform reference falls along the answer: each token adds a key
    assert att["uniform"] == sorted(att["uniform"], reverse=True) and att["uniform"][0] < 1
    positions.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
