"""CARVE: contrastive attention refinement of the input image (Ge et al., arXiv 2509.06461).

CARVE edits the image, not the attention:
1. Two short greedy generations (≤ 32 tokens, stopping at EOS whatever the request's
   `ignore_eos`, top-p, seed, stop strings or log-probabilities), with the task question Q and
   with the general instruction G, read out A^{(l,t)}: the newest query row's head-mean attention over the visual
   keys at step t in layer l (the kernel's READOUT, with the KV cache; no attention matrix).
2. Contrast Â = A^Q / (A^G + λ), λ = 1e-8, over the steps both generations reached; fusion
   S = Σ_t w_t Σ_{l∈Lsel} grid(Â^{(l,t)}), w_t = t − t_start + 1, grid() = the image's real patch
   grid (the family's layout from the processor: LLaVA-1.5's 24×24; LLaVA-NeXT's and OneVision's
   any-resolution tiles unpadded to the image's aspect ratio (OneVision's pooled); Qwen2-VL's
   (h/2)×(w/2) merged patches from `image_grid_thw`) resized bilinearly to the image;
   Lsel = layers 20..25 of a 32-layer backbone, scaled by depth.
3. Mask: the top 20 % of pixels, connected components, keep the max(K_min = 3, ⌊#regions·p⌋)
   regions with the largest attention sum, zero the rest, crop to their bounding box, upscale
   (aspect kept, Lanczos) by the larger of the two ratios to the model's input size (the tower's
   square input; a dynamic-resolution tower's input is the image's own size), as the official
   code does; upscale only: a crop larger than that target keeps its size (on any-resolution
   families the target is the base tile, and shrinking to it would throw away the tiles' detail).
4. Final answer to Q with the refined image (paper) or with the original and refined images
   together (released code): `mode` = "paper" | "code". The released code appends "Answer the
   question using a single word or phrase." to Q and G (`answer_suffix`, on in code mode).
The pipeline reaches this module through a narrow protocol: `generate(requests, plan_factory=)`,
`image_grid(request)` (the first image's patch grid as image-token indices), `image_input_size()`
and `facts`; nothing of `lvlm/` is imported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from lvlm_hallu.interventions.defaults import Backbone, Default, round_half_up
from lvlm_hallu.interventions.plan import BatchPlan, Component
from lvlm_hallu.interventions.registry import InterventionError, index_tuple, register
from lvlm_hallu.kernels.edits import KEY_VISUAL

GENERAL_PROMPT = "Write a general description of the image."
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."  # the released code's, on Q and G
MODES = ("paper", "code")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Layers 20..25 for 28–32-layer backbones, scaled proportionally for other depths."""
    if 28 <= num_layers <= 32:
        return tuple(range(20, 26))
    lo, hi = round_half_up(20 * num_layers / 32), round_half_up(25 * num_layers / 32)
    return tuple(range(min(lo, num_layers - 1), min(hi, num_layers - 1) + 1))


def layers_default(backbone: Backbone) -> Default:
    """Published for the 28–32-layer backbones of the paper, scaled by depth otherwise."""
    published = backbone.published("carve", "layers")
    if published is not None:
        return published
    return Default(default_layers(backbone.num_layers), "published" if 28 <= backbone.num_layers <= 32 else "scaled")


@register("carve", paper="arXiv 2509.06461 (Ge et al.)", order=90,
          summary="contrast task vs general attention to crop the image to the relevant regions, then re-ask")
