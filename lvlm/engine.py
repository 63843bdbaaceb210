"""Own prefill / decode loop over the Hugging Face modules of a LLaVA-class model.

Why not `generate()`: interventions act between layers (VHR head selection, VAR sink detection,
visual-token exit), rows join and leave the batch (VHR twin rows, finished requests), layers
keep caches of different lengths, and every row carries its own plan. The loop runs the
language model's decoder layers one by one with a `KVCache`; with no intervention its greedy
output is token-identical to `transformers`' `generate` (tested).

Shapes: B rows, T prompt tokens (left-padded), E hidden size, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from kernels.dispatch import backend_for
from kernels.edits import AttentionEdits
from lvlm.adapters import Adapter, ModelFacts
from lvlm.cache import KVCache
from lvlm.errors import PromptError


class Plan(Protocol):
    """Per-batch intervention plan the engine consults (interventions/ builds real ones).

    Batch rows may include helper rows (image-removed twins); `adjust_logits` maps the batch's
    logits to the main rows, `expand_tokens` maps the main rows' tokens back to batch rows, and
    `select_main` drops finished main rows (with their helpers).
    """

    def before_layer(self, engine: "Engine", layer: int, state: "ForwardState") -> None: ...
    def key_mask(self, layer: int, state: "ForwardState") -> torch.Tensor | None: ...
    def edits(self, layer: int, state: "ForwardState") -> AttentionEdits | None: ...
    def after_attention(self, layer: int, state: "ForwardState", out: torch.Tensor, readout) -> torch.Tensor: ...
    def after_prefill(self, engine: "Engine", state: "ForwardState") -> torch.Tensor | None: ...
    def adjust_logits(self, state: "ForwardState", logits: torch.Tensor) -> torch.Tensor: ...
    def expand_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def select_main(self, state: "ForwardState", keep: list[int]) -> None: ...
    def twin_requests(self) -> list: ...
    def bind(self, batch: dict[str, torch.Tensor]) -> None: ...
    def reports(self) -> list[dict]: ...


class NoPlan:
    """The plan of a batch without interventions: every hook is the identity."""

    def before_layer(self, engine, layer, state):
        return None

    def key_mask(self, layer, state):
        return None

    def edits(self, layer, state):
        return None

    def after_attention(self, layer, state, out, readout):
        return out

    def after_prefill(self, engine, state):
        return None

    def adjust_logits(self, state, logits):
        return logits

    def expand_tokens(self, tokens):
        return tokens

    def select_main(self, state, keep):
        state.keep_rows(keep)

    def twin_requests(self):
        return []

    def bind(self, batch):
        return None

    def reports(self):
        return None


@dataclass
class ForwardState:
    """What one forward pass (prefill or one decode step) carries from layer to layer."""

    phase: str  # "prefill" or "decode"
    hidden: torch.Tensor  # (B, Tq, E) hidden states entering the current layer
    position_ids: torch.Tensor  # (B, Tq) rotary positions of the query rows
    row_start: torch.Tensor  # (B,) first non-padding query row (prefill) / 0 (decode)
    cache: KVCache
    plan: Any
    layer: int = 0
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
    input_ids: torch.Tensor | None = None  # (B, T) prompt ids (prefill)
    attending: bool = False  # True while the current layer's attention runs (its cache already holds the new keys)
    next_position: torch.Tensor | None = None  # (B,) rotary position of the next fed token

    # AttentionContext protocol (kernels/dispatch.py): the attention function calls these.
    def edits(self, layer: int) -> AttentionEdits | None:
        return self.plan.edits(layer, self)

    def kv_start(self, layer: int) -> torch.Tensor:
        return self.cache.start[layer]

    def keep_rows(self, keep: list[int]) -> torch.Tensor:
        """Keep these batch rows in the cache and the per-row positions; returns the index."""
        index = torch.tensor(keep, device=self.hidden.device)
        self.cache.select_rows(index)
        self.row_start = self.row_start.index_select(0, index)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, index)
        return index

    def key_length(self, layer: int) -> int:
        """Keys of `layer` in this forward: its cache plus the new rows (before or during attention)."""
        return self.cache.length(layer) + (0 if self.attending else self.hidden.shape[1])

    def after_attention(self, layer: int, out: torch.Tensor, readout) -> torch.Tensor:
        return self.plan.after_attention(layer, self, out, readout)


def causal_mask(start: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: key j is visible to query i iff start <= j <= Tk - Tq + i.

    The diagonal is always visible so that padding query rows attend to themselves and stay
    finite instead of producing NaN from an all-masked softmax.
    """
    j = torch.arange(k_len, device=start.device)
    i_abs = torch.arange(q_len, device=start.device) + (k_len - q_len)  # (Tq,)
    visible = (j[None, None, :] >= start[:, None, None]) & (j[None, None, :] <= i_abs[None, :, None])
    visible |= j[None, None, :] == i_abs[None, :, None]
    return visible[:, None]


