"""Quick quality check of a shapes model on held-out scenes: caption recall/precision, a
CHAIR-style hallucination rate by plain word matching, and POPE accuracy/F1.

This is the self-contained check behind docs/shapes-model.md and the model test. It cannot use
the project's reference evaluators (`eval/` imports `lvlm/`, never the reverse), so:
  - mentions are words of the caption that are items of the synonym table (lower-cased
    [a-z]+ words, no lemmatizer: the table lists the plurals), mapped to the line's category;
    CHAIR_i = hallucinated mentions / mentions, CHAIR_s = captions with one / captions,
    recall = sum |mentioned ∩ GT| / sum |GT|, precision = sum |mentioned ∩ GT| / sum |mentioned|
    (unique categories per caption);
  - POPE splits follow docs/eval.md (images with >= 3 objects, 3 yes + 3 no per image,
    interleaved; random / popular / adversarial negatives) and the official answer rule.

    python -m lvlm_hallu.lvlm.shapes.quality [--model DIR] [--n-caption 200] [--n-pope 200] [--world detail] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

import torch

from lvlm_hallu.lvlm.shapes import text, world

DESCRIBE = "Describe this image."


def load_synonyms(path: Path | None = None) -> dict[str, str]:
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

    table = {}
    for line in Path(path or SYNONYMS_PATH).read_text().splitlines():
        items = [w.strip() for w in line.strip().split(", ") if w.strip()]
        for w in items:
            table[w] = items[0]
    return table


def mentions(caption: str, table: dict[str, str]) -> list[str]:
    return [table[w] for w in re.findall(r"[a-z]+", caption.lower()) if w in table]


@torch.no_grad()
def generate(model, processor, images, prompts, max_new_tokens=40, batch_size=16) -> list[str]:
    """Greedy answers with transformers' own generate, left-padded batches."""
    out = []
    for i in range(0, len(images), batch_size):
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True) for p in prompts[i:i + batch_size]]
        batch = processor(text=texts, images=images[i:i + batch_size], return_tensors="pt", padding=True)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in out]


def caption_metrics(captions: dict[int, str], gt: dict[int, set[str]], table) -> dict:
    n_ment = n_hall = n_hcap = n_gt = n_hit = n_uniq = 0
    hallucinated: Counter[str] = Counter()
    for imid, cap in captions.items():
        ment = mentions(cap, table)
        bad = [m for m in ment if m not in gt[imid]]
        hallucinated.update(bad)
        n_ment, n_hall, n_hcap = n_ment + len(ment), n_hall + len(bad), n_hcap + bool(bad)
        n_gt += len(gt[imid])
        n_hit += len(set(ment) & gt[imid])
        n_uniq += len(set(ment))
    return {"recall": n_hit / max(n_gt, 1), "precision": n_hit / max(n_uniq, 1),
            "chair_i": n_hall / max(n_ment, 1), "chair_s": n_hcap / max(len(captions), 1),
            "n": len(captions), "most_hallucinated": hallucinated.most_common(6)}


def pope_questions(objects: dict[int, set[str]], kind: str, n_images: int, seed: int = 0):
    """(image_id, object, label) triples of one POPE split, as docs/eval.md builds them."""
    rng = random.Random(seed)
    sampled = rng.sample(sorted(i for i, o in objects.items() if len(o) >= 3), n_images)
    chosen = {i: objects[i] for i in sampled}
    universe = sorted(set().union(*chosen.values()))
    freq = Counter(o for objs in chosen.values() for o in objs)
    popular = sorted(freq, key=lambda o: (-freq[o], o))
    co = {a: Counter(b for objs in chosen.values() if a in objs for b in objs if b != a) for a in universe}
    out = []
    for imid in sampled:
        present, asked = chosen[imid], set()
        for pos in rng.sample(sorted(present), 3):
            asked.add(pos)
            ranked = {"random": [], "popular": popular,
                      "adversarial": sorted(co[pos], key=lambda o: (-co[pos][o], o))}[kind]
            neg = next((o for o in ranked if o not in present and o not in asked), None)
            if neg is None:
                neg = rng.choice([o for o in universe if o not in present and o not in asked])
            asked.add(neg)
            out += [(imid, pos, "yes"), (imid, neg, "no")]
    return out


def pope_metrics(answers: list[str], labels: list[str]) -> dict:
    """Official POPE rule: text before the first '.', commas removed, 'no' if No/not/no is a word."""
    preds = ["no" if {"No", "not", "no"} & set(a.split(".")[0].replace(",", "").split(" ")) else "yes"
             for a in answers]
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"accuracy": sum(p == l for p, l in zip(preds, labels)) / len(labels), "precision": prec,
            "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-9),
            "yes_ratio": preds.count("yes") / len(preds), "n": len(labels)}


def evaluate(model_dir: Path, n_caption: int, n_pope: int, seed: int = 0, world_name: str = "basic") -> dict:
    """world_name "detail": scenes of the detailed world (detail.py), described in detail
    (detail_text.DETAIL_PROMPTS[0], up to 200 new tokens)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lvlm_hallu.lvlm.shapes import detail, detail_text

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    pool = max(n_caption, 3 * n_pope)
    make = detail.make_scene if world_name == "detail" else world.make_scene
    prompt, max_new = (detail_text.DETAIL_PROMPTS[0], 200) if world_name == "detail" else (DESCRIBE, 40)
    scenes = {}
    for i in range(pool):
        scene, img = make("test", i)
        scenes[scene.image_id] = (scene, img)
    gt = {k: set(s.counts()) for k, (s, _) in scenes.items()}
    table = load_synonyms()
    cap_ids = sorted(scenes)[:n_caption]
    caps = generate(model, processor, [scenes[i][1] for i in cap_ids], [prompt] * len(cap_ids), max_new_tokens=max_new)
    result = {"model": str(model_dir), "world": world_name, "prompt": prompt,
              "captions": caption_metrics(dict(zip(cap_ids, caps)), gt, table),
              "examples": [{"image_id": i, "caption": c, "gt": sorted(gt[i])}
                           for i, c in list(zip(cap_ids, caps))[:8]], "pope": {}}
    for kind in ("random", "popular", "adversarial"):
        qs = pope_questions(gt, kind, n_pope, seed)
        prompts = [text.question(o) + text.POPE_SUFFIX for _, o, _ in qs]
        answers = generate(model, processor, [scenes[i][1] for i, _, _ in qs], prompts, max_new_tokens=4,
                           batch_size=32)
        result["pope"][kind] = pope_metrics(answers, [l for _, _, l in qs])
    return result


def main(argv=None) -> None:
    from lvlm_hallu.lvlm.shapes import MODEL_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--n-caption", type=int, default=200)
    ap.add_argument("--n-pope", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--world", default="basic", choices=["basic", "detail"],
                    help="held-out scenes of world.py (basic) or of the detailed world (detail.py)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = evaluate(args.model, args.n_caption, args.n_pope, world_name=args.world)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
