"""Patch grids: where each image token of a prompt sits on the picture the vision tower saw.

A family supplies its grid from the processor outputs of one request (`GRIDS[family]`):
- llava (LLaVA-1.5, arXiv 2310.03744): one square grid of side = image_size / patch_size per image,
  in row-major order; the "full" feature strategy puts the CLS token first;
- llava_next (LLaVA-NeXT any-resolution): per image, the base tile (side x side) followed by the
  high-resolution tiles stitched into an (nph*side, npw*side) grid, cropped by transformers'
  `unpad_image` to the image's aspect ratio, each row followed by one newline token;
- llava_onevision (arXiv 2408.03326): LLaVA-NeXT's layout, the tiles bilinearly pooled to at most
  anyres_max_N base tiles; in a row with several images, each image is its base tile plus one
  newline token;
- qwen2_vl / qwen2_5_vl (dynamic resolution, arXiv 2409.12191): per image, the grid of merged
  patches (h / merge, w / merge) from its row of `image_grid_thw`, row-major, as the vision
  tower's patch merger emits it; no CLS and no newline tokens.

Tokens that sit on no patch (CLS, NeXT's newline tokens) are "other" tokens: their attention is
reported separately, so that the heat maps plus the other tokens sum to the visual mass.
The picture of a panel is rebuilt from `pixel_values` (normalization undone), so a heat map lies
on exactly the pixels its patches cover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from lvlm_hallu.lvlm.errors import LVLMError


class InspectError(LVLMError, ValueError):
    """An inspection that cannot be made (bad input, unwritable output, unknown patch layout)."""


class GridError(InspectError):
    """The patch layout of a request cannot be derived (unsupported family or mismatch)."""


@dataclass
class Panel:
    """One rectangular patch grid: `tokens[r, c]` is the image-token index of patch (r, c)."""

    name: str
    tokens: np.ndarray  # (rows, cols) int, index among the prompt's image tokens
    picture: Image.Image  # the pixels the grid covers, as the vision tower saw them

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape


@dataclass
class PatchGrid:
    panels: list[Panel]
    n_tokens: int  # image tokens of the prompt (every panel token plus the other tokens)

    @property
    def other(self) -> np.ndarray:
        """Indices of image tokens that lie on no patch (CLS, newline tokens)."""
        used = np.zeros(self.n_tokens, dtype=bool)
        for panel in self.panels:
            used[panel.tokens.ravel()] = True
        return np.flatnonzero(~used)

    def maps(self, values: np.ndarray) -> list[np.ndarray]:
        """(n_tokens,) per-token values -> one (rows, cols) map per panel."""
        values = np.asarray(values)
        if values.shape != (self.n_tokens,):
            raise GridError(f"expected {self.n_tokens} values (one per image token), got shape {values.shape}")
        return [values[panel.tokens] for panel in self.panels]


def _picture(pixels: torch.Tensor, processor: Any) -> Image.Image:
    """(3, S, S) normalized pixels -> the RGB image the vision tower saw."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
    x = (pixels.float().cpu() * std + mean).clamp(0, 1)  # (3, S, S) in [0, 1]
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def llava_grid(config: Any, processor: Any, batch: dict) -> tuple[list[Panel], int]:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    cls = 1 if config.vision_feature_select_strategy == "full" else 0
    pixels = batch["pixel_values"]  # (N, 3, S, S)
    panels, offset = [], 0
    for n in range(pixels.shape[0]):
        offset += cls
        tokens = offset + np.arange(side * side).reshape(side, side)
        panels.append(Panel(f"image {n + 1}" if pixels.shape[0] > 1 else "image", tokens, _picture(pixels[n], processor)))
        offset += side * side
    return panels, offset