class Engine:
    """Prefill and decode over one loaded model; stateless between calls."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter, facts: ModelFacts):
        self.model, self.adapter, self.facts = model, adapter, facts
        self.layers = adapter.get(model, "layers")
        self.rotary = adapter.get(model, "rotary")
        self.norm = adapter.get(model, "norm")
        self.embed = adapter.get(model, "embed")
        self.lm_head = adapter.get(model, "lm_head")
        self.image_features = adapter.get(model, "image_features")

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def attention_backend(self) -> str:
        return backend_for(self.device.type)

    # -- inputs ---------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the projected image features scattered into image positions."""
        embeds = self.embed(input_ids)  # (B, T, E)
        image_mask = input_ids == self.facts.image_token_id
        if not vision or vision.get("pixel_values") is None:
            if image_mask.any():
                raise PromptError("the prompt has image tokens but no image was given")
            return embeds
        cfg = self.model.config
        out = self.image_features(
            **{k: vision[k] for k in self.adapter.vision_inputs},
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            return_dict=True,
        )
        features = torch.cat(list(out.pooler_output), dim=0).to(embeds.dtype)  # (N_img_tokens, E)
        if int(image_mask.sum()) != features.shape[0]:
            raise PromptError(
                f"the prompt has {int(image_mask.sum())} image tokens but the images give "
                f"{features.shape[0]} features; each image needs exactly one image placeholder"
            )
        return embeds.masked_scatter(image_mask[..., None], features)

    # -- one forward over all layers -------------------------------------------------------
    def run_layers(self, state: ForwardState) -> torch.Tensor:
        """Run every decoder layer on `state.hidden`; returns the final-norm hidden states."""
        for layer_idx, layer in enumerate(self.layers):
            state.layer = layer_idx
            state.plan.before_layer(self, layer_idx, state)
            cache = state.cache
            cache.begin_layer(layer_idx, state.row_start)
            q_len = state.hidden.shape[1]
            k_len = cache.length(layer_idx) + q_len
            start = cache.start[layer_idx]
            key = (id(start), q_len, k_len)
            if key not in state.masks:
                state.masks[key] = causal_mask(start, q_len, k_len)
            mask = state.masks[key]
            extra = state.plan.key_mask(layer_idx, state)  # (B, Tk) bool: keys a plan hides
            if extra is not None:
                mask = mask & extra[:, None, None, :]
            cos_sin = self.rotary(state.hidden, position_ids=state.position_ids)
            state.attending = True
            state.hidden = layer(
                state.hidden,
                attention_mask=mask,
                position_ids=state.position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=cos_sin,
                lvlm_ctx=state,
            )
            state.attending = False
        return self.norm(state.hidden)

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, V) fp32 logits of the next token."""
        return self.lm_head(hidden_last).float()

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict, plan: Any = None
    ) -> tuple[torch.Tensor, ForwardState]:
        """Forward over the left-padded prompt; returns next-token logits (B, V) of every batch
        row (helper rows included; see `Plan.adjust_logits`) and the state."""
        plan = plan or NoPlan()
        attention_mask = attention_mask.to(torch.long)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # as transformers' generate
        row_start = (attention_mask.shape[1] - attention_mask.sum(-1)).to(torch.int32)
        state = ForwardState(
            phase="prefill",
            hidden=self.embed_inputs(input_ids, vision),
            position_ids=position_ids,
            row_start=row_start,
            cache=KVCache(len(self.layers)),
            plan=plan,
            input_ids=input_ids,
        )
        hidden = self.run_layers(state)
        dropped = plan.after_prefill(self, state)
        if dropped is not None:
            hidden = hidden.index_select(0, dropped)
            state.position_ids = state.position_ids.index_select(0, dropped)
        logits = self.logits(hidden[:, -1])
        state.next_position = state.position_ids[:, -1] + 1  # (B,)
        return logits, state

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """Feed one token per row (B,); returns next-token logits (B, V)."""
        state.phase = "decode"
        state.hidden = self.embed(tokens[:, None])  # (B, 1, E)
        state.position_ids = state.next_position[:, None]
        state.row_start = torch.zeros_like(state.row_start[: tokens.shape[0]])
        state.masks = {}
        hidden = self.run_layers(state)
        state.next_position = state.next_position + 1
        return self.logits(hidden[:, -1])


@dataclass
class Sampler:
    """Greedy when temperature == 0, else temperature + nucleus (top_p) sampling, seeded per row."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> int:  # logits (V,) fp32
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run fn and return (result, milliseconds), synchronizing CUDA so the time is real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, 1000.0 * (time.perf_counter() - t0)
