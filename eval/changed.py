"""The answers a configuration changed, beside the baseline's, for reading (docs/evaluation.md).

A CHAIR comparison (`lvlm eval compare --benchmark chair`) writes `chair_<config>_details.json` per
configuration: every caption with its mentioned, hallucinated and recalled objects, and the caption
metrics of eval/mentions.py (repeats, overstated counts, words). A drop in CHAIR_s can come from a
metric's blind spot (an absent object swapped for a repeated present one, shorter answers), so the
changed answers are read beside the baseline's before a gain is claimed. This module lists them
and tallies, over every changed answer, which way each moved.

    python -m lvlm_hallu.eval.changed runs/eval/chair-... vhr-tuned [--baseline none] [-k 30]
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TALLIES = ("fewer hallucinated", "more hallucinated", "same hallucinated", "more repeats", "fewer repeats",
           "shorter by over 20 %", "more recalled", "fewer recalled")


@dataclass(frozen=True)
class Answer:
    """One caption as the comparison scored it."""

    caption: str
    present: tuple[str, ...]
    hallucinated: frozenset[str]
    recalled: frozenset[str]
    repeats: tuple[str, ...]
    overcounts: int
    words: int


def load_answers(folder: Path, config: str) -> dict[int, Answer]:
    """{image_id: Answer} from `chair_<config>_details.json` of a comparison folder (the
    configuration's name as the report shows it, e.g. "vhr:tuned")."""
    from lvlm_hallu.eval.compare import slug

    path = Path(folder) / f"chair_{slug(config)}_details.json"  # named as compare writes it
    if not path.is_file():
        found = sorted(p.name[len("chair_"):-len("_details.json")] for p in Path(folder).glob("chair_*_details.json"))
        raise FileNotFoundError(f"no {path.name} in {folder}; configurations there: {', '.join(found) or 'none'}")
    data = json.loads(path.read_text())
    mentions = {c["image_id"]: c for c in data["mentions"]["captions"]}
    out = {}
    for c in data["captions"]:
        m = mentions[c["image_id"]]
        out[c["image_id"]] = Answer(c["caption"].strip(), tuple(c["gt"]), frozenset(h[1] for h in c["hallucinated"]),
                                    frozenset(c["recalled"]), tuple(r[0] for r in m["repetitions"]),
                                    int(m["overcounts"]), int(m["words"]))
    return out


def tally(base: Answer, other: Answer) -> list[str]:
    """Which of TALLIES one changed answer counts toward."""
    marks = ["fewer hallucinated" if len(other.hallucinated) < len(base.hallucinated) else
             "more hallucinated" if len(other.hallucinated) > len(base.hallucinated) else "same hallucinated"]
    if len(other.repeats) > len(base.repeats):
        marks.append("more repeats")
    elif len(other.repeats) < len(base.repeats):
        marks.append("fewer repeats")
    if other.words < 0.8 * base.words:
        marks.append("shorter by over 20 %")
    if len(other.recalled) > len(base.recalled):
        marks.append("more recalled")
    elif len(other.recalled) < len(base.recalled):
        marks.append("fewer recalled")
    return marks


def changed(folder: Path, config: str, baseline: str = "none") -> dict[str, Any]:
    """The image ids whose answer differs from the baseline's, in id order, and the tallies over them."""
    base, other = load_answers(folder, baseline), load_answers(folder, config)
    if set(base) != set(other):
        raise ValueError(f"{config} and {baseline} answered different images; compare one run's configurations")
    ids = [i for i in sorted(base) if base[i].caption != other[i].caption]
    counts = dict.fromkeys(TALLIES, 0)
    for i in ids:
        for mark in tally(base[i], other[i]):
            counts[mark] += 1
    return {"config": config, "baseline": baseline, "images": len(base), "changed": ids, "tallies": counts,
            "answers": {i: (base[i], other[i]) for i in ids}}


def render(result: dict[str, Any], k: int = 30, width: int = 110) -> str:
    """The tallies, then the first `k` changed answers beside the baseline's."""
    lines = [f"{result['config']}: {len(result['changed'])} of {result['images']} answers differ from "
             f"{result['baseline']}'s",
             "over all of them: " + ", ".join(f"{name} {n}" for name, n in result["tallies"].items())]
    for i in result["changed"][:k]:
        base, other = result["answers"][i]
        lines += ["", f"image {i}: present {', '.join(base.present)}"]
        for name, a in ((result["baseline"], base), (result["config"], other)):
            lines.append(f"  [{name}] hallucinated {sorted(a.hallucinated) or '-'}; recalled {len(a.recalled)}; "
                         f"repeats {list(a.repeats) or '-'}; overcounts {a.overcounts}; {a.words} words")
            lines += textwrap.wrap(a.caption, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="output folder of `lvlm eval compare --benchmark chair`")
    ap.add_argument("config", help="configuration name, as in the report")
    ap.add_argument("--baseline", default="none")
    ap.add_argument("-k", type=int, default=30, help="changed answers to print [default: 30]")
    args = ap.parse_args(argv)
    try:
        print(render(changed(args.folder, args.config, args.baseline), args.k))
    except (FileNotFoundError, ValueError) as err:
        ap.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
