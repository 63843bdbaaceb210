"""The detailed shapes world: busier scenes described in several sentences, for long answers.

The same 13 object kinds, drawings, backgrounds, noise and co-occurrence pairs as world.py
(PAIRS, PARTNER, PARTNER_P: a partner that joins is often small or faint), with what a detailed
description needs to talk about: 2-4 anchor kinds and up to MAX_INSTANCES objects per scene, each
object drawn in one of its kind's named colours (KIND_COLOURS) at one of three sizes, and a
40-120 word answer to "Please describe this image in detail." (detail_text.py) that names every
object with its colour, size and position, counts, relations between objects and the scene's
theme, salient objects first. LLaVA's detailed-description data has that shape; it is where its
object hallucination lives (late in long answers, when the prior takes over).

Determinism: scene i of a split depends only on (seed, split, i), never on n; a stream of its own
("shapes-detail/..."), so the detailed scene i is not world.py's scene i.

CLI:  python -m lvlm_hallu.lvlm.shapes.detail --out DIR --split test --n 200 [--seed S] [--first I]
writes DIR/images/<split>_<id>.png and DIR/annotations/{instances,captions}_<split>.json (COCO;
`info.description` starts with world.DESCRIPTION_PREFIX, so evaluation uses the shapes synonyms).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lvlm_hallu.lvlm.shapes import detail_text, text, world

MAX_INSTANCES = 9
# Named colours of the detailed world and the colours each kind is drawn in (the first is
# world.py's colour of the kind). Shape alone tells the kind apart here; colour is an attribute.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "blue": (35, 75, 215), "green": (35, 150, 45), "yellow": (245, 210, 10),
    "orange": (250, 145, 10), "pink": (240, 90, 185), "purple": (145, 80, 200),
    "white": (245, 245, 245), "gray": (135, 135, 145), "brown": (145, 90, 40),
}
KIND_COLOURS: dict[str, tuple[str, ...]] = {
    "ball": ("red", "blue", "green"), "box": ("brown", "blue"), "star": ("yellow", "white"),
    "tree": ("green", "orange"), "house": ("purple", "yellow", "blue"), "sun": ("orange", "yellow"),
    "cloud": ("white", "gray"), "fish": ("blue", "orange", "green"), "car": ("blue", "red", "yellow"),
    "flower": ("pink", "red", "purple"), "moon": ("yellow", "white"), "key": ("gray", "yellow"),
    "boat": ("brown", "red"),
}
SMALL_PX = (9, 13)  # drawn size range of a small object
MEDIUM_PX = (16, 25)
LARGE_PX = (26, 32)


@dataclass
class DetailInstance(world.Instance):
    """A drawn object with the attributes the description states: colour name and size class."""

    colour: str = ""
    size: str = "medium"  # small | medium | large


def sample_kinds(rng: random.Random) -> list[tuple[str, bool]]:
    """Kinds of one scene, (kind, joined_as_partner) per instance, at most MAX_INSTANCES."""
    n_anchor = rng.choices([2, 3, 4], weights=[0.35, 0.45, 0.2])[0]
    anchors = rng.sample(world.CATEGORIES, n_anchor)
    chosen = [(k, False) for k in anchors]
    for k in anchors:
        partner = world.PARTNER.get(k)
        if partner and all(c != partner for c, _ in chosen) and rng.random() < world.PARTNER_P:
            chosen.append((partner, True))
    out: list[tuple[str, bool]] = []
    for kind, joined in chosen:
        n = rng.choices([1, 2, 3], weights=[0.6, 0.25, 0.15])[0]
        out += [(kind, joined)] * min(n, world.KINDS[kind][1])
    return out[:MAX_INSTANCES]


def render_scene(image_id: int, rng: random.Random) -> tuple[world.Scene, Image.Image]:
    """Sample and draw one detailed scene; all randomness comes from `rng`."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    background, img = world._background(rng, nrng)
    scene = world.Scene(image_id=image_id, background=background)
    taken: list[tuple[int, int, int, int]] = []
    base = img.convert("RGBA")
    for kind, joined in sample_kinds(rng):
        small = rng.random() < (0.4 if joined else 0.12)
        faint = rng.random() < (0.3 if joined else 0.08)
        size_class = "small" if small else rng.choices(["medium", "large"], weights=[0.65, 0.35])[0]
        lo, hi = {"small": SMALL_PX, "medium": MEDIUM_PX, "large": LARGE_PX}[size_class]
        px = rng.randint(lo, hi)
        x, y = world.place(rng, kind, px, taken)
        colour = rng.choice(KIND_COLOURS[kind])
        drawn = world.composite_object(base, rng, kind, x, y, px, world._jitter(rng, COLOURS[colour], 15) + (255,),
                                       faint)
        if drawn is None:  # cannot happen for sizes >= 9, kept as a guard
            continue
        base, (x0, y0, x1, y1), area = drawn
        taken.append((x, y, x + px, y + px))
        scene.instances.append(DetailInstance(kind, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                              area, small, faint, colour, size_class))
    img = world._add_noise(base.convert("RGB"), nrng, rng.uniform(2.0, 10.0))
    return scene, img


