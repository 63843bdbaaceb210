"""Model-aware defaults of the interventions, and where each resolved value came from.

A parameter the request leaves unset (None in the config) is filled at plan time, when the model
is known, from one of these sources (reported per parameter in the intervention report):

- `published`: the paper's own constant, either model-independent (VHR α = 2, PAI α = 0.2 on
  layers [2, L), VAR p = 0.4 and ρ = 0.5) or stated for this backbone (LLaVA-1.5-7B: VHR layers
  {1} ∪ 18..31; VAR τ = 20 and D_sink = {1415, 2533}; see `PUBLISHED_BACKBONES`);
- `scaled`: the paper's rule carried to another depth or width (docs/interventions.md,
  docs/methods.md "VHR" and "VAR"): VHR band {1} ∪ the last round(14·L/32) layers; VAR
  τ_E = 20·√(E/4096), the same fraction of φ's bound √E as τ = 20 on a 4096-wide model;
  CARVE read-out layers 20..25 of 32 scaled by depth; VTE exit after layer L // 2;
- `tuned`: found by `lvlm tune` on a validation split and stored in the model's profile
  (`profile["tuned"]`), or shipped with the package for the embedded model
  (`profile["tuned_shipped"]`, which are also that model's defaults);
- `request`: set explicitly by the request;
- `calibrated`: VAR's sink dimensions discovered by `lvlm profile` for an unpublished backbone.

Presets select the source per method: "default" (shipped tuned values if the package ships them
for this model, else the paper's), "paper" (published or scaled only) and "tuned" (the model's
tuned values; an InterventionError when it has none). A request names them as
`{"name": "vhr", "preset": "tuned"}` or in a preset string, "vhr:tuned+pai:paper".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from lvlm_hallu.interventions.registry import PRESETS, InterventionError

SOURCES = ("published", "scaled", "tuned", "request", "calibrated")

# Backbones with published constants, keyed by (text model_type, hidden size E, layers L).
PUBLISHED_BACKBONES: dict[tuple[str, int, int], dict[str, Any]] = {
    ("llama", 4096, 32): {
        "model": "LLaVA-1.5-7B (Llama-2-7B / Vicuna-7B backbone)",
        "vhr": {"layers": (1, *range(18, 32))},  # He et al.: {1} ∪ last 14
        "var": {"tau": 20.0, "sink_dims": (1415, 2533)},  # Kang et al.
        "carve": {"layers": tuple(range(20, 26))},  # Ge et al.
    },
    ("llama", 5120, 40): {
        "model": "LLaVA-1.5-13B / LLaVA-1.6-vicuna-13B (Llama-2-13B backbone)",
        "var": {"tau": 20.0, "sink_dims": (2100, 4743)},
    },
    # transformers names Qwen2-VL's text model "qwen2_vl_text"; a plain "qwen2" 3584 x 28 backbone is
    # Qwen2-7B (LLaVA-OneVision-7B), and Qwen2.5-VL-7B ("qwen2_5_vl_text") has no published dims:
    # both calibrate.
    ("qwen2_vl_text", 3584, 28): {
        "model": "Qwen2-VL-7B",
        "var": {"tau": 20.0, "sink_dims": (458, 2570)},
        "carve": {"layers": tuple(range(20, 26))},
    },
}

# The width on which VAR's τ = 20 was set (LLaVA-1.5-7B), for the scaled threshold.
VAR_REFERENCE_WIDTH = 4096
VAR_REFERENCE_TAU = 20.0


class Default(NamedTuple):
    value: Any
    source: str


def round_half_up(x: float) -> int:
    """round() with halves up (Python's round(2.5) == 2 would make depth rules uneven)."""
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class Backbone:
    """What defaults depend on: the language model's family, width E and depth L."""

    model_type: str | None
    hidden_size: int
    num_layers: int

    @classmethod
    def of(cls, facts: Any, profile: Mapping[str, Any] | None = None) -> "Backbone":
        """From the engine's ModelFacts, with the model type recorded in the profile (if any)."""
        recorded = (profile or {}).get("backbone") or {}
        return cls(recorded.get("model_type"), int(facts.hidden_size), int(facts.num_layers))

    @classmethod
    def of_config(cls, config: Any) -> "Backbone":
        text = getattr(config, "text_config", config)
        return cls(text.model_type, int(text.hidden_size), int(text.num_hidden_layers))

    @property
    def key(self) -> tuple[str | None, int, int]:
        return (self.model_type, self.hidden_size, self.num_layers)

    def published(self, method: str, param: str) -> Default | None:
        """The paper's constant for this exact backbone, or None when it is not published."""
        entry = PUBLISHED_BACKBONES.get(self.key, {}).get(method, {})
        return Default(entry[param], "published") if param in entry else None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sink_threshold(backbone: Backbone) -> Default:
    """VAR's τ: 20 on published backbones, else τ_E = 20·√(E/4096) (φ ≤ √E, docs/methods.md "VAR", step 2)."""
    published = backbone.published("var", "tau")
    if published is not None:
        return published
    tau = VAR_REFERENCE_TAU * math.sqrt(backbone.hidden_size / VAR_REFERENCE_WIDTH)
    return Default(round(tau, 4), "scaled")


def paper_defaults(config_cls: type, backbone: Backbone) -> dict[str, Default]:
    """{param: (value, source)} of a method's model-aware parameters; {} for a method without."""
    fn = getattr(config_cls, "paper_defaults", None)
    return dict(fn(backbone)) if fn is not None else {}


# ---------------------------------------------------------------------------------------------
# Tuned values in a profile


def tuned_entry(profile: Mapping[str, Any], method: str, preset: str) -> dict[str, Any] | None:
    """The tuned entry a preset uses: "tuned" takes the model's own search, else the shipped one;
    "default" takes only what the package ships; "paper" never uses tuned values."""
    own = (profile.get("tuned") or {}).get(method)
    shipped = (profile.get("tuned_shipped") or {}).get(method)
    if preset == "tuned":
        return own or shipped
    if preset == "default":
        return shipped
    return None


def _coerce(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def apply(config: Any, backbone: Backbone, profile: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Fill a config's unset model-aware parameters; returns (config, {"preset", "sources"}).

    Raises InterventionError for preset "tuned" on a model without tuned values for the method.
    """
    name = getattr(config, "name", type(config).__name__)
    paper = paper_defaults(type(config), backbone)
    preset = getattr(config, "preset", "default")
    if not paper and preset == "default":
        return config, {}
    tuned = tuned_entry(profile, name, preset)
    if preset == "tuned" and tuned is None:
        model = profile.get("model_id") or "this model"
        raise InterventionError(
            f"{name}: no tuned values for {model}; run `lvlm tune --model {model} --methods {name}` "
            f"on a validation split, or use preset 'paper'", param=f"interventions.{name}.preset")
    if preset == "tuned" and tuned.get("params") is None:
        model = profile.get("model_id") or "this model"
        raise InterventionError(
            f"{name}: the last `lvlm tune` search on {model} found no setting within its constraints "
            f"(its table is in the model profile); use preset 'paper' or tune again", param=f"interventions.{name}.preset")
    tuned_params = dict((tuned or {}).get("params") or {})
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for param, default in paper.items():
        if getattr(config, param) is not None:
            sources[param] = "request"
        elif param in tuned_params:
            values[param], sources[param] = _coerce(tuned_params[param]), "tuned"
        else:
            values[param], sources[param] = default.value, default.source
    try:
        resolved = dataclasses.replace(config, **values) if values else config
    except (TypeError, ValueError) as err:  # a hand-edited profile with an invalid tuned value
        raise InterventionError(f"{name}: invalid {preset} value in the model profile: {err}",
                                param=f"interventions.{name}.preset") from err
    return resolved, {"preset": preset, "sources": sources}


def resolve_requests(facts: Any, requests: Sequence[Any], profile: Mapping[str, Any] | None
                     ) -> tuple[list[Any], list[dict[str, dict[str, Any]]]]:
    """Every request's configs with model-aware values filled, and {method: provenance} per request."""
    profile = profile or {}
    backbone = Backbone.of(facts, profile)
    out, provenance = [], []
    for request in requests:
        configs, prov = [], {}
        for config in request.interventions:
            resolved, info = apply(config, backbone, profile)
            configs.append(resolved)
            if info:
                prov[resolved.name] = info
        out.append(dataclasses.replace(request, interventions=tuple(configs)) if prov else request)
        provenance.append(prov)
    return out, provenance


def describe(configs: Sequence[Any], facts: Any, profile: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Configs as the model will run them: every parameter with its model-aware value filled, and
    the sources (for run fingerprints and reports: a re-shipped tuned file changes the values)."""
    backbone = Backbone.of(facts, profile or {})
    out = []
    for config in configs:
        resolved, info = apply(config, backbone, profile or {})
        out.append({"name": resolved.name, **dataclasses.asdict(resolved), **info})
    return out


def preset_values(method: str, backbone: Backbone, profile: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"paper": {param: value}, "tuned": {param: value} | None} for catalogs and docs."""
    from lvlm_hallu.interventions.registry import entry

    paper = {k: d.value for k, d in paper_defaults(entry(method).config, backbone).items()}
    tuned = tuned_entry(profile, method, "tuned")
    # A search that found no feasible setting stores params None (a tuned request is then refused).
    return {"paper": paper, "tuned": dict(tuned["params"]) if tuned and tuned.get("params") is not None else None}


__all__ = ["PRESETS", "SOURCES", "PUBLISHED_BACKBONES", "Backbone", "Default", "apply", "describe", "paper_defaults",
           "preset_values", "resolve_requests", "round_half_up", "sink_threshold", "tuned_entry"]
