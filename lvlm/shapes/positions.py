"""Along the answer: where a detailed description hallucinates, and how much it looks at the image.

Two measurements on greedy answers to "Please describe this image in detail." about held-out
scenes of the detailed world (detail.py), with no intervention:

- Hallucination by position. Each object a caption introduces (the first mention of a category,
  as quality.mentions finds words of the synonym table) is placed at its relative position in the
  caption, word index / number of words, in [0, 1); it is hallucinated when the scene has no such
  object. Per bin of relative position: objects introduced, hallucinated ones, their rate, and
  how many of those are the co-occurrence partner of a present kind (world.PAIRS). The
  same over every mention (a later "the cloud" of an absent cloud counts again) is kept too.
- Attention to the image along the answer. The prompt and the generated answer are run once more
  through the model, teacher-forced, with eager attention: under causal masking the weights at
  answer position t are exactly those the model computed when it generated token t+1. Per layer,
  the mass the query at t puts on the 64 image-token keys, averaged over heads; per bin of
  relative position in the answer, the mean over answers (all layers, and each layer), beside
  the share that attention spread evenly over all keys would give the image (it falls along the
  answer only because the answer adds keys). Also the mean mass at the tokens that introduce a
  hallucinated object against a present one.

    python -m lvlm_hallu.lvlm.shapes.positions --model DIR_OR_RUN [--n 100] [--bins 5] [--json OUT] [--plot PNG]

DIR_OR_RUN: a model folder, or a training run folder (its finished model/, else its
checkpoint.pt rebuilt with the run's processor and `--preset`), so an unfinished run can be
measured.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lvlm_hallu.lvlm.shapes import detail, detail_text, export, quality, world

PROMPT = detail_text.DETAIL_PROMPTS[0]  # "Please describe this image in detail." (the CHAIR prompt)


def load(path: Path, preset: str = "detail", attn: str = "eager"):
    """(model, processor) in eval mode from a model folder or a training run folder."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    if (path / "model" / "config.json").exists():
        path = path / "model"
    if (path / "config.json").exists():
        model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn)
        return model.eval(), LlavaProcessor.from_pretrained(path)
    model, processor, _ = export.load_run(path, preset)
    model.set_attn_implementation(attn)
    return model, processor


def introduced(caption: str, table: dict[str, str]) -> list[tuple[float, str, bool]]:
    """(relative position, category, first mention?) of every object mention, in caption order.

    Words are [a-z]+ runs of the lower-cased caption, as quality.mentions reads them."""
    words = re.findall(r"[a-z]+", caption.lower())
    seen: set[str] = set()
    out = []
    for i, w in enumerate(words):
        if w in table:
            cat = table[w]
            out.append((i / len(words), cat, cat not in seen))
            seen.add(cat)
    return out


def by_position(records: list[tuple[str, set[str]]], table: dict[str, str], bins: int = 5) -> dict:
    """Hallucination rate per bin of relative position; records are (caption, objects present)."""
    first = np.zeros((bins, 3), int)  # (introduced, hallucinated, hallucinated partner of a present kind)
    every = np.zeros((bins, 3), int)
    for caption, present in records:
        for pos, cat, is_first in introduced(caption, table):
            b = min(bins - 1, int(pos * bins))
            bad = cat not in present
            partner = bad and world.PARTNER.get(cat) in present
            every[b] += (1, bad, partner)
            if is_first:
                first[b] += (1, bad, partner)

    def rows(counts):
        return [{"bin": f"{b / bins:.2f}-{(b + 1) / bins:.2f}", "objects": int(n), "hallucinated": int(h),
                 "rate": round(h / n, 4) if n else None, "partners": int(p)} for b, (n, h, p) in enumerate(counts)]
    return {"first_mentions": rows(first), "all_mentions": rows(every)}


