"""The shapes world: a seeded synthetic scene generator with COCO-format annotations.

Every image is a 96x96 scene of a few object kinds drawn with Pillow on a noisy, cluttered
background. Scenes are sampled with co-occurrence priors: when one object of a pair is present
(sun+cloud, tree+house, fish+boat, moon+star) its partner joins it most of the time, and a
partner that joins is often small, faint or half hidden. A model trained on such data learns
"there is a sun, so there is a cloud" and names absent partners when the visual evidence is
weak: the same failure that CHAIR and POPE measure on real LVLMs (docs/eval.md).

Determinism: scene i of a split depends only on (seed, split, i), never on n, so the first 50
images of `--n 50` and `--n 200` are identical, and the same arguments give the same PNG bytes
and JSON.

CLI:  python -m lvlm_hallu.lvlm.shapes.world --out DIR --split test --n 200 [--seed S]
writes DIR/images/<split>_<id>.png and DIR/annotations/{instances,captions}_<split>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lvlm_hallu.lvlm.shapes import text

IMAGE_SIZE = 96
# A letterboxed scene is a wide photo (96 x 72) padded to square as LLaVA-1.5 does before its
# processor (`expand2square` with the CLIP mean colour): one patch row of 12 px above and below
# holding exactly that colour, i.e. patches that carry nothing (arXiv 2503.03321 §3 finds LLaVA's
# visual sinks on such content-free background tokens). Scenes are letterboxed with probability
# `letterbox` (default 0: the world of the shipped model).
LETTERBOX_PAD = 12
PAD_RGB = (123, 117, 104)  # round(255 * CLIP image mean)

# name -> (base RGB colour, maximum count in one scene). Colours are far apart so that shape
# AND colour identify a kind; the base colour is jittered per instance.
KINDS: dict[str, tuple[tuple[int, int, int], int]] = {
    "ball": ((220, 30, 30), 3),
    "box": ((150, 90, 40), 3),
    "star": ((250, 215, 0), 3),
    "tree": ((30, 140, 40), 3),
    "house": ((170, 120, 200), 2),
    "sun": ((255, 150, 0), 1),
    "cloud": ((245, 245, 245), 3),
    "fish": ((0, 170, 170), 3),
    "car": ((30, 70, 220), 2),
    "flower": ((240, 80, 180), 3),
    "moon": ((240, 240, 170), 1),
    "key": ((140, 140, 150), 2),
    "boat": ((120, 70, 30), 2),
}
# Start of `info.description` in the COCO files this module writes (eval picks the shapes synonym
# table for them: a model trained on the world names shapes, not COCO objects).
DESCRIPTION_PREFIX = "shapes world"
CATEGORIES = list(KINDS)  # category_id = index + 1
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(CATEGORIES)}

# Co-occurrence priors: partner joins its anchor with probability PARTNER_P (both directions).
PAIRS = [("sun", "cloud"), ("tree", "house"), ("fish", "boat"), ("moon", "star")]
PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
PARTNER_P = 0.8

# Sky objects live in the upper half, ground objects in the lower half, the rest anywhere.
SKY = {"sun", "cloud", "moon", "star"}
GROUND = {"tree", "house", "car", "flower", "box", "key"}

# Disjoint id ranges and default seeds per split (ids never collide across splits).
SPLITS = {"train": (1_000_000, 0), "val": (2_000_000, 1), "test": (3_000_000, 2)}

BACKGROUNDS = {  # name used in captions -> (top colour, bottom colour)
    "blue": ((110, 160, 220), (170, 200, 235)),
    "green": ((120, 170, 110), (80, 130, 70)),
    "sandy": ((220, 200, 150), (190, 170, 120)),
    "gray": ((130, 130, 135), (100, 100, 105)),
    "dark": ((30, 35, 70), (55, 60, 95)),
    "pale": ((225, 225, 215), (205, 205, 195)),
}


@dataclass
class Instance:
    """One drawn object. bbox is COCO [x, y, w, h] of its visible pixels before occlusion."""

    kind: str
    bbox: list[float]
    area: float
    small: bool = False
    faint: bool = False


@dataclass
class Scene:
    image_id: int
    background: str
    instances: list[Instance] = field(default_factory=list)
    letterbox: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for inst in self.instances:
            out[inst.kind] = out.get(inst.kind, 0) + 1
        return out


# ----------------------------------------------------------------------------- sampling


def sample_kinds(rng: random.Random) -> list[tuple[str, bool]]:
    """Kinds of one scene with the priors applied; (kind, joined_as_partner) per instance."""
    n_anchor = rng.choices([1, 2, 3], weights=[0.35, 0.45, 0.2])[0]
    anchors = rng.sample(CATEGORIES, n_anchor)
    chosen: list[tuple[str, bool]] = [(k, False) for k in anchors]
    for k in anchors:
        partner = PARTNER.get(k)
        if partner and partner not in anchors and rng.random() < PARTNER_P:
            if all(c != partner for c, _ in chosen):
                chosen.append((partner, True))
    out: list[tuple[str, bool]] = []
    for kind, joined in chosen:
        max_count = KINDS[kind][1]
        count = rng.choices([1, 2, 3], weights=[0.7, 0.2, 0.1])[0]
        out += [(kind, joined)] * min(count, max_count)
    return out[:7]


def place(rng: random.Random, kind: str, size: int, taken: list[tuple[int, int, int, int]],
          height: int = IMAGE_SIZE):
    """Top-left corner for a size x size object; avoids hiding more than half of another."""
    lo_y, hi_y = 2, height - size - 2
    if kind in SKY:
        hi_y = max(lo_y, height // 2 - size // 2)
    elif kind in GROUND:
        lo_y = min(hi_y, height // 3)
    best = None
    for _ in range(20):
        x = rng.randint(2, IMAGE_SIZE - size - 2)
        y = rng.randint(lo_y, hi_y)
        worst = max((_overlap((x, y, x + size, y + size), t) for t in taken), default=0.0)
        if best is None or worst < best[0]:
            best = (worst, x, y)
        if worst < 0.3:
            break
    return best[1], best[2]


def _overlap(a, b) -> float:
    """Fraction of the smaller box covered by the intersection (why: occlusion, not IoU)."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / max(smaller, 1)


