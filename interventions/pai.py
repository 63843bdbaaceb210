"""PAI: Paying More Attention to Image (Liu et al., ECCV 2024, arXiv 2407.21771).

In layers [2, L), for the last query row only (prefill: the last prompt position; decode: the
new token), logits on the visual keys are amplified before the softmax: s' = s + α·|s|
(kernels: LOGIT_BOOST), α = 0.2.

Optional logits-level contrast with an image-removed branch (an extra twin row that decodes in
lock-step): final log-prob = γ·(log p_img − log p_txt) + log p_txt, over the tokens with
p_img ≥ β·max p_img (γ = 1.1, β = 0.1); the others are excluded. The released code skips the
attention edit on the first generated token when the contrast is on; that quirk is off here and
available as `skip_first_boost`.

Defaults (interventions/defaults.py): α = 0.2, layers [2, L), no contrast (published); the
embedded model's shipped tuned values replace them (`preset`: default | paper | tuned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lvlm_hallu.interventions.defaults import Backbone, Default
from lvlm_hallu.interventions.plan import BatchPlan, Component
from lvlm_hallu.interventions.registry import register


@register("pai", paper="arXiv 2407.21771 (Liu et al., ECCV 2024)", order=40,
          summary="amplify the last query row's attention logits on image tokens")
@dataclass(frozen=True)
class PAIConfig:
    PAPER: ClassVar[dict] = {"alpha": 0.2, "start_layer": 2, "contrast": False, "gamma": 1.1}

    alpha: float | None = field(default=None, metadata={"doc": "amplification s + alpha*|s| on visual keys (>= 0); default 0.2"})
    start_layer: int | None = field(default=None, metadata={"doc": "first edited layer; edits layers [start_layer, L); default 2"})
    contrast: bool | None = field(default=None, metadata={"doc": "logit contrast with an image-removed branch; default false"})
    gamma: float | None = field(default=None, metadata={"doc": "contrast strength (> 0; > 1 subtracts the text-only prior); default 1.1"})
    beta: float = field(default=0.1, metadata={"doc": "plausibility cut: keep tokens with p >= beta * max p"})
    skip_first_boost: bool = field(default=False, metadata={"doc": "released-code quirk: no boost on the first token with contrast"})
    preset: str = field(default="default", metadata={"doc": "default | paper | tuned (values from `lvlm tune`)"})

    def __post_init__(self):
        for name in ("alpha", "gamma", "beta"):
            value = getattr(self, name)
            if value is None and name in ("alpha", "gamma"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.contrast is not None and not isinstance(self.contrast, bool):
            raise ValueError(f"contrast must be true or false, got {self.contrast!r}")
        if self.gamma is not None and not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.start_layer is not None and (isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int)
                                             or self.start_layer < 0):
            raise ValueError(f"start_layer must be an integer >= 0, got {self.start_layer!r}")

    @staticmethod
    def paper_defaults(backbone: Backbone) -> dict[str, Default]:
        return {k: Default(v, "published") for k, v in PAIConfig.PAPER.items()}

    @staticmethod
    def plan_component(plan: BatchPlan, configs: dict, profile: dict) -> "PAI":
        return PAI(plan, configs)


def contrast_logits(img: torch.Tensor, txt: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """(V,), (V,) logits -> contrasted log-probs (V,), -inf outside the plausible set."""
    log_img, log_txt = torch.log_softmax(img.float(), -1), torch.log_softmax(txt.float(), -1)
    out = gamma * (log_img - log_txt) + log_txt
    plausible = log_img >= log_img.max() + torch.log(torch.tensor(beta)) if beta > 0 else torch.ones_like(out, dtype=torch.bool)
    return out.masked_fill(~plausible, float("-inf"))


class PAI(Component):
    name = "pai"

    def __init__(self, plan: BatchPlan, configs: dict[int, PAIConfig]):
        self.configs = configs
        if plan.facts.num_layers and any(c.start_layer >= plan.facts.num_layers for c in configs.values()):
            raise ValueError(f"pai: start_layer must be below the number of layers ({plan.facts.num_layers})")
        for r, c in configs.items():
            if c.contrast:
                plan.need_twin(r, for_decode=True)

    def contribute(self, plan, layer, state, fields):
        active = frozenset(
            r for r, c in self.configs.items()
            if layer >= c.start_layer and not (c.contrast and c.skip_first_boost and state.phase == "prefill")
        )
        if active:
            fields["boost_alpha"] = plan.memo(("pai", active), lambda: plan.values(
                {r: self.configs[r].alpha for r in active}, heads=plan.facts.num_heads, device=state.hidden.device))

    def adjust_logits(self, plan, logits, main):
        out = main
        for r, c in self.configs.items():
            if not c.contrast:
                continue
            b, t = plan.main_row(r), plan.twin_row(r)
            if b is None or t is None:
                continue
            if out is main:
                out = main.clone()
            out[b] = contrast_logits(logits[b], logits[t], c.gamma, c.beta)
        return out

    def finish(self, plan):
        for r, c in self.configs.items():
            plan.report(r, pai={"alpha": c.alpha, "layers": f"[{c.start_layer}, {plan.facts.num_layers})",
                                "contrast": c.contrast, "twin_rows": int(c.contrast),
                                **({"gamma": c.gamma} if c.contrast else {})})
