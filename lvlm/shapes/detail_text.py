"""Words of the detailed shapes world: the detailed description and the prompts that ask for it.

`describe(scene)` is the answer the detailed model is trained to give to "Please describe this
image in detail.": several sentences, 40-120 words (MIN_WORDS, MAX_WORDS), salient objects first
(kinds by decreasing total area, so small and faint ones, often a co-occurrence partner, come
late, where a language prior is strongest):

  The image shows a blue background with a large purple house on the left. There are two
  green trees, a large one in the middle and a small one at the bottom. The trees are to the
  right of the house. I can also see a small white cloud at the top. ... It looks like a quiet
  countryside. Altogether there are four objects in the picture.

Every object is described with its colour, size (small and large are said, medium is not) and
position; a kind's first mention carries its total count ("two green trees"), later mentions are
definite ("the trees"), so a count or a new-instance mention in the answer means what it says.
Relations compare the centres of two kinds' objects. The sentences about objects are always
there; relations, the theme and the count are added in that order while the answer stays within
MAX_WORDS (the longest scenes drop some), and a filler about the background is added only to
reach MIN_WORDS.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from lvlm_hallu.lvlm.shapes import text

if TYPE_CHECKING:
    from lvlm_hallu.lvlm.shapes.world import Instance, Scene

MIN_WORDS, MAX_WORDS = 40, 120
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
           9: "nine", 10: "ten"}
# LLaVA's detailed-description instructions (detail_23k) in the words of this world; the first is
# the CHAIR prompt of eval/compare.py.
DETAIL_PROMPTS = [
    "Please describe this image in detail.",
    "Describe this image in detail.",
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
]
# Short descriptions keep world.py's one-sentence answer (text.model_caption).
SHORT_PROMPTS = ["Describe this image.", "What is in this image?", "Describe the scene."]
# Scene themes, first match in order of the scene's kinds by area: (kinds, sentence).
THEMES = [
    ({"fish", "boat"}, "It looks like a calm day at sea."),
    ({"moon", "star"}, "It looks like a clear night sky."),
    ({"sun", "cloud"}, "It looks like a bright day outside."),
    ({"tree", "house", "flower"}, "It looks like a quiet countryside."),
    ({"ball", "box", "key", "car"}, "It looks like a collection of toys."),
]
# Position words, a 3 x 3 grid over the image by the object's box centre.
GRID = [["in the top left corner", "at the top", "in the top right corner"],
        ["on the left", "in the middle", "on the right"],
        ["in the bottom left corner", "at the bottom", "in the bottom right corner"]]


def position(inst: "Instance") -> str:
    from lvlm_hallu.lvlm.shapes.world import IMAGE_SIZE

    x, y, w, h = inst.bbox
    col, row = (min(2, int(3 * c / IMAGE_SIZE)) for c in (x + w / 2, y + h / 2))
    return GRID[row][col]


def relation(a: list["Instance"], b: list["Instance"]) -> str:
    """Where the objects `a` are relative to the objects `b`, by their mean box centres."""
    def centre(insts):
        return (sum(i.bbox[0] + i.bbox[2] / 2 for i in insts) / len(insts),
                sum(i.bbox[1] + i.bbox[3] / 2 for i in insts) / len(insts))
    (ax, ay), (bx, by) = centre(a), centre(b)
    dx, dy = ax - bx, ay - by
    if abs(dy) >= abs(dx) and abs(dy) > 8:
        return "above" if dy < 0 else "below"
    if abs(dx) > 8:
        return "to the left of" if dx < 0 else "to the right of"
    return "next to"


def _noun(kind: str, n: int) -> str:
    return kind if n == 1 else text.plural(kind)


def _size(inst: "Instance") -> str:
    size = getattr(inst, "size", "small" if inst.small else "medium")
    return "" if size == "medium" else size


def kind_phrase(kind: str, insts: list["Instance"]) -> str:
    """'a small red ball in the top left corner'; 'two red balls, a large one on the left and one
    at the top'; 'three balls, a red one on the left, a blue one ... and ...'."""
    colours = {getattr(i, "colour", "") for i in insts}
    if len(insts) == 1:
        i = insts[0]
        words = " ".join(w for w in (_size(i), getattr(i, "colour", ""), kind) if w)
        return f"{text.article(words)} {words} {position(i)}"
    same = len(colours) == 1
    head = " ".join(w for w in (NUMBERS[len(insts)], next(iter(colours)) if same else "", text.plural(kind)) if w)
    parts = []
    for i in sorted(insts, key=lambda i: -i.area):
        adj = " ".join(w for w in (_size(i), "" if same else i.colour) if w)
        parts.append(f"{text.article(adj)} {adj} one {position(i)}" if adj else f"one {position(i)}")
    return f"{head}, {text.join(parts)}"


def _sentence(s: str) -> str:
    return s[0].upper() + s[1:]


def describe(scene: "Scene", rng: random.Random | None = None) -> str:
    """The detailed description of `scene` (deterministic: its own rng from the image id)."""
    rng = rng or random.Random(f"detail-describe/{scene.image_id}")
    groups: dict[str, list] = {}
    for inst in scene.instances:
        groups.setdefault(inst.kind, []).append(inst)
    kinds = text.by_area(scene)
    if not kinds:
        return (f"The image shows a plain {scene.background} background with a few thin lines and dots. "
                "There are no objects in it, only some noise.")
    required: list[tuple[int, str]] = []  # (slot, sentence): objects, in area order
    optional: list[tuple[int, str]] = []  # relations first, then the theme and the count
    required.append((0, f"The image shows a {scene.background} background with {kind_phrase(kinds[0], groups[kinds[0]])}."))
    for j, kind in enumerate(kinds[1:], start=1):
        phrase = kind_phrase(kind, groups[kind])
        if rng.random() < 0.5:
            verb = "is" if len(groups[kind]) == 1 else "are"
            required.append((2 * j, f"There {verb} also {phrase}." if j > 1 else f"There {verb} {phrase}."))
        else:
            required.append((2 * j, f"I can also see {phrase}."))
        if rng.random() < 0.6:
            ref = rng.choice(kinds[:j])
            n = len(groups[kind])
            optional.append((2 * j + 1, f"The {_noun(kind, n)} {'is' if n == 1 else 'are'} "
                                        f"{relation(groups[kind], groups[ref])} the {_noun(ref, len(groups[ref]))}."))
    end = 2 * len(kinds)
    theme = next((s for group, s in THEMES if any(k in group for k in kinds)), None)
    if theme:
        optional.append((end, theme))
    n = len(scene.instances)
    optional.append((end + 1, f"Altogether there {'is' if n == 1 else 'are'} {NUMBERS.get(n, 'many')} "
                              f"object{'' if n == 1 else 's'} in the picture."))
    chosen = list(required)
    for item in optional:
        if _words(chosen + [item]) <= MAX_WORDS:
            chosen.append(item)
    if _words(chosen) < MIN_WORDS:
        chosen.append((end + 2, f"The {scene.background} background is plain, with a few thin lines and dots "
                                "and some noise."))
    return " ".join(_sentence(s) for _, s in sorted(chosen))


def _words(items: list[tuple[int, str]]) -> int:
    return sum(len(s.split()) for _, s in items)
