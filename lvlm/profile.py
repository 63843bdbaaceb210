"""Per-model profile: constants the interventions need, computed once and cached on disk.

- `sink_dims` (VAR, arXiv 2503.03321): the residual dimensions in which sink tokens carry massive
  activations. Known backbones take the published values (interventions/defaults.py). Any other
  backbone is calibrated with the paper's own sink test, φ(x) = |x[d]| / RMS(x) > τ, applied to
  one dimension at a time on the first (BOS) token at the inputs of layers 2..L−1, with the
  width-scaled threshold τ_E = 20·√(E/4096) (φ ≤ √E, so τ = 20 is unreachable below E = 400).
  A dimension is a sink dimension when BOS is a sink through it alone in at least half of those
  layers (massive activations appear in an early layer and persist, Sun et al. 2024); the
  strongest `MAX_SINK_DIMS` by median magnitude are kept. BOS sees only itself (causal
  attention), so its hidden states do not depend on the calibration input; the inputs matter for
  the sink counts of the visual tokens.
- `tau`, `tau_source`: the threshold used (published 20 or scaled τ_E), `bos_phi_max`: the largest
  |x[d]| / RMS(x) of BOS per layer (the measured φ distribution), `visual_phi_max` /
  `visual_phi_dim`: the same over every image token of the calibration inputs and the dimension it
  is in (an outlier there is not a sink dimension by itself: the rule reads BOS), `sink_counts` /
  `visual_sink_counts`: tokens with φ > τ per layer (all, and image tokens only).
- `vhd_mean` (VHR, arXiv 2412.13949): mean head divergence per layer on the inputs.
- `tuned`: `lvlm tune`'s choices and search tables per method (eval/tune.py); kept when the rest
  of the profile is recomputed. `tuned_shipped` (not stored in the cache): tuned values shipped
  with the package for the embedded model (`SHIPPED_TUNED`), used only when the shipped file
  was written for the exact weights that are loaded (sha256 of model.safetensors).
The cache lives in `$LVLM_CACHE` (default `~/.cache/lvlm`)/profiles/<model>-<digest>.json, the digest covering
the model config and, for the embedded models (retrained in place), the weights; for a checkpoint
loaded from a local folder, the name, size and modification time of its weight files, so a
checkpoint rewritten in place gets a new profile instead of the old weights' sink dimensions and
tuned values; for a hub id, the commit of the cache snapshot its revision resolved to (a new
revision of the same id gets its own profile).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lvlm_hallu.lvlm.engine import NoPlan
from lvlm_hallu.lvlm.types import Request

PROFILE_VERSION = 4
CALIBRATION_PROMPTS = ("Describe this image.", "What objects are in the picture?")
MAX_SINK_DIMS = 4
PERSISTENCE = 0.5  # fraction of layers 2..L−1 in which BOS must be a sink through the dimension


def _shipped_paths() -> dict[str, Path]:
    from lvlm_hallu.lvlm.shapes import ASSETS, DETAIL_MODEL_DIR, MODEL_DIR

    return {"shapes": (ASSETS / "tuned.json", MODEL_DIR / "model.safetensors"),
            "shapes-detail": (ASSETS / "tuned-detail.json", DETAIL_MODEL_DIR / "model.safetensors")}


def shipped_models() -> list[str]:
    """Models whose package can ship tuned values (`lvlm tune --ship`)."""
    return sorted(_shipped_paths())


def cache_path(pipe) -> Path:
    """One file per model config, and per weights for the embedded models (retrained in place)."""
    root = Path(os.environ.get("LVLM_CACHE", Path.home() / ".cache" / "lvlm"))
    identity = pipe.model.config.to_json_string()
    paths = _shipped_paths().get(pipe.model_id)
    if paths is not None and paths[1].exists():
        identity += weights_digest(paths[1])
    elif os.path.isdir(pipe.model_id):
        identity += local_weights_stamp(Path(pipe.model_id))
    elif getattr(pipe, "snapshot", None) is not None:  # a hub id: the commit its revision resolved to
        identity += f"snapshot:{pipe.snapshot.name}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
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


def backbone(pipe):
    from lvlm_hallu.interventions.defaults import Backbone

    return Backbone.of_config(pipe.model.config)


def known_sink_dims(config) -> tuple[int, ...] | None:
    from lvlm_hallu.interventions.defaults import Backbone

    published = Backbone.of_config(config).published("var", "sink_dims")
    return tuple(published.value) if published else None


def select_sink_dims(normed: torch.Tensor, tau: float) -> list[int]:
    """(L', E) BOS |x[d]| / RMS(x) per VAR layer -> sink dimensions, strongest first (see module doc)."""
    layers = normed.shape[0]
    persistent = (normed > tau).sum(0) >= max(1, math.ceil(PERSISTENCE * layers))  # (E,)
    strength = normed.median(0).values  # (E,)
    dims = torch.nonzero(persistent).flatten().tolist()
    return sorted(dims, key=lambda d: -float(strength[d]))[:MAX_SINK_DIMS]


def compute(pipe) -> dict[str, Any]:
    from lvlm_hallu.interventions.defaults import sink_threshold
    from lvlm_hallu.interventions.var import phi, sink_scores

    requests = [Request(p, image, max_new_tokens=1) for image in calibration_images() for p in CALIBRATION_PROMPTS]
    batch = pipe.prepare(requests)
    recorder = _LayerInputs()
    pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), recorder)
    num_layers = pipe.facts.num_layers
    layers = [l for l in range(2, num_layers)] or list(range(num_layers))
    first = torch.stack([recorder.first[l] for l in layers])  # (L', B, E)
    normed = phi(first).amax(1)  # (L', E)
    model = backbone(pipe)
    tau, tau_source = sink_threshold(model)
    known = known_sink_dims(pipe.model.config)
    if known is not None:
        dims, source = list(known), "published"
    else:
        dims, source = select_sink_dims(normed, tau), "calibrated"
    counts, visual_counts = {}, {}
    visual = batch["input_ids"] == pipe.facts.image_token_id  # (B, T)
    visual_phi = {l: phi(recorder.all[l][visual.to(recorder.all[l].device)]).amax(0)
                  for l in layers} if visual.any() else {}  # (E,) per layer
    if dims:
        valid = torch.arange(batch["input_ids"].shape[1])[None, :] >= (batch["attention_mask"] == 0).sum(-1)[:, None]
        for l in layers:
            sink = (sink_scores(recorder.all[l], tuple(dims)) > tau) & valid  # (B, T)
            counts[l] = round(float(sink.sum(-1).float().mean()), 2)
            visual_counts[l] = round(float((sink & visual).sum(-1).float().mean()), 2)
    return {
        "vhd_mean": vhd_statistics(pipe),
        "version": PROFILE_VERSION,
        "model_id": pipe.model_id,
        "backbone": model.as_dict(),
        "sink_dims": dims,
        "sink_dims_source": source,
        "sink_dim_magnitude": {d: round(float(normed[:, d].max()), 2) for d in dims},
        "bos_phi_max": {l: round(float(normed[i].max()), 2) for i, l in enumerate(layers)},
        "visual_phi_max": {l: round(float(v.max()), 2) for l, v in visual_phi.items()},
        "visual_phi_dim": {l: int(v.argmax()) for l, v in visual_phi.items()},
        "sink_counts": counts,
        "visual_sink_counts": visual_counts,
        "tau": tau,
        "tau_source": tau_source,
    }


