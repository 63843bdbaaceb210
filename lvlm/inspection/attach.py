"""Inspections attached to an evaluation report (`lvlm eval compare --inspect K`).

The first K distinct images of the run are inspected with every configuration that has
interventions (each inspection's baseline is the plain model); the pages go to
`<out>/inspect/<configuration>/<n>/index.html` and a section linking them is appended to the
report's Markdown. Items arrive as plain (key, image path, prompt) tuples, so this module knows
nothing of eval/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from lvlm_hallu.lvlm.inspection.api import inspect, write
from lvlm_hallu.lvlm.inspection.page import check_writable


def first_images(cases: Sequence[tuple[str, str | None, str]], k: int) -> list[tuple[str, str, str]]:
    """The first k cases with distinct images (POPE asks several questions per image)."""
    out, seen = [], set()
    for key, image, prompt in cases:
        if image is None or image in seen:
            continue
        seen.add(image)
        out.append((key, image, prompt))
        if len(out) == k:
            break
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def attach(pipe: Any, cases: Sequence[tuple[str, str | None, str]], configs: Sequence[tuple[str, Any]],
           out_dir: str | Path, markdown: str | Path | None, k: int, *, max_new_tokens: int = 64) -> list[dict]:
    """Inspect the first k images with each (name, spec) that has interventions; append links to
    `markdown` (the report). Returns one row per page: case key, configuration, page path, answers."""
    from lvlm_hallu.interventions import resolve

    root = check_writable(Path(out_dir) / "inspect")
    rows = []
    for name, spec in configs:
        if not resolve(spec):
            continue
        for n, (key, image, prompt) in enumerate(first_images(cases, k)):
            insp = inspect(pipe, image, prompt, spec, max_new_tokens=max_new_tokens)
            paths = write(insp, root / _slug(name) / str(n))
            rows.append({"key": key, "config": name, "page": paths["html"],
                         "baseline": insp.baseline.text.strip(), "intervened": insp.intervened.text.strip()})
    if markdown is not None and rows:
        base = Path(markdown).parent
        lines = ["", "## Inspections", "",
                 "Attention pictures of the first images (docs/inspect.md), without and with each configuration.", "",
                 "| item | configuration | answer without | answer with | page |", "|---|---|---|---|---|"]
        for r in rows:
            cells = [str(r["key"]), r["config"], r["baseline"], r["intervened"]]
            cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
            lines.append(f"| {' | '.join(cells)} | [index.html]({Path(r['page']).relative_to(base).as_posix()}) |")
        with open(markdown, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return rows
