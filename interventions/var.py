"""VAR: Visual Attention Redistribution (Kang et al., ICLR 2025, arXiv 2503.03321).

Sink tokens carry massive activations in a few residual dimensions D_sink. At prefill, for
layers 2..L−1, a key j is a sink of layer l when φ(x_j) = max_{d∈D_sink} |x_j[d] / RMS(x_j)| > τ
on the hidden state entering layer l (fp32, RMS without the norm weight). The sink sets are
frozen for decoding. In every forward, a text query row after the image is "image-centric" in a
head when its visual attention A_V ≥ 0.2 and its sink share (weight on visual sinks / A_V) is at
most 1 − ρ; such a row gives the fraction p of its sink attention to the non-sink visual keys,
in proportion to their weights (kernels: SINK_REDIST).

Parameter convention: p is the fraction recycled and ρ the minimum non-sink visual ratio, as in
the paper. The released code's `p` and `rho` mean 1−p and 1−ρ (confirmed by the authors): its
shipped p = 0.6 recycles 40 %, our default p = 0.4. `VARConfig.from_code_convention` converts.
Layers 0 and 1 are never modified; the paper excludes the last layer (default 2..L−2). As in the
official code (HeadFork in VisAttnSink), a layer whose sink set holds no visual sink is left
unmodified: BOS/text-sink attention is not redistributed there (`require_visual_sink=False`
gives the other reading of the paper).

Defaults (interventions/defaults.py): p = 0.4, ρ = 0.5 (published); τ = 20 on published
backbones, else τ_E = 20·√(E/4096) (scaled: φ ≤ √E, so τ = 20 could never fire on a narrow model);
D_sink published (LLaVA-1.5-7B {1415, 2533}) or calibrated by `lvlm profile` (lvlm/profile.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lvlm_hallu.interventions.defaults import PUBLISHED_BACKBONES, Backbone, Default, sink_threshold
from lvlm_hallu.interventions.plan import BatchPlan, Component, Stopwatch
from lvlm_hallu.interventions.registry import index_tuple, register
from lvlm_hallu.kernels.edits import KEY_SINK, KEY_VISUAL

# Sink dimensions reported by Kang et al. per backbone: (model_type, hidden, layers) -> D_sink.
KNOWN_SINK_DIMS: dict[tuple[str, int, int], tuple[int, ...]] = {
    key: entry["var"]["sink_dims"] for key, entry in PUBLISHED_BACKBONES.items() if "sink_dims" in entry.get("var", {})
}


def phi(hidden: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """|x[d] / RMS(x)| per dimension in fp32, RMS without the norm weight: (..., E) -> (..., E),
    or (..., len(dims)) for the dimensions `dims` only."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # (..., 1)
    return ((x if dims is None else x[..., list(dims)]) / rms).abs()


def sink_scores(hidden: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """φ per token: (B, T, E) -> (B, T) fp32, max over D_sink of |x[d] / RMS(x)|."""
    return phi(hidden, dims).amax(-1)


def _unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@register("var", paper="arXiv 2503.03321 (Kang et al., ICLR 2025)", order=20,
          summary="recycle attention from visual sinks to the other image tokens in image-centric heads")
@dataclass(frozen=True)
class VARConfig:
    PAPER: ClassVar[dict] = {"p": 0.4, "rho": 0.5}

    p: float | None = field(default=None, metadata={"doc": "fraction of sink attention recycled, in [0, 1] "
                                                           "(code's p = 1 - this); default 0.4"})
    rho: float | None = field(default=None, metadata={"doc": "paper's minimum non-sink visual ratio, in [0, 1] "
                                                             "(code's rho = 1 - this); default 0.5"})
    tau: float | None = field(default=None, metadata={"doc": "sink threshold on phi (> 0); default 20 on published "
                                                             "backbones, else 20*sqrt(E/4096)"})
    min_visual: float = field(default=0.2, metadata={"doc": "minimum visual attention A_V of an image-centric row"})
    sink_dims: tuple[int, ...] | None = field(default=None, metadata={"doc": "D_sink; default from the model profile"})
    include_last: bool = field(default=False, metadata={"doc": "also modify the last layer"})
    require_visual_sink: bool | None = field(default=None, metadata={
        "doc": "leave a layer unmodified when it has no visual sink (default true, official code); "
               "false: redistribute text-sink attention too (the paper's formula, S_l holds BOS)"})
    preset: str = field(default="default", metadata={"doc": "default | paper | tuned (values from `lvlm tune`)"})

    def __post_init__(self):
        if self.p is not None:
            _unit("p", self.p)
        if self.rho is not None:
            _unit("rho", self.rho)
        _unit("min_visual", self.min_visual)
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float))
                                     or not self.tau > 0):
            raise ValueError(f"tau must be a number > 0, got {self.tau!r}")
        if self.require_visual_sink is not None and not isinstance(self.require_visual_sink, bool):
            raise ValueError(f"require_visual_sink must be true or false, got {self.require_visual_sink!r}")
        if self.sink_dims is not None:
            dims = index_tuple(self.sink_dims, "var", "sink_dims")
            if not dims or min(dims) < 0:
                raise ValueError("sink_dims must be a non-empty list of dimension indices")
            object.__setattr__(self, "sink_dims", dims)

    @staticmethod
    def paper_defaults(backbone: Backbone) -> dict[str, Default]:
        return {"p": Default(VARConfig.PAPER["p"], "published"), "rho": Default(VARConfig.PAPER["rho"], "published"),
                "tau": sink_threshold(backbone), "require_visual_sink": Default(True, "published")}

    @classmethod
    def from_code_convention(cls, p: float, rho: float, **kwargs) -> "VARConfig":
        """Build from the released code's parameters (its p and rho are 1−p and 1−ρ)."""
        return cls(p=1.0 - p, rho=1.0 - rho, **kwargs)

    def layers(self, num_layers: int) -> range:
        return range(2, num_layers if self.include_last else num_layers - 1)

    @staticmethod
    def plan_component(plan: BatchPlan, configs: dict, profile: dict) -> "VAR":
        return VAR(plan, configs, profile)


