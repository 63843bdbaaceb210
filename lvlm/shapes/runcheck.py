"""Does an unfinished run see yet? Its two auxiliary probes read on held-out training rows.

The object probe (train.ObjectProbe) scores the 13 kinds from the projected image tokens; while
the vision tower is blind its BCE equals that of the base rates and its mean AUC over kinds is
0.5. The question probe (train.QuestionProbe) answers yes/no at the asked word (chance BCE ln 2).
Rows come from an index range no run of the recipe reaches (FIRST), image rows only.

    python -m lvlm_hallu.lvlm.shapes.runcheck --run RUN [--n 64] [--preset detail] [--world detail]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from lvlm_hallu.lvlm.shapes import export, train, world

FIRST = 10_000_000


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float | None:
    """Probability that a positive scores above a negative (ties count half); None without both."""
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


@torch.no_grad()
def check(run: Path, n: int = 64, preset: str = "detail", world_name: str = "detail") -> dict:
    model, processor, step = export.load_run(run, preset)
    state = torch.load(Path(run) / "checkpoint.pt", map_location="cpu", weights_only=False)
    ids = [processor.tokenizer(" " + k, add_special_tokens=False)["input_ids"][0] for k in world.CATEGORIES]
    probe = train.ObjectProbe(model, len(world.CATEGORIES), "words", ids)
    probe.load_state_dict(state["probe"])
    qprobe = train.QuestionProbe(model.config.text_config.hidden_size, train.QUESTION_PROBE_LAYER)
    qprobe.load_state_dict(state["qprobe"])
    make = train.make_detail_example if world_name == "detail" else train.make_example
    batch = train.collate(processor, [make(FIRST + i) for i in range(n)])
    objects, word_pos, yes = (batch.pop(k) for k in ("objects", "word_pos", "answer_yes"))
    batch.pop("labels")
    out = model(**batch, output_hidden_states=True)
    f = probe.features  # (n, 64, H)
    scores = torch.einsum("bth,kh->btk", f, probe.embed(probe.word_ids)) * probe.scale
    logits = torch.logsumexp(scores, dim=1) - math.log(f.shape[1]) + probe.bias  # (n, 13)
    rate = objects.mean(0).clamp(1e-4, 1 - 1e-4)
    base = -(objects * rate.log() + (1 - objects) * (1 - rate).log()).mean()
    aucs = [a for k in range(objects.shape[1]) if (a := auc(objects[:, k], logits[:, k])) is not None]
    return {"step": step, "rows": n, "object_bce": round(float(torch.nn.functional.binary_cross_entropy_with_logits(
                logits, objects)), 4),
            "object_bce_base_rates": round(float(base), 4), "object_auc": round(sum(aucs) / len(aucs), 4),
            "probe_scale": round(float(probe.scale), 5),
            "question_bce": round(float(qprobe.loss(out.hidden_states, word_pos, yes)), 4),
            "questions": int((word_pos >= 0).sum())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--preset", default="detail")
    ap.add_argument("--world", default="detail", choices=["basic", "detail"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(check(args.run, args.n, args.preset, args.world)))


if __name__ == "__main__":
    main()
