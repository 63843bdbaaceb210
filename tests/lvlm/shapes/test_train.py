"""The training script: a few steps of the tiny preset lower the loss, and a resume continues."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from lvlm_hallu.lvlm.shapes import train, world

TINY = ["--preset", "tiny", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2", "--threads", "1",
        "--tokenizer-scenes", "200", "--log-every", "1"]


def test_collate_puts_labels_on_the_answer_only():
    processor = LlavaProcessor.from_pretrained(str(_shipped()))
    examples = [train.make_example(i) for i in range(4)]
    batch = train.collate(processor, examples)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ((ids == processor.image_token_id).sum(1) == 64).all()  # 8x8 patches, CLS dropped
    for row, lab, (_, _, answer, _) in zip(ids, labels, examples):
        kept = row[lab != train.IGNORE]
        assert processor.tokenizer.decode(kept) == " " + answer + "</s>"
    # The probe's targets are the scene's objects.
    for objs, (_, _, _, present) in zip(batch["objects"], examples):
        assert objs.sum().item() == len(present) > 0


def test_rows_without_image_match_the_twin_prompt_and_carry_no_pixels():
    processor = LlavaProcessor.from_pretrained(str(_shipped()))
    examples = [train.make_example(i, text_share=0.5) for i in range(40)]
    plain = [i for i, e in enumerate(examples) if e[0] is None and e[1] is None]
    chat = [i for i, e in enumerate(examples) if e[0] is None and e[1] is not None]
    with_image = [i for i, e in enumerate(examples) if e[0] is not None]
    assert plain and chat and with_image
    batch = train.collate(processor, examples)
    assert batch["pixel_values"].shape[0] == batch["objects"].shape[0] == len(with_image)
    ids, labels, tok = batch["input_ids"], batch["labels"], processor.tokenizer
    assert ((ids[with_image] == processor.image_token_id).sum(1) == 64).all()
    assert (ids[plain + chat] == processor.image_token_id).sum() == 0
    for i in plain:  # plain text: the loss on every token after the BOS
        text = examples[i][2]
        assert tok.decode(ids[i][labels[i] != train.IGNORE]) == text + "</s>"
        assert ids[i][0] == tok.bos_token_id and text.count(".") >= train.TEXT_SCENES
    for i in chat:  # the same text as an image-removed twin's prompt, as the processor renders it
        _, prompt, answer, _ = examples[i]
        twin = processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        head = tok(twin)["input_ids"]
        assert ids[i][: len(head)].tolist() == head
        assert tok.decode(ids[i][labels[i] != train.IGNORE]) == " " + answer + "</s>"
    # The share only replaces rows: an image row is the same example with or without it.
    assert [train.make_example(i)[2] for i in with_image[:3]] == [examples[i][2] for i in with_image[:3]]


def test_loss_decreases_and_resume_continues(tmp_path):
    out = train.train(train.parse_args(["--out", str(tmp_path), "--steps", "12", "--ckpt-every", "6",
                                        "--text-share", "0.25", *TINY]))
    losses = out["losses"]
    assert out["start_step"] == 0 and len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").config.image_token_id == 4

    again = train.train(train.parse_args(["--out", str(tmp_path), "--steps", "15", "--resume",
                                          "--text-share", "0.25", *TINY]))
    assert again["start_step"] == 12 and len(again["losses"]) == 3
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 16))


def _shipped():
    from lvlm_hallu.lvlm.shapes import MODEL_DIR

    return MODEL_DIR


def test_no_decay_1d_exempts_norm_gains_and_biases_only():
    import torch

    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    params = list(layer.parameters())
    assert train.param_groups(params, 0.1, decay_1d=True) == [{"params": params, "weight_decay": 0.1}]
    decayed, exempt = train.param_groups(params, 0.1, decay_1d=False)
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(3, 4)]
    assert exempt["weight_decay"] == 0.0 and [p.shape for p in exempt["params"]] == [(3,), (3,), (3,)]
    args = train.parse_args(["--out", "x", "--no-decay-1d", "--text-scenes", "12"])
    assert args.decay_1d is False and args.text_scenes == 12


def test_text_scenes_sets_the_length_of_plain_text_rows():
    short = [train.make_example(i, 1.0, 2) for i in range(30)]
    long = [train.make_example(i, 1.0, 12) for i in range(30)]
    plain = [i for i, e in enumerate(short) if e[1] is None]
    assert plain and all(long[i][1] is None for i in plain)
    assert all(short[i][2].count(".") == 2 and long[i][2].count(".") == 12 for i in plain)


def test_backcopy_rows_copy_the_word_before_each_trigger_and_leave_other_rows_alone():
    import random

    from lvlm_hallu.lvlm.shapes import text

    words = text.backcopy_text(random.Random(3), n_words=400).split()
    assert len(words) == 400
    triggers = [i for i, w in enumerate(words[:-1]) if w in text.BACKCOPY_TRIGGERS]
    assert 30 < len(triggers) < 90  # ~15% of the ordinary words are followed by a trigger
    assert all(i > 0 and words[i + 1] == words[i - 1] for i in triggers)
    bigrams = text._backcopy_bigrams()
    for a, b in zip(words, words[1:]):  # every other step follows the fixed bigram model
        if a not in text.BACKCOPY_TRIGGERS and b not in text.BACKCOPY_TRIGGERS:
            assert b in bigrams[a][0]
    mixed = [train.make_example(i, 0.25, 6, backcopy=0.4) for i in range(300)]
    plain = [train.make_example(i, 0.25, 6) for i in range(300)]
    copied = [i for i, e in enumerate(mixed) if e[1] is None and "." not in e[2]]
    assert 10 < len(copied) < 50  # 0.4 of the 25% rows without an image
    assert all(mixed[i][0] is None and plain[i][0] is None for i in copied)
    assert all(mixed[i][2] == plain[i][2] for i in range(300) if i not in copied)


def test_letterbox_rows_change_only_the_image():
    boxed = [train.make_example(i, 0.25, 6, letterbox=0.5) for i in range(60)]
    plain = [train.make_example(i, 0.25, 6) for i in range(60)]
    with_image = [i for i, e in enumerate(plain) if e[0] is not None]
    changed = [i for i in with_image if boxed[i][0].tobytes() != plain[i][0].tobytes()]
    assert 10 < len(changed) < len(with_image) - 10
    for i in changed:  # the pad rows are the CLIP mean colour
        assert boxed[i][0].getpixel((0, 0)) == world.PAD_RGB
    # Rows without an image are untouched; unboxed image rows are the plain rows.
    assert all(boxed[i] == plain[i] for i in range(60) if plain[i][0] is None)
    assert all(boxed[i][1:] == plain[i][1:] for i in with_image if i not in changed)


@pytest.mark.parametrize("bad", [["--letterbox", "1.5"], ["--text-share", "-0.1"], ["--backcopy", "2"],
                                 ["--data-offset", "-5"]])
def test_shares_outside_0_1_and_negative_offsets_are_refused(bad, capsys):
    with pytest.raises(SystemExit):  # refused by argparse, before any model is built
        train.parse_args(["--out", "unused", *bad])
    assert bad[0] in capsys.readouterr().err


def test_stages_init_from_a_run_freeze_the_lm_and_move_the_data(tmp_path, monkeypatch):
    import torch

    first = tmp_path / "lm"
    train.train(train.parse_args(["--out", str(first), "--steps", "3", "--text-share", "1.0", *TINY]))
    seen = []
    make = train.make_example
    monkeypatch.setattr(train, "make_example", lambda i, *a: seen.append(i) or make(i, *a))
    second = tmp_path / "align"
    out = train.train(train.parse_args(["--out", str(second), "--steps", "2", "--init-from", str(first),
                                        "--freeze-lm", "--text-share", "0", "--data-offset", "1000", *TINY]))
    assert out["start_step"] == 0 and seen == list(range(1000, 1016))  # 2 steps x 8 rows, from the offset
    a = LlavaForConditionalGeneration.from_pretrained(first / "model").state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(second / "model").state_dict()
    lm = [k for k in a if ".language_model." in k or k.startswith("lm_head")]
    vision = [k for k in a if "vision_tower" in k or "multi_modal_projector" in k]
    assert lm and vision
    assert all(torch.equal(a[k], b[k]) for k in lm)  # the language model is frozen
    assert sum(not torch.equal(a[k], b[k]) for k in vision) > len(vision) // 2  # the tower and projector train
    # The stage keeps the first run's vocabulary.
    assert (LlavaProcessor.from_pretrained(second / "model").tokenizer.get_vocab()
            == LlavaProcessor.from_pretrained(first / "model").tokenizer.get_vocab())
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path / "x"), "--init-from", str(tmp_path / "nothing")])


def test_detail_rows_ask_for_the_detailed_description_short_ones_and_questions():
    from lvlm_hallu.lvlm.shapes import detail, detail_text

    rows = [train.make_detail_example(i, 0.25, 0.4) for i in range(400)]
    kinds = Counter()
    for i, (image, prompt, answer, present) in enumerate(rows):
        if image is None:
            kind = "backcopy" if prompt is None and "." not in answer else "text"
            assert kind == "backcopy" or len(answer.split()) >= detail_text.MIN_WORDS
        elif prompt in detail_text.DETAIL_PROMPTS:
            kind = "detail"
            assert answer == detail_text.describe(detail.make_scene("train", i)[0])
        elif prompt in detail_text.SHORT_PROMPTS:
            kind = "short"
            assert answer.startswith("There ") and answer.count(".") == 1
        else:
            kind = "question"
            assert answer in ("Yes", "No") and prompt.startswith("Is there")
        kinds[kind] += 1
    # 25% without an image (0.4 of them backcopy); of the image rows 50% / 10% / 40%.
    assert 70 <= kinds["text"] + kinds["backcopy"] <= 130 and 20 <= kinds["backcopy"] <= 60
    assert 120 <= kinds["detail"] <= 180 and 15 <= kinds["short"] <= 50 and 90 <= kinds["question"] <= 150


def test_length_groups_give_the_whole_batch_gradient(tmp_path):
    import torch

    from lvlm_hallu.lvlm.shapes import model as M

    processor = M.build_processor(M.build_tokenizer(n_scenes=100, world_name="detail"))
    torch.manual_seed(0)
    model = M.build_model(M.Preset.from_name("tiny"), processor.tokenizer)
    ids = [processor.tokenizer(" " + k, add_special_tokens=False)["input_ids"][0] for k in world.CATEGORIES]
    probe = train.ObjectProbe(model, len(world.CATEGORIES), "words", ids)
    qprobe = train.QuestionProbe(model.config.text_config.hidden_size, train.QUESTION_PROBE_LAYER)
    params = list(model.parameters()) + [probe.bias, probe.scale] + list(qprobe.parameters())
    examples = [train.make_detail_example(i, 0.25, 0.4) for i in range(12)]
    lengths = [len(p) for p in train.length_groups(examples, 3)]
    assert lengths == [4, 4, 4]

    class Keep:  # an optimizer that keeps the gradients instead of stepping
        def step(self):
            self.grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

        def zero_grad(self, set_to_none=True):
            for p in params:
                p.grad = None

    whole, parts = Keep(), Keep()
    loss1, aux1 = train.train_step(model, probe, qprobe, whole, params, train.collate(processor, examples), 1.0)
    loss3, aux3 = train.train_step(model, probe, qprobe, parts, params,
                                   train.batch_parts(processor, examples, 3, "cpu"), 1.0)
    assert loss3.item() == pytest.approx(loss1.item(), rel=1e-5) and aux3.item() == pytest.approx(aux1.item(), rel=1e-5)
    # clip_grad_norm_ has run on both; same clipped gradients
    for a, b in zip(whole.grads, parts.grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_detail_run_resumes_and_stops_at_its_time_budget(tmp_path):
    import torch

    args = ["--out", str(tmp_path), "--world", "detail", "--length-groups", "2", "--bf16", *TINY]
    out = train.train(train.parse_args([*args, "--steps", "4", "--ckpt-every", "2"]))
    assert out["start_step"] == 0 and out["stopped"] is None
    spent = json.loads((tmp_path / "spent.json").read_text())
    assert spent["step"] == 4 and spent["train_s"] > 0 and spent["cpu_s"] > 0
    in_ckpt = train.checkpoint_spent(tmp_path / "checkpoint.pt")
    assert 0 < in_ckpt.train_s <= spent["train_s"] + 0.05 and 0 < in_ckpt.cpu_s <= spent["cpu_s"] + 0.05
    # The budget is already spent (on either clock): a resume exports the checkpoint's model and
    # trains nothing; the time goes on from the ledger's.
    for clock in ("cpu", "wall"):
        again = train.train(train.parse_args([*args, "--steps", "8", "--resume", "--budget-hours", "1e-6",
                                              "--budget-clock", clock]))
        assert again["start_step"] == 4 and again["steps"] == 4 and again["losses"] == [] and again["stopped"] == "budget"
        assert again["spent"].train_s >= spent["train_s"] and again["spent"].cpu_s >= spent["cpu_s"]
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1] == {"step": 4, "stopped": "budget", "budget_hours": 1e-6, "budget_clock": "wall"}
    from lvlm_hallu.lvlm.shapes import runcheck

    probes = runcheck.check(tmp_path, n=12, preset="tiny")
    assert probes["step"] == 4 and probes["rows"] == 12 and 0 <= probes["object_auc"] <= 1
    assert probes["object_bce"] > 0 and probes["questions"] > 0
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").state_dict()
    # A run without its model/ (still training) is measured from its checkpoint.
    import shutil

    from lvlm_hallu.lvlm.shapes import positions

    shutil.rmtree(tmp_path / "model")
    model, processor = positions.load(tmp_path, preset="tiny")
    assert processor.tokenizer.decode(processor.tokenizer(" purple houses")["input_ids"][1:]) == " purple houses"
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == "eager"


def test_probe_auc_is_the_chance_a_positive_outscores_a_negative():
    import torch

    from lvlm_hallu.lvlm.shapes.runcheck import auc

    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert auc(labels, torch.tensor([0.9, 0.1, 0.8, 0.2])) == 1.0
    assert auc(labels, torch.tensor([0.1, 0.9, 0.2, 0.8])) == 0.0
    assert auc(labels, torch.tensor([0.5, 0.5, 0.9, 0.1])) == 0.875  # 3 pairs won, 1 tie counted half
    assert auc(torch.ones(3), torch.rand(3)) is None