@dataclass(frozen=True)
class CARVEConfig:
    max_steps: int = field(default=32, metadata={
        "doc": "most tokens of each read-out generation (greedy, stops at EOS)"})
    general_prompt: str = field(default=GENERAL_PROMPT, metadata={"doc": "the general instruction G"})
    lam: float = field(default=1e-8, metadata={"doc": "lambda in A^Q / (A^G + lambda)"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"doc": "read-out layers; default 20..25 of 32, scaled"})
    top_p: float = field(default=0.2, metadata={"doc": "fraction of pixels kept before connected components"})
    k_min: int = field(default=3, metadata={"doc": "minimum number of regions kept"})
    mode: str = field(default="paper", metadata={"doc": "paper: refined image only; code: original + refined"})
    answer_suffix: bool | None = field(default=None, metadata={
        "doc": "append 'Answer the question using a single word or phrase.' to Q and G (the released code); "
               "default: on in code mode, off in paper mode"})
    preset: str = field(default="default", metadata={"doc": "default | paper (no tuned values: CARVE is not searched)"})

    def __post_init__(self):
        if not isinstance(self.general_prompt, str) or not self.general_prompt.strip():
            raise InterventionError(f"carve: general_prompt must be a non-empty instruction, got {self.general_prompt!r}",
                                    param="interventions.carve.general_prompt")
        if not isinstance(self.max_steps, int) or not 1 <= self.max_steps <= 256:
            raise ValueError(f"max_steps must be an integer in [1, 256], got {self.max_steps!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.k_min, int) or self.k_min < 1:
            raise ValueError(f"k_min must be an integer >= 1, got {self.k_min!r}")
        if not isinstance(self.lam, (int, float)) or self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", index_tuple(self.layers, "carve", "layers"))
        if self.answer_suffix is not None and not isinstance(self.answer_suffix, bool):
            raise ValueError(f"answer_suffix must be true or false, got {self.answer_suffix!r}")
        if self.preset == "tuned":
            raise ValueError("carve has no tuned values (`lvlm tune` does not search CARVE); use preset 'paper'")

    def readout_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else default_layers(num_layers)
        bad = [l for l in layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"carve: layers {bad} outside the model's 0..{num_layers - 1}")
        return layers

    def suffix(self) -> str:
        """What Q and G get appended: the released code's answer instruction in code mode."""
        on = self.mode == "code" if self.answer_suffix is None else self.answer_suffix
        return ANSWER_SUFFIX if on else ""


class Readout(Component):
    """Collects A^{(l,t)} for every main row: {request: [step][layer] -> (|V|,) fp32}."""

    name = "carve-readout"

    def __init__(self, layers: Sequence[int]):
        self.layers = set(layers)
        self.maps: dict[int, list[dict[int, torch.Tensor]]] = {}
        self._step_of: dict[int, int] = {}

    def contribute(self, plan, layer, state, fields):
        if layer in self.layers:
            fields["readout"] = True

    def after_attention(self, plan, layer, state, out, readout):
        if readout is None or layer not in self.layers:
            return out
        cls = plan.key_class(layer, state)
        for b, (r, is_twin) in enumerate(zip(plan.rows, plan.twin)):
            if is_twin:
                continue
            steps = self.maps.setdefault(r, [])
            if layer == min(self.layers):
                steps.append({})
            steps[-1][layer] = readout[b][(cls[b] & KEY_VISUAL) != 0].float().cpu()
        return out


def fuse(maps_q: list[dict[int, torch.Tensor]], maps_g: list[dict[int, torch.Tensor]], *, grid: np.ndarray,
         size: tuple[int, int], lam: float) -> np.ndarray:
    """S (H, W) float: time-weighted sum over steps and layers of grid(A^Q / (A^G + λ)).

    `grid` (rows, cols) int: the visual-key index of each patch of the image (its real layout)."""
    width, height = size
    total = torch.zeros(1, 1, height, width)
    index = torch.as_tensor(np.asarray(grid), dtype=torch.long)  # (rows, cols)
    steps = min(len(maps_q), len(maps_g))
    for t in range(steps):
        w_t = t + 1  # t_start = 0: later steps weigh more
        for layer, a_q in maps_q[t].items():
            contrast = a_q[index] / (maps_g[t][layer][index] + lam)  # (rows, cols)
            grid_map = contrast[None, None]
            total += w_t * torch.nn.functional.interpolate(grid_map, size=(height, width), mode="bilinear", align_corners=False)
    return total[0, 0].numpy()


def select_regions(score: np.ndarray, *, top_p: float, k_min: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(H, W) score -> connected regions of the top-p pixels (H, W) int (0 = background), their
    count, and the labels kept: the max(k_min, ⌊count·p⌋) regions with the largest score sum."""
    threshold = np.quantile(score, 1.0 - top_p)
    regions, count = ndimage.label(score >= threshold)
    if count == 0:
        return regions, 0, np.zeros(0, dtype=int)
    sums = ndimage.sum(score, regions, index=np.arange(1, count + 1))
    n_keep = max(k_min, int(count * top_p))
    return regions, int(count), np.argsort(sums)[::-1][:n_keep] + 1


def refine_image(image: Image.Image, score: np.ndarray, *, top_p: float, k_min: int,
                 target: tuple[int, int] | None = None) -> tuple[Image.Image, dict]:
    """Keep the top-p pixels' strongest regions, zero the rest, crop, and upscale (Lanczos, aspect
    kept) by the larger of the two ratios to `target` (width, height; default the image's size):
    the crop then covers the target in both directions, as the official code's max does. Never a
    factor below 1: a crop already as large as the target keeps its own size (LLaVA-NeXT's base
    tile must not shrink a 64x48 crop to 43x32). A mask that keeps every pixel returns the image
    unchanged, so top_p = 1 is neutral."""
    regions, count, kept = select_regions(score, top_p=top_p, k_min=k_min)
    if count == 0:
        return image, {"regions": 0, "kept": 0, "box": [0, 0, image.width, image.height]}
    keep = np.isin(regions, kept)
    if keep.all():  # nothing masked or cropped (top_p = 1): the refined image is the image itself
        return image, {"regions": int(count), "kept": int(len(kept)), "box": [0, 0, image.width, image.height],
                       "mask_fraction": 1.0}
    ys, xs = np.nonzero(keep)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~keep] = 0
    crop = Image.fromarray(pixels).crop(box)
    width, height = target or image.size
    factor = max(1.0, width / crop.width, height / crop.height)  # upscale only
    refined = crop.resize((max(1, round(crop.width * factor)), max(1, round(crop.height * factor))), Image.LANCZOS)
    return refined, {"regions": int(count), "kept": int(len(kept)), "box": list(box),
                     "mask_fraction": round(float(keep.mean()), 4)}


def refine_requests(pipe: Any, requests: Sequence[Any], *, collect: dict[int, dict] | None = None
                    ) -> tuple[list[Any], list[dict[str, Any]]]:
    """Replace the image of every CARVE request by its refined image (or image pair).

    `collect` (lvlm.inspection) receives, per CARVE request, the fused contrast map S, its
    regions and kept labels, and the refined image."""
    facts = pipe.facts
    requests = list(requests)
    reports: list[dict[str, Any]] = [{} for _ in requests]
    jobs = []
    for i, request in enumerate(requests):
        config = next((c for c in request.interventions if c.name == "carve"), None)
        if config is None:
            continue
        if request.image is None:
            raise InterventionError("carve needs an image: it refines the input image", param="interventions.carve")
        jobs.append((i, config))
    if not jobs:
        return requests, reports
    t0 = time.perf_counter()
    layers = sorted({l for _, c in jobs for l in c.readout_layers(facts.num_layers)})
    probes = []
    for i, config in jobs:
        # The read-out probes are CARVE's own short greedy generations: nothing of the request's
        # decoding carries over (an `ignore_eos` benchmark request would make them run on past EOS).
        base = replace(requests[i], prompt=requests[i].prompt + config.suffix(), interventions=(),
                       max_new_tokens=config.max_steps, temperature=0.0, top_p=1.0, seed=None, stop=(),
                       ignore_eos=False, logprobs=None)
        probes += [base, replace(base, prompt=config.general_prompt + config.suffix())]
    readout = Readout(layers)

    def plan_factory(facts_, reqs):
        plan = BatchPlan(facts_, reqs)
        plan.components.append(readout)
        return plan

    pipe.generate(probes, plan_factory=plan_factory)
    for n, (i, config) in enumerate(jobs):
        own = set(config.readout_layers(facts.num_layers))
        pick = lambda maps: [{l: a for l, a in step.items() if l in own} for step in maps]
        image = requests[i].image
        score = fuse(pick(readout.maps.get(2 * n, [])), pick(readout.maps.get(2 * n + 1, [])),
                     grid=pipe.image_grid(requests[i]), size=image.size, lam=config.lam)
        refined, info = refine_image(image, score, top_p=config.top_p, k_min=config.k_min,
                                     target=pipe.image_input_size())
        if collect is not None:
            regions, _, kept = select_regions(score, top_p=config.top_p, k_min=config.k_min)
            collect[i] = {"score": score, "regions": regions, "kept": kept, "refined": refined, "image": image}
        new_image = refined if config.mode == "paper" else [image, refined]
        others = tuple(c for c in requests[i].interventions if c.name != "carve")
        requests[i] = replace(requests[i], prompt=requests[i].prompt + config.suffix(), image=new_image,
                              interventions=others)
        source = "request" if config.layers is not None else layers_default(Backbone(None, facts.hidden_size, facts.num_layers)).source
        reports[i]["carve"] = {"mode": config.mode, "layers": sorted(own), "extra_passes": 2, **info,
                               "answer_suffix": bool(config.suffix()), "refined_size": list(refined.size),
                               "preset": config.preset, "sources": {"layers": source}}
    added = 1000.0 * (time.perf_counter() - t0)
    for i, _ in jobs:
        reports[i]["added_ms"] = reports[i].get("added_ms", 0.0) + added
    return requests, reports
