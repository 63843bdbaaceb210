"""The training script: a few steps of the tiny preset lower the loss, and a resume continues."""

from __future__ import annotations

import json

from transformers import LlavaForConditionalGeneration, LlavaProcessor

from lvlm.shapes import train

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


def test_loss_decreases_and_resume_continues(tmp_path):
    out = train.train(train.parse_args(["--out", str(tmp_path), "--steps", "12", "--ckpt-every", "6", *TINY]))
    losses = out["losses"]
    assert out["start_step"] == 0 and len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").config.image_token_id == 4

    again = train.train(train.parse_args(["--out", str(tmp_path), "--steps", "15", "--resume", *TINY]))
    assert again["start_step"] == 12 and len(again["losses"]) == 3
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 16))


def _shipped():
    from lvlm.shapes import MODEL_DIR

    return MODEL_DIR
