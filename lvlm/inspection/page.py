"""Write an inspection: one PNG per picture, `data.json` with the numbers drawn, `index.html`.

The page shows the two answers token by token (tokens that differ between the runs are marked:
removed in the answer without interventions, added in the answer with them), the pictures, and
the intervention report. Every piece of text on the page is escaped.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lvlm_hallu.lvlm.inspection.figures import Picture
from lvlm_hallu.lvlm.inspection.grids import InspectError
from lvlm_hallu.lvlm.inspection.trace import Inspection

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 1em auto; color: #222; }
.answer { font-family: monospace; white-space: pre-wrap; background: #f6f6f6; padding: .5em; }
.del { background: #f8c8c8; text-decoration: line-through; }
.ins { background: #c8f0c8; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: .5em; overflow-x: auto; font-size: 80%; }
td, th { padding: 0 .6em; text-align: left; }
"""


def check_writable(out: str | Path) -> Path:
    """Create `out` if needed and prove that a file can be written there (before any model runs)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lvlm-inspect-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InspectError(f"cannot write to output directory {str(out)!r}: {err.strerror or err}") from err
    return out


def save_png(figure, path: Path, dpi: int) -> None:
    """A figure as a 256-colour PNG: a third of the RGBA file's size, the same picture to the eye."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as rgba:
        rgba.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def _answer_html(changes: list[dict], side: str) -> str:
    css = {"baseline": "del", "intervened": "ins"}[side]
    parts = []
    for change in changes:
        text = html.escape("".join(change[side]))
        parts.append(text if change["op"] == "equal" or not text else f'<span class="{css}">{text}</span>')
    return "".join(parts)


def render(insp: Inspection, pictures: list[Picture], files: dict[str, str]) -> str:
    changes = insp.token_changes()
    changed = sum(len(c["intervened"]) for c in changes if c["op"] != "equal")
    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in (
        ("model", f"{insp.model} ({insp.family}, {insp.num_layers} layers x {insp.num_heads} heads)"),
        ("prompt", insp.prompt), ("interventions", insp.interventions),
        ("heat-map layers", ", ".join(map(str, insp.layers))),
        ("backend", insp.intervened.report.get("attention_backend", "")),
    ))
    figs = "".join(
        f'<h2>{e(p.title)}</h2>\n<img src="{e(files[p.name])}" alt="{e(p.title)}">\n' for p in pictures
    )
    report = e(json.dumps(_jsonable(insp.intervened.report), indent=2))
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>lvlm inspect: {e(insp.interventions)}</title><style>{STYLE}</style></head>
<body>
<h1>Inspection: {e(insp.interventions)}</h1>
<table>{rows}</table>
<h2>Answers</h2>
<p>{changed} of {len(insp.intervened.tokens)} tokens of the answer with interventions differ from the answer without.</p>
<h3>without interventions</h3>
<div class="answer" id="answer-baseline">{_answer_html(changes, "baseline")}</div>
<h3>with {e(insp.interventions)}</h3>
<div class="answer" id="answer-intervened">{_answer_html(changes, "intervened")}</div>
{figs}<h2>Intervention report</h2>
<pre>{report}</pre>
<p><a href="data.json">data.json</a>: the numbers behind every picture.</p>
</body>
</html>
"""


def write(insp: Inspection, pictures: list[Picture], out: str | Path, *, dpi: int = 90) -> dict[str, Path]:
    """Write the PNGs, data.json and index.html into `out`; returns {name: path}."""
    out = check_writable(out)
    paths: dict[str, Path] = {}
    try:
        for p in pictures:
            paths[p.name] = out / f"{p.name}.png"
            save_png(p.figure, paths[p.name], dpi)
        data = {
            "model": insp.model, "family": insp.family, "prompt": insp.prompt, "interventions": insp.interventions,
            "num_layers": insp.num_layers, "num_heads": insp.num_heads, "layers": list(insp.layers),
            "answers": {"baseline": insp.baseline.text, "intervened": insp.intervened.text},
            "token_changes": insp.token_changes(), "report": insp.intervened.report,
            "pictures": {p.name: p.data for p in pictures},
        }
        paths["data"] = out / "data.json"
        paths["data"].write_text(json.dumps(_jsonable(data), indent=1))
        paths["html"] = out / "index.html"
        paths["html"].write_text(render(insp, pictures, {n: p.name for n, p in paths.items()}), encoding="utf-8")
    except OSError as err:
        raise InspectError(f"cannot write the inspection to {str(out)!r}: {err.strerror or err}") from err
    return paths
