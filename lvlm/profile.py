"""Per-model profile: constants the interventions need, computed once and cached on disk.

- `sink_dims` (VAR, arXiv 2503.03321): the residual dimensions in which sink tokens carry massive
  activations. Known backbones take the published values; any other backbone is calibrated: on a
  few inputs, the first (BOS) token's RMS-normalized magnitude |x[d]| / RMS(x) is taken per
  dimension at the inputs of layers 2..L−1; dimensions that are extreme (above τ = 20, or, for
  small models without such outliers, at least 8× the median dimension and ≥ 4) are sinks.
- `sink_counts`: the number of tokens with φ > τ per layer on the calibration inputs.
- `vhd_mean` (VHR, arXiv 2412.13949): mean head divergence per layer on the inputs.
The cache lives in `$LVLM_CACHE` (default `~/.cache/lvlm`)/profiles/<model>.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lvlm.engine import NoPlan
from lvlm.types import Request

PROFILE_VERSION = 2
CALIBRATION_PROMPTS = ("Describe this image.", "What objects are in the picture?")


def cache_path(pipe) -> Path:
    root = Path(os.environ.get("LVLM_CACHE", Path.home() / ".cache" / "lvlm"))
    digest = hashlib.sha256(pipe.model.config.to_json_string().encode()).hexdigest()[:12]
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in pipe.model_id)[-60:]
    return root / "profiles" / f"{slug}-{digest}.json"


def calibration_images(n: int = 3, size: int = 336) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    images = [Image.new("RGB", (size, size), (127, 127, 127))]
    images += [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n - 1)]
    return images


class _LayerInputs(NoPlan):
    """Records the first valid token's hidden state entering each layer (prefill)."""

    def __init__(self):
        self.first: dict[int, torch.Tensor] = {}
        self.all: dict[int, torch.Tensor] = {}

    def before_layer(self, engine, layer, state):
        rows = torch.arange(state.hidden.shape[0])
        self.first[layer] = state.hidden[rows, state.row_start.long()].float()  # (B, E)
        self.all[layer] = state.hidden.float()


def known_sink_dims(config) -> tuple[int, ...] | None:
    from interventions.var import KNOWN_SINK_DIMS

    text = config.text_config
    return KNOWN_SINK_DIMS.get((text.model_type, text.hidden_size, text.num_hidden_layers))


def compute(pipe, tau: float = 20.0) -> dict[str, Any]:
    requests = [Request(p, image, max_new_tokens=1) for image in calibration_images() for p in CALIBRATION_PROMPTS]
    batch = pipe.prepare(requests)
    recorder = _LayerInputs()
    pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), recorder)
    num_layers = pipe.facts.num_layers
    layers = [l for l in range(2, num_layers)] or list(range(num_layers))
    first = torch.stack([recorder.first[l] for l in layers])  # (L', B, E)
    normed = (first / first.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).abs()
    per_dim = normed.amax(dim=(0, 1))  # (E,)
    known = known_sink_dims(pipe.model.config)
    if known is not None:
        dims, source = list(known), "published"
    else:
        median = float(per_dim.median())
        extreme = (per_dim > tau) | ((per_dim >= 8 * median) & (per_dim >= 4.0))
        dims = sorted(torch.nonzero(extreme).flatten().tolist(), key=lambda d: -float(per_dim[d]))[:4]
        source = "calibrated"
    counts = {}
    if dims:
        from interventions.var import sink_scores

        valid = torch.arange(batch["input_ids"].shape[1])[None, :] >= (batch["attention_mask"] == 0).sum(-1)[:, None]
        for l in layers:
            phi = sink_scores(recorder.all[l], tuple(dims))
            counts[l] = round(float(((phi > tau) & valid).sum(-1).float().mean()), 2)
    return {
        "vhd_mean": vhd_statistics(pipe),
        "version": PROFILE_VERSION,
        "model_id": pipe.model_id,
        "sink_dims": dims,
        "sink_dims_source": source,
        "sink_dim_magnitude": {d: round(float(per_dim[d]), 2) for d in dims},
        "sink_counts": counts,
        "tau": tau,
    }


def vhd_statistics(pipe) -> dict[int, float]:
    """Mean head divergence per layer (VHR's VHD, all layers, no reinforcement) on the inputs."""
    from interventions.plan import build_plan
    from interventions.vhr import VHRConfig

    config = VHRConfig(alpha=1.0, layers=tuple(range(pipe.facts.num_layers)))
    requests = [Request(CALIBRATION_PROMPTS[0], image, max_new_tokens=1, interventions=(config,))
                for image in calibration_images()]
    plans = []

    def factory(facts, reqs):
        plans.append(build_plan(facts, reqs, profile={}))
        return plans[-1]

    pipe.generate(requests, plan_factory=factory)
    vhr = next(c for c in plans[0].components if c.name == "vhr")
    per_layer = {}
    for layer in range(pipe.facts.num_layers):
        values = [v for r in vhr.vhd for v in vhr.vhd[r].get(layer, [])]
        per_layer[layer] = round(float(np.mean(values)), 5) if values else 0.0
    return per_layer


def load_or_compute(pipe, *, refresh: bool = False) -> dict[str, Any]:
    path = cache_path(pipe)
    if path.exists() and not refresh:
        data = json.loads(path.read_text())
        if data.get("version") == PROFILE_VERSION:
            return data
    data = compute(pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return data