class VAR(Component):
    name = "var"

    def __init__(self, plan: BatchPlan, configs: dict[int, VARConfig], profile: dict):
        self.configs = configs
        hidden = plan.facts.hidden_size
        self.dims: dict[int, tuple[int, ...]] = {}
        self.dims_source: dict[int, str] = {}
        for r, c in configs.items():
            dims = c.sink_dims if c.sink_dims is not None else tuple(profile.get("sink_dims") or ())
            if any(d >= hidden for d in dims):
                raise ValueError(f"var: sink_dims {dims} outside the hidden size {hidden}")
            self.dims[r] = dims
            self.dims_source[r] = "request" if c.sink_dims is not None else profile.get("sink_dims_source", "calibrated")
        self.sinks: dict[int, dict[int, dict[str, int]]] = {r: {} for r in configs}

    def before_layer(self, plan, engine, layer, state):
        if state.phase != "prefill" or not 2 <= layer < plan.facts.num_layers:
            return
        with Stopwatch(plan, self.configs):
            cls = plan.key_class(layer, state)  # (B, T) uint8
            valid = torch.arange(cls.shape[1], device=cls.device)[None, :] >= state.row_start[:, None]
            for b, (r, is_twin) in enumerate(zip(plan.rows, plan.twin)):
                if r not in self.configs or is_twin or not self.dims[r]:
                    continue
                phi = sink_scores(state.hidden[b : b + 1], self.dims[r])[0]  # (T,)
                sink = (phi > self.configs[r].tau) & valid[b]
                cls[b] |= sink.to(torch.uint8) * KEY_SINK
                visual = (cls[b] & KEY_VISUAL) != 0
                self.sinks[r][layer] = {"visual": int((sink & visual).sum()), "text": int((sink & ~visual).sum())}

    def _acts(self, r: int, layer: int, num_layers: int) -> bool:
        """Request r redistributes in `layer`: a VAR layer with sink dimensions and, unless the
        request asks otherwise, at least one visual sink found there at prefill."""
        c = self.configs[r]
        if layer not in c.layers(num_layers) or not self.dims[r]:
            return False
        if c.require_visual_sink is not False:  # None (not resolved): the official code's rule
            found = self.sinks[r].get(layer)
            return found is not None and found["visual"] > 0
        return True

    def contribute(self, plan, layer, state, fields):
        active = frozenset(r for r in self.configs if self._acts(r, layer, plan.facts.num_layers))
        if active:
            fields.update(plan.memo(("var", state.phase, active), lambda: self._fields(plan, state, active)))

    def _fields(self, plan, state, active) -> dict:
        device = state.hidden.device
        configs = {r: self.configs[r] for r in active}
        return {
            "sink_p": plan.values({r: c.p for r, c in configs.items()}, heads=plan.facts.num_heads, device=device),
            "sink_rho": plan.values({r: c.rho for r, c in configs.items()}, device=device),
            "sink_min_visual": plan.values({r: c.min_visual for r, c in configs.items()}, device=device),
            "sink_query_start": self._query_start(plan, state).to(device),
        }

    @staticmethod
    def _query_start(plan: BatchPlan, state) -> torch.Tensor:
        """(B,) int32: key index of the first text query row after the image (prefill); 0 at decode."""
        if state.phase == "decode":
            return torch.zeros(len(plan.rows), dtype=torch.int32)
        visual = plan.visual.cpu()  # (B, T)
        t = visual.shape[1]
        last = torch.where(visual, torch.arange(t)[None, :], torch.full_like(visual, -1, dtype=torch.long)).amax(-1)
        return torch.where(last >= 0, last + 1, torch.full_like(last, t)).to(torch.int32)

    def finish(self, plan):
        for r, c in self.configs.items():
            acting = sorted(l for l in c.layers(plan.facts.num_layers) if self._acts(r, l, plan.facts.num_layers))
            plan.report(r, var={"p": c.p, "rho": c.rho, "tau": c.tau, "sink_dims": list(self.dims[r]),
                                "sinks": self.sinks[r], "redistributed_layers": acting,
                                "sources": {"sink_dims": self.dims_source[r]}})