@torch.no_grad()
def image_attention(model, processor, image, prompt: str, answer_ids: list[int]) -> np.ndarray:
    """(layers, len(answer_ids)) attention mass on the image tokens of the query that predicts
    each answer token (the last prompt position predicts the first), head mean."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    ids = torch.cat([batch["input_ids"], torch.tensor([answer_ids])], dim=1)
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], output_attentions=True)
    image_keys = (ids[0] == model.config.image_token_id)
    start = batch["input_ids"].shape[1] - 1  # query predicting answer token 0
    rows = slice(start, start + len(answer_ids))
    return np.stack([a[0, :, rows][..., image_keys].sum(-1).mean(0).float().numpy() for a in out.attentions])


@dataclass
class Answer:
    image_id: int
    caption: str
    present: list[str]
    attention: np.ndarray  # (layers, tokens)
    image_tokens: int
    keys: int  # keys the query predicting answer token 0 sees (image, prompt and template tokens)
    token_words: list[int]  # word index of each answer token (-1: none)


def _word_of_tokens(processor, answer_ids: list[int]) -> list[int]:
    """Index of the [a-z]+ word each answer token ends inside (-1 for punctuation or </s>)."""
    out, text = [], ""
    for t in answer_ids:
        text += processor.tokenizer.decode([t], skip_special_tokens=True)
        words = re.findall(r"[a-z]+", text.lower())
        out.append(len(words) - 1 if words and re.search(r"[a-zA-Z]$", text) else -1)
    return out


def run(model, processor, n: int, first: int = 0, split: str = "test", max_new_tokens: int = 200,
        batch_size: int = 8) -> list[Answer]:
    scenes = [detail.make_scene(split, first + i) for i in range(n)]
    answers = []
    for i in range(0, n, batch_size):
        chunk = scenes[i:i + batch_size]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
            add_generation_prompt=True)] * len(chunk)
        batch = processor(text=texts, images=[img for _, img in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        for (scene, img), row in zip(chunk, gen[:, batch["input_ids"].shape[1]:].tolist()):
            eos = processor.tokenizer.eos_token_id
            ids = row[: row.index(eos) + 1] if eos in row else row
            ids = [t for t in ids if t != processor.tokenizer.pad_token_id]
            caption = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            att = image_attention(model, processor, img, PROMPT, ids)
            keys = int(batch["attention_mask"][0].sum())  # same prompt for all: unpadded length
            n_img = int((batch["input_ids"][0] == model.config.image_token_id).sum())
            answers.append(Answer(scene.image_id, caption, sorted(scene.counts()), att, n_img, keys,
                                  _word_of_tokens(processor, ids)))
    return answers


def attention_by_position(answers: list[Answer], table: dict[str, str], bins: int = 5) -> dict:
    """Mean image-attention mass per bin of relative position in the answer (tokens), all layers
    and per layer; and at tokens introducing a present vs a hallucinated object."""
    n_layers = answers[0].attention.shape[0]
    sums, counts, uniform = np.zeros((n_layers, bins)), np.zeros(bins), np.zeros(bins)
    at = {"present": [], "hallucinated": []}
    for a in answers:
        T = a.attention.shape[1]
        for t in range(T):
            b = min(bins - 1, int(t / T * bins))
            sums[:, b] += a.attention[:, t]
            uniform[b] += a.image_tokens / (a.keys + t)
            counts[b] += 1
        words = re.findall(r"[a-z]+", a.caption.lower())
        seen = set()
        for t, w in enumerate(a.token_words):
            if 0 <= w < len(words) and words[w] in table and table[words[w]] not in seen:
                if t > 0 and a.token_words[t - 1] == w:
                    continue  # not the word's first token: the object was chosen there
                cat = table[words[w]]
                seen.add(cat)
                # column t of `attention` is the query that predicted token t
                at["present" if cat in a.present else "hallucinated"].append(float(a.attention[:, t].mean()))
    mean = sums / np.maximum(counts, 1)
    return {"bins": [f"{b / bins:.2f}-{(b + 1) / bins:.2f}" for b in range(bins)],
            "all_layers": [round(float(v), 4) for v in mean.mean(0)],
            # what attention spread evenly over every key would put on the image: the share that
            # falls only because the answer itself adds keys
            "uniform": [round(float(v), 4) for v in uniform / np.maximum(counts, 1)],
            "per_layer": [[round(float(v), 4) for v in row] for row in mean],
            "tokens": [int(c) for c in counts],
            "at_object_tokens": {k: {"n": len(v), "mean": round(float(np.mean(v)), 4) if v else None}
                                 for k, v in at.items()}}


def measure(model, processor, n: int, first: int = 0, bins: int = 5, max_new_tokens: int = 200) -> dict:
    table = quality.load_synonyms()
    answers = run(model, processor, n, first, max_new_tokens=max_new_tokens)
    records = [(a.caption, set(a.present)) for a in answers]
    lengths = [len(a.caption.split()) for a in answers]
    metrics = quality.caption_metrics({a.image_id: a.caption for a in answers},
                                      {a.image_id: set(a.present) for a in answers}, table)
    return {"prompt": PROMPT, "split": "test", "first": first, "n": n,
            "answer_tokens": sum(a.attention.shape[1] for a in answers),
            "words": {"mean": round(float(np.mean(lengths)), 1), "min": int(min(lengths)), "max": int(max(lengths))},
            "captions": metrics,
            "hallucination_by_position": by_position(records, table, bins),
            "image_attention_by_position": attention_by_position(answers, table, bins),
            "examples": [{"image_id": a.image_id, "present": a.present, "caption": a.caption} for a in answers[:5]]}


def plot(res: dict, path: Path) -> None:
    """Two panels: hallucination rate of introduced objects, and image attention with its
    uniform-spread reference, per bin of relative position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hall = res["hallucination_by_position"]["first_mentions"]
    att = res["image_attention_by_position"]
    x = np.arange(len(hall))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.bar(x, [r["rate"] or 0 for r in hall], color="tab:red")
    a.set(title="objects introduced that are absent", xlabel="relative position in the caption",
          ylabel="hallucination rate", xticks=x, xticklabels=[r["bin"] for r in hall])
    b.plot(x, att["all_layers"], "o-", label="measured (mean of layers)")
    b.plot(x, att["uniform"], "--", color="gray", label="attention spread evenly")
    b.set(title="attention to the image tokens", xlabel="relative position in the answer",
          ylabel="share of attention", xticks=x, xticklabels=att["bins"], ylim=(0, None))
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="model folder or training run folder")
    ap.add_argument("--preset", default="detail", help="sizes of a run's checkpoint (model.py presets)")
    ap.add_argument("--n", type=int, default=100, help="held-out test scenes of the detailed world")
    ap.add_argument("--first", type=int, default=0, help="index of the first scene")
    ap.add_argument("--bins", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG of both measurements")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args.model, args.preset)
    res = measure(model, processor, args.n, args.first, args.bins)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(res, args.plot)


if __name__ == "__main__":
    main()
