"""VTE: visual-token exit (after DyVTE, Wu et al., arXiv 2411.19628).

After an exit layer k, chosen at prefill, ALL visual tokens of the row leave the hidden states:
layers k+1..L−1 never compute or store them, text tokens keep their original rotary positions
(the gap stays; with Qwen2-VL's three-axis M-RoPE all three axes move with the row, and decoding
continues from the prompt's rope deltas), and layers ≤ k keep their visual keys/values for decoding. The saving only
exists when rows are physically removed, so this is what the engine does; `emulate=True` masks
the visual keys instead (identical outputs, no saving) and serves as the test oracle.

Policies:
- "fixed": exit after layer k (default k = L // 2); k = L − 1 (or L) never exits.
- "dynamic" (training-free): exit after the first layer ≥ min_layer at which the last prompt
  row's head-mean attention mass on visual keys has stayed below `threshold` for `patience`
  consecutive layers (read out by the kernel's READOUT, no attention matrix materialized).
- "router": DyVTE-style trained router, an MLP (GELU hidden layer) on [mean of the text hidden
  states after the image, the last token excluded; last hidden state], evaluated from layer 0
  (`min_layer` 0 unless set). Two weight formats, loaded as they are (torch.save of a dict; none
  are published): DyVTE's two logits without bias, {"w1": (Hd, 2E), "w2": (2, Hd)}, exit when
  g1 > g0; or one logit with biases, {"w1", "b1": (Hd,), "w2": (1, Hd), "b2": (1,)}, exit when
  its sigmoid > 0.5.
  A request names a router by `router` NAME only; the file is `<name>.pt` in the directory the
  operator configures (`lvlm serve --router-dir`, environment variable LVLM_ROUTER_DIR), loaded
  with `weights_only=True`. Requests never name paths: a path would let any caller make the
  server unpickle, or probe for, arbitrary files.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvlm_hallu.interventions.defaults import Backbone, Default
from lvlm_hallu.interventions.plan import BatchPlan, Component
from lvlm_hallu.interventions.registry import register
from lvlm_hallu.kernels.edits import KEY_VISUAL

POLICIES = ("fixed", "dynamic", "router")
ROUTER_DIR_ENV = "LVLM_ROUTER_DIR"
ROUTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # no dots or separators: never a path


def router_dir() -> Path | None:
    """The operator's router directory (LVLM_ROUTER_DIR), or None when routers are not offered."""
    value = os.environ.get(ROUTER_DIR_ENV)
    return Path(value) if value else None


def router_names() -> list[str]:
    """Names of the routers offered: the `<name>.pt` files of the router directory."""
    directory = router_dir()
    if directory is None or not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.pt") if p.is_file() and ROUTER_NAME.fullmatch(p.stem))


def load_router_weights(name: str) -> dict[str, torch.Tensor]:
    """Weights of router `name` from the router directory (tensors only: weights_only=True)."""
    if name not in router_names():
        raise ValueError(f"vte: no router named {name!r} in the router directory")
    path = router_dir() / f"{name}.pt"
    return _load_weights(str(path), path.stat().st_mtime_ns)


ROUTER_FORMATS = {  # keys -> rows of w2: DyVTE's two bias-free logits, or one logit with biases
    frozenset({"w1", "w2"}): 2,
    frozenset({"w1", "b1", "w2", "b2"}): 1,
}