def _tiles_panel(config: Any, processor: Any, pixels: torch.Tensor, image_size: list[int], offset: int, tag: str,
                 max_tiles: int | None = None) -> tuple[Panel | None, int]:
    """The any-resolution tiles of one image (LLaVA-NeXT, OneVision): (panel or None, next offset).

    The tiles' patches are stitched into an (nph*side, npw*side) grid, cropped by transformers'
    `unpad_image` to the image's aspect ratio and, with `max_tiles` (OneVision's anyres_max_N),
    pooled to int(rows / r) x int(cols / r) when r = sqrt(rows*cols / (N*side²)) > 1.1; each
    kept row ends with one newline token."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    side = size // patch
    nph, npw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, size)
    full = torch.arange(nph * side * npw * side).reshape(1, nph * side, npw * side)  # cell ids
    kept = unpad_image(full, image_size)[0]  # (rows, cols) cell ids that stay
    rows, cols = kept.shape
    if rows == 0 or cols == 0:  # an extreme aspect ratio leaves no patch after unpadding (newlines may remain)
        return None, offset + rows * (cols + 1)
    ratio = math.sqrt(rows * cols / (max_tiles * side**2)) if max_tiles else 1.0
    t_rows, t_cols = (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)  # token grid
    tokens = offset + np.arange(t_rows)[:, None] * (t_cols + 1) + np.arange(t_cols)[None, :]
    stitched = Image.new("RGB", (npw * size, nph * size))
    for t in range(nph * npw):
        stitched.paste(_picture(pixels[1 + t], processor), ((t % npw) * size, (t // npw) * size))
    r0, c0 = divmod(int(kept[0, 0]), npw * side)
    crop = stitched.crop((c0 * patch, r0 * patch, (c0 + cols) * patch, (r0 + rows) * patch))
    return Panel(f"tiles{tag}", tokens, crop), offset + t_rows * (t_cols + 1)


def llava_next_grid(config: Any, processor: Any, batch: dict) -> tuple[list[Panel], int]:
    side = config.vision_config.image_size // config.vision_config.patch_size
    if config.vision_feature_select_strategy == "full":
        raise GridError("llava_next with the 'full' feature strategy has no defined patch layout")
    pixels, sizes = batch["pixel_values"], batch["image_sizes"]  # (N, tiles, 3, S, S), (N, 2) (H, W)
    panels, offset = [], 0
    for n in range(pixels.shape[0]):
        tag = f" {n + 1}" if pixels.shape[0] > 1 else ""
        base = offset + np.arange(side * side).reshape(side, side)
        panels.append(Panel(f"base{tag}", base, _picture(pixels[n, 0], processor)))
        tiles, offset = _tiles_panel(config, processor, pixels[n], sizes[n].tolist(), offset + side * side, tag)
        panels += [tiles] if tiles is not None else []
    return panels, offset


def llava_onevision_grid(config: Any, processor: Any, batch: dict) -> tuple[list[Panel], int]:
    """LLaVA-OneVision (arXiv 2408.03326): per image, the base tile (SigLIP has no CLS, so both
    strategies give side x side patches) and LLaVA-NeXT's tiles pooled to at most
    `vision_aspect_ratio` = anyres_max_N base tiles; an image of a multi-image row
    (`batch_num_images` > 1) gets the base tile and one newline token only."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    if config.vision_feature_select_strategy == "full" and config.vision_config.model_type != "siglip_vision_model":
        raise GridError("llava_onevision with a CLS-token tower and the 'full' strategy has no defined patch layout")
    pixels, sizes = batch["pixel_values"], batch["image_sizes"]  # (N, tiles, 3, S, S), (N, 2) (H, W)
    counts = batch.get("batch_num_images")
    counts = [1] * pixels.shape[0] if counts is None else counts.tolist()
    single = [n == 1 for n in counts for _ in range(n)]  # per image: tiles or base only
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    panels, offset = [], 0
    for n in range(pixels.shape[0]):
        tag = f" {n + 1}" if pixels.shape[0] > 1 else ""
        base = offset + np.arange(side * side).reshape(side, side)
        panels.append(Panel(f"base{tag}", base, _picture(pixels[n, 0], processor)))
        offset += side * side
        if not single[n]:
            offset += 1  # the newline token after a multi-image row's base tile
            continue
        tiles, offset = _tiles_panel(config, processor, pixels[n], sizes[n].tolist(), offset, tag, max_tiles)
        panels += [tiles] if tiles is not None else []
    return panels, offset


def qwen2_vl_grid(config: Any, processor: Any, batch: dict) -> tuple[list[Panel], int]:
    merge = config.vision_config.spatial_merge_size
    patch = processor.image_processor.patch_size
    grids, pixels = batch["image_grid_thw"], batch["pixel_values"]  # (N, 3) (t, h, w); (Σ t·h·w, C·T·P·P)
    panels, offset, first = [], 0, 0
    for n, (t, h, w) in enumerate(grids.tolist()):
        if t != 1:
            raise GridError(f"image {n + 1} has {t} temporal patches; only still images have a patch grid")
        rows, cols = h // merge, w // merge
        tokens = offset + np.arange(rows * cols).reshape(rows, cols)
        # undo the processor's patch flattening: (h/m, w/m, m, m, C, T, P, P) -> (C, h·P, w·P), first frame
        flat = pixels[first : first + h * w].reshape(rows, cols, merge, merge, 3, -1, patch, patch)[:, :, :, :, :, 0]
        image = flat.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)
        panels.append(Panel(f"image {n + 1}" if grids.shape[0] > 1 else "image", tokens, _picture(image, processor)))
        offset, first = offset + rows * cols, first + h * w
    return panels, offset


# family -> (config, processor, processor outputs of ONE request) -> (panels, image tokens used)
GRIDS: dict[str, Callable[[Any, Any, dict], tuple[list[Panel], int]]] = {
    "llava": llava_grid,
    "llava_next": llava_next_grid,
    "llava_onevision": llava_onevision_grid,
    "qwen2_vl": qwen2_vl_grid,
    "qwen2_5_vl": qwen2_vl_grid,
}


def patch_grid(pipe: Any, batch: dict) -> PatchGrid:
    """The patch grid of the first row of a prepared batch (its images in prompt order)."""
    family = pipe.adapter.family
    build = GRIDS.get(family)
    if build is None:
        raise GridError(f"no patch grid for family {family!r}; families with one: {', '.join(sorted(GRIDS))}")
    n_tokens = int((batch["input_ids"][0] == pipe.facts.image_token_id).sum())
    if n_tokens == 0:
        return PatchGrid([], 0)
    one = {k: v[:1].cpu() if k == "input_ids" else v.cpu() for k, v in batch.items()}
    panels, used = build(pipe.model.config, pipe.processor, one)
    if used != n_tokens:
        raise GridError(f"the {family} patch grid accounts for {used} image tokens but the prompt has {n_tokens}")
    return PatchGrid(panels, n_tokens)
