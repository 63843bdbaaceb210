"""A training run's checkpoint as a model folder, so an unfinished run can be measured mid-way.

A run folder (train.py) holds processor/ and checkpoint.pt (model, probes, optimizer, step); a
finished run also holds model/. `load_run` rebuilds the LLaVA model of `preset` with the run's
tokenizer and the checkpoint's weights (the probes are not part of the model); `export` writes it
as a Hugging Face folder like model/, which `lvlm profile`, `lvlm eval --model DIR` and
quality.py read.

    python -m lvlm_hallu.lvlm.shapes.export --run RUN --out DIR [--preset detail]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lvlm_hallu.lvlm.shapes import model as M


def load_run(run: Path, preset: str = "detail"):
    """(model, processor, step) from a run's checkpoint, model in eval mode."""
    from transformers import LlavaProcessor

    run = Path(run)
    ckpt = run / "checkpoint.pt"
    if not (ckpt.exists() and (run / "processor").is_dir()):
        raise FileNotFoundError(f"{run}: not a training run (checkpoint.pt and processor/ expected)")
    processor = LlavaProcessor.from_pretrained(run / "processor")
    model = M.build_model(M.Preset.from_name(preset), processor.tokenizer)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return model.eval(), processor, int(state["step"])


def export(run: Path, out: Path, preset: str = "detail") -> int:
    """Write the run's checkpoint to `out` as a model folder; returns its step."""
    model, processor, step = load_run(run, preset)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="detail", help="the run's model sizes (model.py presets)")
    args = ap.parse_args(argv)
    step = export(args.run, args.out, args.preset)
    print(f"wrote the checkpoint of step {step} to {args.out}")


if __name__ == "__main__":
    main()
