"""VHR: Vision-aware Head Reinforcement (He et al., ACL 2025, arXiv 2412.13949).

At prefill the request runs next to an image-removed twin row in lock-step. In each target
layer l, at the last prompt position, the Vision-aware Head Divergence of head h is
VHD = ‖o(with image) − o(image removed)‖₂. Heads whose divergence AND image-removed energy
TA = ‖o(image removed)‖₂² both exceed mean + std of their layer are outliers and get VHD := 0.
The heads with VHD above the layer's median are reinforced: o ← α·o, before `o_proj`. Because
layer l's selection is computed after layers < l were reinforced, the twin advances through the
same layers in the same batch. The selection is frozen for decoding (a per-row head scale in the
attention epilogue) and the twin leaves the batch after prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lvlm_hallu.interventions.defaults import Backbone, Default, round_half_up
from lvlm_hallu.interventions.plan import BatchPlan, Component
from lvlm_hallu.interventions.registry import InterventionError, index_tuple, register

POSITIONS = ("all", "last")
PAPER_BAND = 14  # last 14 of LLaVA-1.5-7B's 32 layers (plus layer 1)
PAPER_DEPTH = 32


def late_band(num_layers: int) -> int:
    """How many last layers the band holds: round(14·L/32), at least 1."""
    return max(1, round_half_up(PAPER_BAND * num_layers / PAPER_DEPTH))


def default_layers(num_layers: int) -> tuple[int, ...]:
    """{1} ∪ the last round(14·L/32) layers (32 layers: 1 and 18..31; 8 layers: 1 and 4..7)."""
    last = range(max(0, num_layers - late_band(num_layers)), num_layers)
    return tuple(sorted({1, *last} & set(range(num_layers))))


def head_divergence(o_img: torch.Tensor, o_txt: torch.Tensor) -> torch.Tensor:
    """(H, D), (H, D) -> VHD (H,) fp32 after the outlier rule (docs/methods.md "VHR", step 2)."""
    vhd = (o_img.float() - o_txt.float()).norm(dim=-1)  # (H,)
    ta = o_txt.float().pow(2).sum(-1)  # (H,)
    # population std over the heads of the layer (torch.std is the sample std by default)
    outlier = (vhd > vhd.mean() + vhd.std(unbiased=False)) & (ta > ta.mean() + ta.std(unbiased=False))
    return torch.where(outlier, torch.zeros_like(vhd), vhd)


def select_heads(vhd: torch.Tensor) -> torch.Tensor:
    """(H,) -> (H,) bool: heads strictly above the median divergence."""
    return vhd > vhd.median()


@register("vhr", paper="arXiv 2412.13949 (He et al., ACL 2025)", order=30,
          summary="reinforce vision-aware heads: scale the heads whose output depends most on the image")
@dataclass(frozen=True)
class VHRConfig:
    PAPER: ClassVar[dict] = {"alpha": 2.0, "positions": "all"}  # positions: o <- alpha*o names none, so every one

    alpha: float | None = field(default=None, metadata={"doc": "reinforcement factor for selected heads (> 0; "
                                                               "> 1 reinforces); default 2.0"})
    layers: tuple[int, ...] | None = field(default=None, metadata={
        "doc": "target layers; default {1} ∪ the last round(14·L/32) layers (LLaVA-1.5-7B: 1, 18..31)"})
    reinforce_twin: bool | None = field(default=None, metadata={
        "doc": "also reinforce the image-removed row; default true, false when PAI's contrast shares the "
               "request (its image-removed branch stays plain, docs/methods.md, VHR)"})
    positions: str | None = field(default=None, metadata={
        "doc": "prompt positions whose selected head outputs are scaled at prefill: all (default) or last (only the "
               "position that predicts the first token; the paper does not say, docs/methods.md, VHR); decode steps scale the new token"})
    report_vhd: bool = field(default=False, metadata={"doc": "also report each target layer's per-head divergence (lvlm inspect)"})
    preset: str = field(default="default", metadata={"doc": "default | paper | tuned (values from `lvlm tune`)"})

    def __post_init__(self):
        if self.alpha is not None and (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool)
                                       or not self.alpha > 0):
            raise ValueError(f"alpha must be a number > 0, got {self.alpha!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", index_tuple(self.layers, "vhr", "layers"))
        if self.reinforce_twin is not None and not isinstance(self.reinforce_twin, bool):
            raise ValueError(f"reinforce_twin must be true or false, got {self.reinforce_twin!r}")
        if self.positions is not None and self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")

    @staticmethod
    def paper_defaults(backbone: Backbone) -> dict[str, Default]:
        layers = backbone.published("vhr", "layers") or Default(default_layers(backbone.num_layers), "scaled")
        return {"alpha": Default(VHRConfig.PAPER["alpha"], "published"), "layers": layers,
                "positions": Default(VHRConfig.PAPER["positions"], "published")}

    def target_layers(self, num_layers: int) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else default_layers(num_layers)
        bad = [l for l in layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"vhr: layers {bad} outside the model's 0..{num_layers - 1}")
        return layers

    @staticmethod
    def plan_component(plan: BatchPlan, configs: dict, profile: dict) -> "VHR":
        return VHR(plan, configs)


def twin_reinforced(request: int, config: VHRConfig, plan: BatchPlan) -> bool:
    """Whether VHR scales the request's image-removed twin too. A request has one twin; when PAI's
    contrast reads it, it must stay plain (docs/methods.md "VHR"), so VHR then selects its heads against
    the plain twin (the `reinforce_twin: false` reading); asking for both is refused."""
    pai = plan.configs("pai").get(request)
    shared = bool(pai is not None and pai.contrast)
    if config.reinforce_twin and shared:
        raise InterventionError("vhr: reinforce_twin=true cannot be combined with pai's contrast in one request: "
                                "the image-removed branch PAI reads must stay plain (docs/methods.md, VHR); drop "
                                "reinforce_twin or the contrast", param="interventions.vhr.reinforce_twin")
    return not shared if config.reinforce_twin is None else config.reinforce_twin


class VHR(Component):
    name = "vhr"

    def __init__(self, plan: BatchPlan, configs: dict[int, VHRConfig]):
        self.configs = configs
        self.targets = {r: set(c.target_layers(plan.facts.num_layers)) for r, c in configs.items()}
        self.reinforce_twin = {r: twin_reinforced(r, c, plan) for r, c in configs.items()}
        self.heads: dict[int, dict[int, torch.Tensor]] = {r: {} for r in configs}  # request -> layer -> (H,) bool
        self.vhd: dict[int, dict[int, list[float]]] = {r: {} for r in configs}
        for r in configs:
            plan.need_twin(r)

    def _scale(self, plan: BatchPlan, layer: int, device) -> torch.Tensor | None:
        """(B, H) head scales of a target layer for the current layout, or None if all neutral."""
        rows = {r for r in self.configs if layer in self.heads[r]}
        if not rows:
            return None
        scale = torch.ones(len(plan.rows), plan.facts.num_heads)
        for b, (r, is_twin) in enumerate(zip(plan.rows, plan.twin)):
            if r in rows and (not is_twin or self.reinforce_twin[r]):
                scale[b, self.heads[r][layer]] = float(self.configs[r].alpha)
        return scale.to(device)

    def contribute(self, plan, layer, state, fields):
        if state.phase == "decode":
            scale = plan.memo(("vhr", layer), lambda: self._scale(plan, layer, state.hidden.device))
            if scale is not None:
                fields["head_scale"] = scale if "head_scale" not in fields else fields["head_scale"] * scale

    def after_attention(self, plan, layer, state, out, readout):
        if state.phase != "prefill":
            return out
        for r in self.configs:
            if layer not in self.targets[r]:
                continue
            main, twin = plan.main_row(r), plan.twin_row(r)
            vhd = head_divergence(out[main, :, -1], out[twin, :, -1])  # out (B, H, Tq, D)
            self.heads[r][layer] = select_heads(vhd).cpu()
            self.vhd[r][layer] = [round(v, 5) for v in vhd.tolist()]
        scale = self._scale(plan, layer, out.device)
        if scale is None:
            return out
        scale = scale[:, :, None, None]  # (B, H, 1, 1): every prompt position
        last_only = [b for b, r in enumerate(plan.rows) if r in self.configs and self.configs[r].positions == "last"]
        if last_only:  # rows are left-padded: the position that predicts the first token is the last one
            scale = scale.expand(-1, -1, out.shape[2], 1).clone()
            scale[last_only, :, :-1] = 1.0
        return out * scale.to(out.dtype)

    def finish(self, plan: BatchPlan) -> None:
        for r in self.configs:
            selected = {l: h.nonzero().flatten().tolist() for l, h in sorted(self.heads[r].items())}
            plan.report(r, vhr={"alpha": self.configs[r].alpha, "layers": sorted(self.targets[r]), "heads": selected,
                                "twin_rows": 1, "reinforce_twin": self.reinforce_twin[r],
                                "positions": self.configs[r].positions or "all"})
            if self.configs[r].report_vhd:
                plan.reports_[r]["vhr"]["vhd"] = {l: v for l, v in sorted(self.vhd[r].items())}
