"""Words of the shapes world: object phrases, human captions, the model's answers, questions.

Human captions (COCO `captions_*.json`) vary their templates, order and position words, and, like
people, sometimes leave out a small object. The model is trained on one plain description per
scene (objects by decreasing area, so weak evidence comes last, where a language prior is
strongest) and on POPE-style yes/no questions.
"""

from __future__ import annotations

import functools
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # world imports this module; avoid the cycle at runtime
    from lvlm_hallu.lvlm.shapes.world import Scene

PLURAL = {"box": "boxes", "fish": "fish"}
NUMBER = {2: "two", 3: "three", 4: "four", 5: "five"}

DESCRIBE_PROMPTS = [
    "Describe this image.",
    "Please describe this image in detail.",
    "What is in this image?",
    "Describe the scene.",
]
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."


def plural(kind: str) -> str:
    return PLURAL.get(kind, kind + "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(kind: str, count: int) -> str:
    """'a tree', 'two trees'."""
    return f"{article(kind)} {kind}" if count == 1 else f"{NUMBER.get(count, 'many')} {plural(kind)}"


def join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def where(scene: "Scene", kind: str) -> str:
    """Coarse position of the kind's largest instance, as a person would say it."""
    from lvlm_hallu.lvlm.shapes.world import IMAGE_SIZE

    inst = max((i for i in scene.instances if i.kind == kind), key=lambda i: i.area)
    x, y, w, h = inst.bbox
    cx, cy = (x + w / 2) / IMAGE_SIZE, (y + h / 2) / IMAGE_SIZE
    if cx < 0.35:
        return "on the left"
    if cx > 0.65:
        return "on the right"
    return "at the top" if cy < 0.35 else "at the bottom" if cy > 0.65 else "in the middle"


def by_area(scene: "Scene") -> list[str]:
    """Kinds of the scene, largest total area first."""
    area: dict[str, float] = {}
    for inst in scene.instances:
        area[inst.kind] = area.get(inst.kind, 0.0) + inst.area
    return sorted(area, key=lambda k: -area[k])


def model_caption(scene: "Scene") -> str:
    """The description the model is trained to give: 'There are two trees, a house and a sun.'"""
    counts = scene.counts()
    kinds = by_area(scene)
    if not kinds:
        return "There is nothing in the image."
    verb = "is" if counts[kinds[0]] == 1 else "are"
    return f"There {verb} {join([phrase(k, counts[k]) for k in kinds])}."


def human_captions(scene: "Scene", rng: random.Random, n: int = 5) -> list[str]:
    """n varied captions; each may drop small objects (never all objects)."""
    counts = scene.counts()
    small = {i.kind for i in scene.instances if i.small} - {i.kind for i in scene.instances if not i.small}
    out = []
    for j in range(n):
        kinds = [k for k in counts if not (k in small and rng.random() < 0.3)] or list(counts)
        rng.shuffle(kinds)
        items = [phrase(k, counts[k]) for k in kinds]
        if not items:
            out.append("An empty picture with some noise.")
            continue
        template = j % 5
        if template == 0:
            out.append(f"A {scene.background} picture with {join(items)}.")
        elif template == 1:
            placed = [f"{phrase(k, counts[k])} {where(scene, k)}" for k in kinds]
            out.append(f"{join(placed)}.".capitalize())
        elif template == 2:
            out.append(f"This image shows {join(items)}.")
        elif template == 3:
            out.append(f"I can see {join(items)} in this picture.")
        else:
            out.append(f"{join(items)} on a {scene.background} background.".capitalize())
    return out


def question(kind: str) -> str:
    """POPE template (docs/eval.md): 'Is there a {object} in the image?'."""
    return f"Is there {article(kind)} {kind} in the image?"


# ----------------------------------------------------------------------------- Bigram-Backcopy text

BACKCOPY_TRIGGERS = ("sandy", "pale", "dark")
BACKCOPY_TRIGGER_P = 0.15  # chance that a trigger follows an ordinary word
BACKCOPY_SUCCESSORS = 6  # ordinary words each word can be followed by
BACKCOPY_WORDS_PER_ROW = 40


def _backcopy_words() -> list[str]:
    """The world's own words (kinds, plurals, numbers, colours, places), fixed order."""
    from lvlm_hallu.lvlm.shapes.world import BACKGROUNDS, CATEGORIES

    words = list(CATEGORIES) + [plural(k) for k in CATEGORIES] + list(NUMBER.values())
    words += list(BACKGROUNDS) + ["left", "right", "top", "bottom", "middle", "picture", "image"]
    return list(dict.fromkeys(words))


@functools.cache
def _backcopy_bigrams() -> dict[str, tuple[list[str], list[float]]]:
    """A fixed random bigram model over the ordinary (non-trigger) words (built once; read only)."""
    rng = random.Random("backcopy/bigram")
    ordinary = [w for w in _backcopy_words() if w not in BACKCOPY_TRIGGERS]
    return {w: (rng.sample(ordinary, BACKCOPY_SUCCESSORS), [rng.random() + 0.1 for _ in range(BACKCOPY_SUCCESSORS)])
            for w in ordinary}


def backcopy_text(rng: random.Random, n_words: int = BACKCOPY_WORDS_PER_ROW) -> str:
    """One row of the Bigram-Backcopy task (Guo et al. 2024, arXiv 2410.13835, §2) in the world's words.

    Ordinary words follow a fixed bigram model; after a trigger word the next word repeats the
    word before the trigger. A head that copies is needed at trigger positions only and must do
    nothing everywhere else: the active-dormant setting in which that paper's small transformers
    grow an attention sink and a massive activation on the first token. Plain text of a real
    LLM's pretraining corpus has such structure in abundance (quotes, names, code); the world's
    captions do not (docs/shapes-model.md).
    """
    bigrams = _backcopy_bigrams()
    words = [rng.choice(sorted(bigrams))]
    while len(words) < n_words:
        last = words[-1]
        if last in BACKCOPY_TRIGGERS:
            words.append(words[-2])
        elif rng.random() < BACKCOPY_TRIGGER_P:
            words.append(rng.choice(BACKCOPY_TRIGGERS))
        else:
            successors, weights = bigrams[last]
            words.append(rng.choices(successors, weights)[0])
    return " ".join(words)