# ----------------------------------------------------------------------------- drawing


def _jitter(rng: random.Random, rgb, amount=25):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def draw_kind(d: ImageDraw.ImageDraw, kind: str, x: int, y: int, s: int, col, rng) -> None:
    """Draw one object of `kind` into the s x s square at (x, y) on a transparent layer."""
    X, Y = x + s, y + s
    cx, cy = x + s / 2, y + s / 2
    if kind == "ball":
        d.ellipse([x, y, X, Y], fill=col)
        d.ellipse([x + s * 0.25, y + s * 0.2, x + s * 0.45, y + s * 0.4], fill=(255, 230, 230, 255))
    elif kind == "box":
        d.rectangle([x, y, X, Y], fill=col, outline=(70, 40, 15, 255), width=max(1, s // 10))
        d.line([x, cy, X, cy], fill=(70, 40, 15, 255), width=max(1, s // 12))
    elif kind == "star":
        pts = []
        for i in range(10):
            r = s / 2 if i % 2 == 0 else s / 5
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        d.polygon(pts, fill=col)
    elif kind == "tree":
        d.rectangle([cx - s * 0.08, y + s * 0.65, cx + s * 0.08, Y], fill=(100, 60, 20, 255))
        d.polygon([(cx, y), (x + s * 0.1, y + s * 0.75), (X - s * 0.1, y + s * 0.75)], fill=col)
    elif kind == "house":
        d.rectangle([x + s * 0.1, y + s * 0.45, X - s * 0.1, Y], fill=col)
        d.polygon([(x, y + s * 0.48), (cx, y), (X, y + s * 0.48)], fill=(150, 40, 40, 255))
        d.rectangle([cx - s * 0.08, y + s * 0.72, cx + s * 0.08, Y], fill=(60, 40, 30, 255))
    elif kind == "sun":
        for i in range(8):
            a = i * math.pi / 4
            d.line([cx, cy, cx + s / 2 * math.cos(a), cy + s / 2 * math.sin(a)], fill=col,
                   width=max(1, s // 12))
        d.ellipse([x + s * 0.22, y + s * 0.22, X - s * 0.22, Y - s * 0.22], fill=col)
    elif kind == "cloud":
        d.ellipse([x, y + s * 0.35, x + s * 0.55, Y - s * 0.15], fill=col)
        d.ellipse([x + s * 0.25, y + s * 0.15, x + s * 0.8, Y - s * 0.25], fill=col)
        d.ellipse([x + s * 0.45, y + s * 0.35, X, Y - s * 0.15], fill=col)
    elif kind == "fish":
        d.ellipse([x, y + s * 0.25, x + s * 0.72, Y - s * 0.25], fill=col)
        d.polygon([(x + s * 0.65, cy), (X, y + s * 0.2), (X, Y - s * 0.2)], fill=col)
        d.ellipse([x + s * 0.12, cy - s * 0.1, x + s * 0.22, cy], fill=(0, 0, 0, 255))
    elif kind == "car":
        d.rectangle([x + s * 0.25, y + s * 0.25, X - s * 0.25, y + s * 0.5], fill=col)
        d.rectangle([x, y + s * 0.45, X, y + s * 0.75], fill=col)
        for wx in (x + s * 0.12, X - s * 0.38):
            d.ellipse([wx, y + s * 0.64, wx + s * 0.26, y + s * 0.9], fill=(20, 20, 20, 255))
    elif kind == "flower":
        d.line([cx, cy, cx, Y], fill=(40, 150, 40, 255), width=max(1, s // 10))
        r = s * 0.16
        for i in range(5):
            a = i * 2 * math.pi / 5
            px, py = cx + s * 0.2 * math.cos(a), y + s * 0.35 + s * 0.2 * math.sin(a)
            d.ellipse([px - r, py - r, px + r, py + r], fill=col)
        d.ellipse([cx - r * 0.8, y + s * 0.35 - r * 0.8, cx + r * 0.8, y + s * 0.35 + r * 0.8],
                  fill=(250, 220, 0, 255))
    elif kind == "moon":
        d.ellipse([x, y, X, Y], fill=col)
        d.ellipse([x + s * 0.3, y - s * 0.1, X + s * 0.3, Y - s * 0.1], fill=(0, 0, 0, 0))
    elif kind == "key":
        w = max(1, s // 7)
        d.ellipse([x, y + s * 0.3, x + s * 0.4, y + s * 0.7], outline=col, width=w)
        d.line([x + s * 0.4, cy, X, cy], fill=col, width=w)
        for tx in (X - s * 0.12, X - s * 0.3):
            d.line([tx, cy, tx, cy + s * 0.2], fill=col, width=w)
    elif kind == "boat":
        d.polygon([(x, y + s * 0.65), (X, y + s * 0.65), (X - s * 0.18, Y), (x + s * 0.18, Y)],
                  fill=col)
        d.line([cx, y, cx, y + s * 0.65], fill=(60, 40, 20, 255), width=max(1, s // 14))
        d.polygon([(cx + 1, y + s * 0.05), (cx + 1, y + s * 0.6), (X - s * 0.1, y + s * 0.6)],
                  fill=(250, 250, 235, 255))
    else:
        raise KeyError(f"unknown kind {kind!r}; valid: {', '.join(CATEGORIES)}")


def composite_object(base: Image.Image, rng: random.Random, kind: str, x: int, y: int, size: int, rgba,
                     faint: bool) -> tuple[Image.Image, tuple[int, int, int, int], float] | None:
    """Draw one object on a layer of its own (faded when faint) over `base`: (the new base, the
    object's bounding box, its pixel area), or None when nothing was drawn."""
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw_kind(ImageDraw.Draw(layer), kind, x, y, size, rgba, rng)
    alpha = np.asarray(layer)[:, :, 3]
    if faint:
        layer.putalpha(Image.fromarray((alpha * rng.uniform(0.35, 0.55)).astype(np.uint8)))
    box = layer.getbbox()
    if box is None:
        return None
    return Image.alpha_composite(base, layer), box, float((alpha > 0).sum())


def _background(rng: random.Random, nrng: np.random.Generator,
                height: int = IMAGE_SIZE) -> tuple[str, Image.Image]:
    name = rng.choice(list(BACKGROUNDS))
    top, bottom = (np.array(_jitter(rng, c, 15), np.float32) for c in BACKGROUNDS[name])
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    arr = np.broadcast_to(top * (1 - t) + bottom * t, (height, IMAGE_SIZE, 3)).copy()
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    # Clutter: strokes and dots that are no object kind, so "something there" != "an object".
    for _ in range(rng.randint(0, 8)):
        p = [rng.randint(0, IMAGE_SIZE if j % 2 == 0 else height) for j in range(4)]
        shade = rng.randint(60, 200)
        if rng.random() < 0.5:
            d.line(p, fill=(shade, shade, shade - 10), width=1)
        else:
            r = rng.randint(1, 2)
            d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=(shade, shade - 10, shade))
    return name, img


def _add_noise(img: Image.Image, nrng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + nrng.normal(0.0, sigma, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")


def render_scene(image_id: int, rng: random.Random,
                 letterbox: bool = False) -> tuple[Scene, Image.Image]:
    """Sample and draw one scene; all randomness comes from `rng` (and a numpy rng seeded by it).

    `letterbox`: draw a 96 x 72 scene and pad it to 96 x 96 (LETTERBOX_PAD rows of PAD_RGB above
    and below); boxes are in the padded image's coordinates.
    """
    pad = LETTERBOX_PAD if letterbox else 0
    height = IMAGE_SIZE - 2 * pad
    nrng = np.random.default_rng(rng.getrandbits(63))
    background, img = _background(rng, nrng, height)
    scene = Scene(image_id=image_id, background=background, letterbox=letterbox)
    taken: list[tuple[int, int, int, int]] = []
    base = img.convert("RGBA")
    for kind, joined in sample_kinds(rng):
        # Partners that joined through the prior are often weak evidence: small or faint.
        small = rng.random() < (0.4 if joined else 0.1)
        faint = rng.random() < (0.3 if joined else 0.08)
        size = rng.randint(9, 13) if small else rng.randint(18, 36)
        x, y = place(rng, kind, size, taken, height)
        drawn = composite_object(base, rng, kind, x, y, size, _jitter(rng, KINDS[kind][0]) + (255,), faint)
        if drawn is None:  # cannot happen for sizes >= 9, kept as a guard
            continue
        base, (x0, y0, x1, y1), area = drawn
        taken.append((x, y, x + size, y + size))
        scene.instances.append(Instance(kind, [float(x0), float(y0 + pad), float(x1 - x0),
                                               float(y1 - y0)], area, small, faint))
    sigma = rng.uniform(2.0, 10.0)
    img = _add_noise(base.convert("RGB"), nrng, sigma)
    if pad:
        square = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), PAD_RGB)
        square.paste(img, (0, pad))
        img = square
    return scene, img


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, stable across processes and platforms.
    return random.Random(f"shapes/{seed}/{split}/{index}")


def probability(text: str) -> float:
    """argparse type of a share in [0, 1] (--letterbox here; --letterbox, --text-share, --backcopy in train.py)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability in [0, 1], got {value}")
    return value


def count(text: str) -> int:
    """argparse type of a scene count or index, >= 0 (--n, --first; train.py's --data-offset)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def make_scene(split: str, index: int, seed: int | None = None,
               letterbox: float = 0.0) -> tuple[Scene, Image.Image]:
    """Scene `index` of `split` (ids are split offset + index + 1), letterboxed with probability
    `letterbox` (drawn from its own stream: an unboxed scene is the same with any `letterbox`;
    a boxed one is drawn anew at 96 x 72 from the scene's rng)."""
    if not 0.0 <= letterbox <= 1.0:
        raise ValueError(f"letterbox is a probability in [0, 1], got {letterbox}")
    offset, default_seed = SPLITS[split]
    seed = default_seed if seed is None else seed
    boxed = letterbox > 0 and random.Random(f"letterbox/{seed}/{split}/{index}").random() < letterbox
    return render_scene(offset + index + 1, scene_rng(seed, split, index), boxed)


# ----------------------------------------------------------------------------- COCO export


def coco_categories() -> list[dict]:
    return [{"id": CATEGORY_IDS[k], "name": k, "supercategory": "shape"} for k in CATEGORIES]


def build_split(out: Path, split: str, n: int, seed: int | None = None,
                letterbox: float = 0.0, first: int = 0) -> tuple[Path, Path]:
    """Write n images (scenes first .. first+n-1 of the split) and their instances/captions JSON;
    returns the two JSON paths. A range is the same scenes a larger split holds at those indices,
    so a fresh held-out set is the range after the ones already used."""
    if first < 0 or n < 0:
        raise ValueError(f"first and n must be >= 0, got first={first}, n={n}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    for i in range(first, first + n):
        scene, img = make_scene(split, i, seed, letterbox)
        fname = f"{split}_{scene.image_id}.png"
        img.save(out / "images" / fname, format="PNG", optimize=False)
        images.append({"id": scene.image_id, "file_name": fname, "width": IMAGE_SIZE,
                       "height": IMAGE_SIZE})
        for inst in scene.instances:
            x, y, w, h = inst.bbox
            anns.append({"id": len(anns) + 1, "image_id": scene.image_id,
                         "category_id": CATEGORY_IDS[inst.kind], "bbox": inst.bbox,
                         "area": inst.area, "iscrowd": 0,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        crng = random.Random(f"captions/{scene.image_id}")
        for c in text.human_captions(scene, crng):
            caps.append({"id": len(caps) + 1, "image_id": scene.image_id, "caption": c})
    info = {"description": f"{DESCRIPTION_PREFIX}, split {split}", "version": "1.0",
            "seed": SPLITS[split][1] if seed is None else seed}
    if letterbox:
        info["letterbox"] = letterbox
    return write_coco(out, split, info, images, anns, caps)


def write_coco(out: Path, split: str, info: dict, images: list[dict], anns: list[dict],
               caps: list[dict]) -> tuple[Path, Path]:
    """The split's COCO instances and captions files under out/annotations: their two paths."""
    inst_path = out / "annotations" / f"instances_{split}.json"
    cap_path = out / "annotations" / f"captions_{split}.json"
    common = {"info": info, "licenses": [], "images": images}
    inst_path.write_text(json.dumps(common | {"annotations": anns, "categories": coco_categories()},
                                    sort_keys=True))
    cap_path.write_text(json.dumps(common | {"annotations": caps}, sort_keys=True))
    return inst_path, cap_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", choices=list(SPLITS), default="test")
    ap.add_argument("--n", type=count, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: a fixed seed per split")
    ap.add_argument("--letterbox", type=probability, default=0.0,
                    help="share of scenes drawn wide (96x72) and padded to square, LLaVA-1.5 style")
    ap.add_argument("--first", type=count, default=0,
                    help="index of the first scene (ids are split offset + index + 1): a range after the ones used")
    args = ap.parse_args(argv)
    inst, cap = build_split(args.out, args.split, args.n, args.seed, args.letterbox, args.first)
    print(f"wrote {args.n} images, {inst} and {cap}")


if __name__ == "__main__":
    main()