@functools.lru_cache(maxsize=16)
def _load_weights(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:  # mtime: a replaced file reloads
    weights = torch.load(path, map_location="cpu", weights_only=True)
    keys = frozenset(weights) if isinstance(weights, dict) else frozenset()
    outputs = ROUTER_FORMATS.get(keys)
    if outputs is None:
        raise ValueError(f"vte: router weights must hold w1, w2 (DyVTE: two logits, no bias) or w1, b1, w2, b2 "
                         f"(one logit); got {sorted(keys)}")
    if weights["w2"].ndim != 2 or weights["w2"].shape[0] != outputs:
        raise ValueError(f"vte: router w2 must have {outputs} rows for this format, got shape "
                         f"{tuple(weights['w2'].shape)}")
    return weights


@register("vte", paper="arXiv 2411.19628 (Wu et al., DyVTE)", order=10,
          summary="remove all visual tokens from the hidden states after an exit layer (faster prefill and decode)")
@dataclass(frozen=True)
class VTEConfig:
    policy: str = field(default="fixed", metadata={"doc": "fixed | dynamic | router"})
    exit_layer: int | None = field(default=None, metadata={"doc": "fixed exit layer k (default L // 2, or the tuned exit)"})
    threshold: float = field(default=0.1, metadata={"doc": "dynamic: visual attention mass below which to exit"})
    patience: int = field(default=1, metadata={"doc": "dynamic: consecutive layers below the threshold"})
    min_layer: int | None = field(default=None, metadata={
        "doc": "dynamic/router: earliest exit layer; default 2 (dynamic), 0 (router: DyVTE evaluates from layer 0)"})
    router: str | None = field(default=None, metadata={"doc": "router: name of trained weights in the server's router directory"})
    emulate: bool = field(default=False, metadata={"doc": "mask visual keys instead of removing rows (oracle)"})
    preset: str = field(default="default", metadata={"doc": "default | paper | tuned (exit from `lvlm tune`)"})

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.exit_layer is not None and (isinstance(self.exit_layer, bool) or not isinstance(self.exit_layer, int) or self.exit_layer < 0):
            raise ValueError(f"exit_layer must be an integer >= 0, got {self.exit_layer!r}")
        if not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if self.min_layer is not None and (isinstance(self.min_layer, bool) or not isinstance(self.min_layer, int)
                                           or self.min_layer < 0):
            raise ValueError(f"min_layer must be an integer >= 0, got {self.min_layer!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {self.patience!r}")
        if self.router is not None and (not isinstance(self.router, str) or not ROUTER_NAME.fullmatch(self.router)):
            raise ValueError("router must be a router name (letters, digits, '_' and '-'), not a path")
        if self.policy == "router" and not self.router:
            raise ValueError("policy 'router' needs router (the name of trained router weights)")

    @staticmethod
    def paper_defaults(backbone: Backbone) -> dict[str, Default]:
        """DyVTE publishes no fixed exit layer: the fixed policy's default is the middle layer."""
        return {"exit_layer": Default(backbone.num_layers // 2, "scaled")}

    @staticmethod
    def plan_component(plan: BatchPlan, configs: dict, profile: dict) -> "VTE":
        return VTE(plan, configs)

    def earliest(self) -> int:
        """The first layer after which the dynamic or router policy may exit."""
        if self.min_layer is not None:
            return self.min_layer
        return 0 if self.policy == "router" else 2


class Router(torch.nn.Module):
    """DyVTE-style exit router: MLP over [mean text-after-image hidden; last hidden]."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.w1, self.w2 = weights["w1"].float(), weights["w2"].float()
        self.b1 = weights["b1"].float() if "b1" in weights else torch.zeros(self.w1.shape[0])
        self.b2 = weights["b2"].float() if "b2" in weights else torch.zeros(self.w2.shape[0])

    def forward(self, features: torch.Tensor) -> bool:  # (2E,) -> exit now?
        g = torch.nn.functional.gelu(features.float() @ self.w1.T + self.b1) @ self.w2.T + self.b2
        return bool(g[1] > g[0]) if g.shape[-1] == 2 else bool(g[0] > 0)  # sigmoid(g) > 0.5


class VTE(Component):
    name = "vte"

    def __init__(self, plan: BatchPlan, configs: dict[int, VTEConfig]):
        num_layers = plan.facts.num_layers
        self.configs = configs
        self.exit: dict[int, int | None] = {}  # request -> decided exit layer (None: not yet)
        self.below: dict[int, int] = {r: 0 for r in configs}
        self.removed: dict[int, int] = {r: 0 for r in configs}
        self.routers: dict[int, Router] = {}
        for r, c in configs.items():
            if c.exit_layer is not None and c.exit_layer > num_layers:  # L - 1 and L: never exit
                raise ValueError(f"vte: exit_layer {c.exit_layer} outside the model's 0..{num_layers}")
            if c.earliest() >= num_layers:
                raise ValueError(f"vte: min_layer {c.earliest()} outside the model's 0..{num_layers - 1}")
            self.exit[r] = (c.exit_layer if c.exit_layer is not None else num_layers // 2) if c.policy == "fixed" else None
            if c.policy == "router":
                self.routers[r] = Router(load_router_weights(c.router))

    def exited(self, r: int, layer: int) -> bool:
        """True when request r's visual tokens are gone from `layer` on."""
        k = self.exit.get(r)
        return k is not None and layer > k

    # -- prefill: decide and remove ---------------------------------------------------------
    def before_layer(self, plan, engine, layer, state):
        if state.phase != "prefill":
            return
        for r, router in self.routers.items():
            if self.exit[r] is None and layer - 1 >= self.configs[r].earliest():
                if router(self._router_features(plan, state, r)):
                    self.exit[r] = layer - 1
        leaving = [r for r, c in self.configs.items() if not c.emulate and self.exit[r] == layer - 1]
        if leaving:
            self._remove_visual_rows(plan, state, leaving)

    def _router_features(self, plan, state, r: int) -> torch.Tensor:
        """[mean of the text rows after the image, the last one excluded (zeros if none); last row]."""
        b = plan.main_row(r)
        visual = plan.visual[b]
        position = torch.arange(visual.shape[0], device=visual.device)
        after = position > visual.nonzero().max() if visual.any() else position >= state.row_start[b]
        text = state.hidden[b][after & (position >= state.row_start[b]) & (position < visual.shape[0] - 1)]
        mean = text.float().mean(0) if len(text) else state.hidden.new_zeros(state.hidden.shape[-1], dtype=torch.float32)
        return torch.cat([mean, state.hidden[b, -1].float()])

    def _remove_visual_rows(self, plan: BatchPlan, state, leaving: list[int]) -> None:
        """Drop the visual rows of the leaving requests and re-pack the batch, left-padded."""
        B, T = plan.visual.shape
        positions = torch.arange(T, device=plan.visual.device)
        keep = positions[None, :] >= state.row_start.to(positions.device)[:, None]  # (B, T) non-padding
        for b, (r, is_twin) in enumerate(zip(plan.rows, plan.twin)):
            if r in leaving and not is_twin:
                keep[b] &= ~plan.visual[b]
                self.removed[r] = int(plan.visual[b].sum())
        lengths = keep.sum(-1)  # (B,)
        new_t = int(lengths.max())
        # destination column of each kept token: right-aligned, order preserved
        dest = new_t - lengths[:, None] + keep.long().cumsum(-1) - 1  # (B, T)
        rows = torch.arange(B, device=keep.device)[:, None].expand(B, T)[keep]
        cols = dest[keep]
        hidden = state.hidden.new_zeros(B, new_t, state.hidden.shape[-1])
        hidden[rows, cols] = state.hidden[keep]
        position_ids = state.position_ids.new_zeros(B, new_t, *state.position_ids.shape[2:])  # M-RoPE: (B, T, 3)
        position_ids[rows, cols] = state.position_ids[keep]
        visual = plan.visual.new_zeros(B, new_t)
        visual[rows, cols] = plan.visual[keep]
        state.hidden, state.position_ids, plan.visual = hidden, position_ids, visual
        state.row_start = (new_t - lengths).to(torch.int32)
        state.masks = {}
        plan.layout_changed()

    def contribute(self, plan, layer, state, fields):
        dynamic = [r for r, c in self.configs.items() if c.policy == "dynamic" and self.exit[r] is None]
        if state.phase == "prefill" and dynamic and layer >= min(self.configs[r].earliest() for r in dynamic):
            fields["readout"] = True

    def after_attention(self, plan, layer, state, out, readout):
        if state.phase != "prefill" or readout is None:
            return out
        for r, c in self.configs.items():
            if c.policy != "dynamic" or self.exit[r] is not None or layer < c.earliest():
                continue
            b = plan.main_row(r)
            visual = (plan.key_class(layer, state)[b] & KEY_VISUAL) != 0
            mass = float(readout[b][visual].sum())
            self.below[r] = self.below[r] + 1 if mass < c.threshold else 0
            if self.below[r] >= c.patience and layer < plan.facts.num_layers - 1:
                self.exit[r] = layer
        return out

    # -- emulation oracle: mask visual keys after the exit layer -----------------------------------
    def key_mask(self, plan, layer, state):
        emulated = [r for r, c in self.configs.items() if c.emulate and self.exited(r, layer)]
        if not emulated:
            return None
        cls = plan.key_class(layer, state)
        visible = torch.ones_like(cls, dtype=torch.bool)
        for b, (r, is_twin) in enumerate(zip(plan.rows, plan.twin)):
            if r in emulated and not is_twin:
                visible[b] = (cls[b] & KEY_VISUAL) == 0
        return visible

    def finish(self, plan):
        L = plan.facts.num_layers
        for r, c in self.configs.items():
            k = self.exit[r]
            exited = k is not None and k < L - 1
            plan.report(r, vte={"policy": c.policy, "exit_layer": k if exited else None,
                                "visual_tokens_removed": self.removed[r] if exited else 0,
                                "kv_entries_saved": self.removed[r] * (L - 1 - k) if exited else 0,
                                "emulated": c.emulate})