def make_scene(split: str, index: int, seed: int | None = None) -> tuple[world.Scene, Image.Image]:
    """Detailed scene `index` of `split` (ids are split offset + index + 1, as in world.py)."""
    if split not in world.SPLITS:
        raise KeyError(f"unknown split {split!r}; valid: {', '.join(world.SPLITS)}")
    offset, default_seed = world.SPLITS[split]
    seed = default_seed if seed is None else seed
    return render_scene(offset + index + 1, random.Random(f"shapes-detail/{seed}/{split}/{index}"))


def build_split(out: Path, split: str, n: int, seed: int | None = None, first: int = 0) -> tuple[Path, Path]:
    """Write scenes first .. first+n-1 and their COCO instances/captions JSON; returns both paths.

    Captions: the detailed description (as the model is trained to give it) and four short human
    captions (text.human_captions) per image."""
    if first < 0 or n < 0:
        raise ValueError(f"first and n must be >= 0, got first={first}, n={n}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    for i in range(first, first + n):
        scene, img = make_scene(split, i, seed)
        fname = f"{split}_{scene.image_id}.png"
        img.save(out / "images" / fname, format="PNG", optimize=False)
        images.append({"id": scene.image_id, "file_name": fname, "width": world.IMAGE_SIZE,
                       "height": world.IMAGE_SIZE})
        for inst in scene.instances:
            x, y, w, h = inst.bbox
            anns.append({"id": len(anns) + 1, "image_id": scene.image_id,
                         "category_id": world.CATEGORY_IDS[inst.kind], "bbox": inst.bbox,
                         "area": inst.area, "iscrowd": 0, "colour": inst.colour, "size": inst.size,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        crng = random.Random(f"detail-captions/{scene.image_id}")
        for c in [detail_text.describe(scene)] + text.human_captions(scene, crng, n=4):
            caps.append({"id": len(caps) + 1, "image_id": scene.image_id, "caption": c})
    info = {"description": f"{world.DESCRIPTION_PREFIX} (detailed), split {split}", "version": "1.0",
            "seed": world.SPLITS[split][1] if seed is None else seed}
    return world.write_coco(out, split, info, images, anns, caps)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", choices=list(world.SPLITS), default="test")
    ap.add_argument("--n", type=world.count, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: a fixed seed per split")
    ap.add_argument("--first", type=world.count, default=0, help="index of the first scene")
    args = ap.parse_args(argv)
    inst, cap = build_split(args.out, args.split, args.n, args.seed, args.first)
    print(f"wrote {args.n} images, {inst} and {cap}")


if __name__ == "__main__":
    main()
