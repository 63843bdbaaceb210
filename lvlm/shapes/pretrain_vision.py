"""Stage 1 of the detailed model: the vision tower pretrained alone, the stand-in for CLIP.

A real LVLM never teaches its image encoder to see through the language loss: LLaVA takes CLIP
ViT-L/14, pretrained on 400M image-text pairs, and keeps it frozen (LLaVA-1.5, Liu et al. 2023,
sec. 3). The detailed world's joint run, whose tower started from random weights, stayed blind
for 1,000 steps (docs/shapes-world.md: object probe at chance). This module gives the tower what
CLIP gives LLaVA's: patch features that say what is where.

Objective, dense and supervised (the shapes world knows every object's box): each of the 8x8
patch tokens that the projector reads (the last layer's output, CLS dropped, as
`vision_feature_layer=-1`, strategy "default") predicts, through a linear head discarded after
training, which kinds (13) and which named colours (10) cover a quarter or more of its 12x12
pixels. Binary cross entropy over the 23 labels of every patch. Scenes come from the train split
of detail.py at indices from `--first` (default 5,000,000, a range the joint run never reaches).

    python -m lvlm_hallu.lvlm.shapes.pretrain_vision --out DIR [--steps 600] [--batch-size 64]

writes DIR/vision.pt (the tower's state dict, for train.py `--vision-from`), DIR/log.jsonl
(loss, per-kind mean AUC on held-back rows) and DIR/spent.json (budget.py's ledger: this stage's
time counts against the model's training budget).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lvlm_hallu.lvlm.shapes import detail, runcheck, world
from lvlm_hallu.lvlm.shapes import model as M
from lvlm_hallu.lvlm.shapes.budget import Ledger

PATCH = M.PATCH
GRID = world.IMAGE_SIZE // PATCH  # 8
COLOUR_NAMES = list(detail.COLOURS)
N_LABELS = len(world.CATEGORIES) + len(COLOUR_NAMES)
COVER = 0.25  # a label belongs to a patch its box covers a quarter of
FIRST = 5_000_000


def patch_labels(scene: world.Scene) -> np.ndarray:
    """(GRID*GRID, N_LABELS) 0/1: kinds then colours whose boxes cover >= COVER of each patch."""
    out = np.zeros((GRID, GRID, N_LABELS), dtype=np.float32)
    edges = np.arange(GRID + 1) * PATCH
    for inst in scene.instances:
        x, y, w, h = inst.bbox
        ox = np.clip(np.minimum(edges[1:], x + w) - np.maximum(edges[:-1], x), 0, None)  # (GRID,)
        oy = np.clip(np.minimum(edges[1:], y + h) - np.maximum(edges[:-1], y), 0, None)
        covered = np.outer(oy, ox) / PATCH ** 2 >= COVER  # (rows, cols)
        out[covered, world.CATEGORIES.index(inst.kind)] = 1.0
        colour = getattr(inst, "colour", "")
        if colour:
            out[covered, len(world.CATEGORIES) + COLOUR_NAMES.index(colour)] = 1.0
    return out.reshape(GRID * GRID, N_LABELS)


def batch(image_processor, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = [detail.make_scene("train", first + i) for i in range(n)]
    pixels = image_processor([img for _, img in scenes], return_tensors="pt")["pixel_values"]
    labels = torch.from_numpy(np.stack([patch_labels(s) for s, _ in scenes]))
    return pixels, labels


def patch_features(tower, pixels: torch.Tensor) -> torch.Tensor:
    """(B, GRID*GRID, hidden): what the LLaVA projector reads from this tower."""
    return tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


def mean_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over label columns that hold both classes of runcheck.auc (the rank AUC)."""
    aucs = [runcheck.auc(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    return float(np.mean([a for a in aucs if a is not None]))


def pretrain(out: Path, steps: int, batch_size: int, lr: float, seed: int, threads: int,
             first: int = FIRST, preset: str = "detail", log_every: int = 20) -> dict:
    from transformers import CLIPVisionModel

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    image_processor = M.build_image_processor()
    cfg = M.build_config(M.Preset.from_name(preset), vocab_size=8)
    tower = CLIPVisionModel(cfg.vision_config).train()
    head = torch.nn.Linear(cfg.vision_config.hidden_size, N_LABELS)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    held_pixels, held_labels = batch(image_processor, first - 256, 256)  # never trained on
    ledger = Ledger(out)
    log = (out / "log.jsonl").open("w")
    t0 = time.time()
    for step in tqdm(range(steps), desc="vision"):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        pixels, labels = batch(image_processor, first + step * batch_size, batch_size)
        logits = head(patch_features(tower, pixels))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        spent = ledger.write(step + 1)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rec = {"step": step + 1, "loss": round(loss.item(), 4), **spent.rounded()}
            if (step + 1) % (5 * log_every) == 0 or step + 1 == steps:
                with torch.no_grad():
                    tower.eval()
                    s = head(patch_features(tower, held_pixels)).flatten(0, 1)
                    tower.train()
                y = held_labels.flatten(0, 1)
                k = len(world.CATEGORIES)
                rec["kind_auc"] = round(mean_auc(s[:, :k], y[:, :k]), 4)
                rec["colour_auc"] = round(mean_auc(s[:, k:], y[:, k:]), 4)
            log.write(json.dumps(rec) + "\n")
            log.flush()
    log.close()
    tmp = out / "vision.pt.tmp"
    torch.save(tower.state_dict(), tmp)
    tmp.replace(out / "vision.pt")
    return {"steps": steps, "wall_s": time.time() - t0, "spent": ledger.now().rounded(), "last": rec}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=world.count, default=600)
    ap.add_argument("--batch-size", type=world.count, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=world.count, default=1)
    ap.add_argument("--first", type=world.count, default=FIRST, help="first train-split scene index")
    ap.add_argument("--preset", default="detail", help="model sizes (model.py presets)")
    args = ap.parse_args(argv)
    res = pretrain(args.out, args.steps, args.batch_size, args.lr, args.seed, args.threads, args.first, args.preset)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