def vhd_statistics(pipe) -> dict[int, float]:
    """Mean head divergence per layer (VHR's VHD, all layers, no reinforcement) on the inputs."""
    from lvlm_hallu.interventions.vhr import VHRConfig

    config = VHRConfig(alpha=1.0, layers=tuple(range(pipe.facts.num_layers)), report_vhd=True)
    requests = [Request(CALIBRATION_PROMPTS[0], image, max_new_tokens=1, interventions=(config,))
                for image in calibration_images()]
    # the plan's own defaults would need this profile: build it without one
    from lvlm_hallu.interventions.plan import build_plan

    results = pipe.generate(requests, plan_factory=lambda facts, reqs: build_plan(facts, reqs, profile={}))
    per_layer = {}
    for layer in range(pipe.facts.num_layers):
        values = [v for r in results for v in r.report["vhr"]["vhd"].get(layer, [])]
        per_layer[layer] = round(float(np.mean(values)), 5) if values else 0.0
    return per_layer


# ---------------------------------------------------------------------------------------------
# The cache file, tuned values


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _write(path: Path, data: dict[str, Any]) -> None:
    # A temporary file of this writer's own, renamed over the profile: replicas that load one model
    # with one cache write the same profile at the same time (a shared name let one rename the
    # other's file away: FileNotFoundError).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps({k: v for k, v in data.items() if k != "tuned_shipped"}, indent=2, default=list))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def local_weights_stamp(folder: Path) -> str:
    """Name, size and mtime of a local checkpoint's weight files: cheap for a 7B folder, and
    changed by any rewrite (a copy without preserved times only costs a recomputed profile)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files)


def weights_digest(path: Path) -> str:
    path = Path(path)
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a replaced file hashes again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def shipped_tuned(pipe) -> dict[str, Any]:
    """{method: entry} shipped with the package for this model, or {} (none, or for other weights)."""
    return shipped_tuned_for(pipe.model_id)


def shipped_tuned_for(model_id: str | None) -> dict[str, Any]:
    paths = _shipped_paths().get(model_id)
    if paths is None or not paths[0].exists():
        return {}
    data = json.loads(paths[0].read_text())
    if data.get("weights_sha256") != weights_digest(paths[1]):
        warnings.warn(f"{paths[0]} was tuned for other weights of {model_id!r}; ignored "
                      f"(run `lvlm tune --model {model_id} ... --ship` again)", stacklevel=3)
        return {}
    return {m: {**entry, "shipped": True} for m, entry in (data.get("methods") or {}).items()}


def shipped_presets(model_id: str = "shapes") -> dict[str, dict[str, Any]]:
    """{method: {"paper": {...}, "tuned": {...} | None}} of an embedded model, from its config and
    its shipped tuned file, without loading the weights (for help texts)."""
    from lvlm_hallu.interventions import names
    from lvlm_hallu.interventions.defaults import Backbone, preset_values

    if model_id not in _shipped_paths():
        raise ValueError(f"no embedded model {model_id!r}; embedded: {', '.join(shipped_models())}")
    weights = _shipped_paths()[model_id][1]
    text = json.loads((weights.parent / "config.json").read_text())["text_config"]
    backbone = Backbone(text["model_type"], int(text["hidden_size"]), int(text["num_hidden_layers"]))
    profile = {"model_id": model_id, "tuned_shipped": shipped_tuned_for(model_id)}
    out = {}
    for method in names():
        values = preset_values(method, backbone, profile)
        if values["paper"] or values["tuned"]:
            out[method] = values
    return out


def load_or_compute(pipe, *, refresh: bool = False) -> dict[str, Any]:
    path = cache_path(pipe)
    data = _read(path)
    if data is None or data.get("version") != PROFILE_VERSION or refresh:
        tuned = (data or {}).get("tuned") or {}  # same file name = same model config: keep its search
        data = compute(pipe)
        if tuned:
            data["tuned"] = tuned
        _write(path, data)
    data["tuned_shipped"] = shipped_tuned(pipe)
    return data


def save_tuned(pipe, entries: dict[str, dict[str, Any]]) -> Path:
    """Store `lvlm tune` results ({method: entry}) in the model's profile; returns the file."""
    data = load_or_compute(pipe)
    data["tuned"] = {**(data.get("tuned") or {}), **entries}
    path = cache_path(pipe)
    _write(path, data)
    if hasattr(pipe, "_profile"):  # the pipeline's in-memory copy is now stale
        pipe._profile = None
    return path


def ship_tuned(pipe, entries: dict[str, dict[str, Any]]) -> Path:
    """Write the package's tuned values for the embedded model (they become its defaults).

    A search of some methods replaces theirs and keeps the other methods' shipped values when
    those were tuned for the same weights (values for other weights are dropped).
    """
    paths = _shipped_paths().get(pipe.model_id)
    if paths is None:
        raise ValueError(f"only the embedded models ({', '.join(_shipped_paths())}) ship tuned values; "
                         f"{pipe.model_id!r} keeps them in its profile ({cache_path(pipe)})")
    digest = weights_digest(paths[1])
    previous = _read(paths[0]) or {}
    kept = (previous.get("methods") or {}) if previous.get("weights_sha256") == digest else {}
    fresh = {m: {k: v for k, v in e.items() if k != "shipped"} for m, e in entries.items()}
    out = {"model_id": pipe.model_id, "weights_sha256": digest, "methods": {**kept, **fresh}}
    paths[0].write_text(json.dumps(out, indent=1, default=list) + "\n")
    if hasattr(pipe, "_profile"):
        pipe._profile = None
    return paths[0]
