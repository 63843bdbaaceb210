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

from lvlm_hallu.kernels.dispatch import backend_for
from lvlm_hallu.kernels.edits import AttentionEdits
from lvlm_hallu.lvlm.adapters import Adapter, ModelFacts
from lvlm_hallu.lvlm.cache import DEFAULT_CHUNK, KVCache
from lvlm_hallu.lvlm.devices import execution_device
from lvlm_hallu.lvlm.errors import PromptError, UnsupportedModelError
from lvlm_hallu.lvlm.positions import positions_for


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
    def retire(self, requests: list[int]) -> list[dict]: ...


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

    def retire(self, requests):
        return [{} for _ in requests]


@dataclass
class ForwardState:
    """What one forward pass (prefill or one decode step) carries from layer to layer."""

    phase: str  # "prefill" or "decode"
    hidden: torch.Tensor  # (B, Tq, E) hidden states entering the current layer
    position_ids: torch.Tensor  # (B, Tq) rotary positions of the query rows; (B, Tq, 3) with M-RoPE
    row_start: torch.Tensor  # (B,) first non-padding query row (prefill) / 0 (decode)
    cache: KVCache
    plan: Any
    layer: int = 0
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)  # this forward's masks
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # this forward's (cos, sin)
    rotary_for: torch.Tensor | None = None  # the position_ids `rotary` was computed for
    input_ids: torch.Tensor | None = None  # (B, T) prompt ids (prefill)
    attending: bool = False  # True while the current layer's attention runs (its cache already holds the new keys)
    next_position: torch.Tensor | None = None  # (B,) rotary position of the next fed token; (B, 3) with M-RoPE
    key_masked: bool = False  # the current layer's mask includes a plan's key mask
    padded_starts: dict = field(default_factory=dict)  # id(start) -> (start, any row padded), see key_layout

    # AttentionContext protocol (kernels/dispatch.py): the attention function calls these.
    def edits(self, layer: int) -> AttentionEdits | None:
        return self.plan.edits(layer, self)

    def kv_start(self, layer: int) -> torch.Tensor:
        return self.cache.start[layer]

    def key_layout(self, layer: int) -> str:
        """'masked' when the layer's mask hides more than causality and padding (a plan's key
        mask, or a static-shape cache's unused tail), else 'padded' when a row's keys start after
        column 0, else 'causal'. One host sync per new start tensor (they change only when rows
        leave or join), none per layer or step."""
        if self.key_masked or getattr(self.cache, "static_shapes", False):
            return "masked"
        start = self.cache.start[layer]
        seen = self.padded_starts.get(id(start))
        if seen is None or seen[0] is not start:  # holding the tensor keeps its id from being reused
            seen = self.padded_starts[id(start)] = (start, bool((start > 0).any()))
        return "padded" if seen[1] else "causal"

    def permute_rows(self, order: list[int]) -> None:
        """Reorder the batch rows (cache and per-row positions) without dropping any."""
        index = torch.tensor(order, device=self.row_start.device)
        self.cache.permute_rows(index)
        self.row_start = self.row_start.index_select(0, index)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, index)
        self.masks, self.padded_starts = {}, {}  # start tensors changed

    def merge(self, other: "ForwardState") -> None:
        """Append the rows of another prefilled state (requests joining a running batch)."""
        self.cache.merge(other.cache)
        self.row_start = torch.cat([self.row_start, other.row_start])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.masks, self.padded_starts = {}, {}  # start tensors changed

    def keep_rows(self, keep: list[int]) -> torch.Tensor:
        """Keep these batch rows in the cache and the per-row positions; returns the index."""
        index = torch.tensor(keep, device=self.row_start.device)
        self.cache.select_rows(index)
        self.masks, self.padded_starts = {}, {}  # start tensors changed
        self.row_start = self.row_start.index_select(0, index)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, index)
        return index

    def key_length(self, layer: int) -> int:
        """Keys of `layer` in this forward: its cache plus the new rows (before or during attention)."""
        return self.cache.length(layer) + (0 if self.attending else self.hidden.shape[1])

    def after_attention(self, layer: int, out: torch.Tensor, readout) -> torch.Tensor:
        return self.plan.after_attention(layer, self, out, readout)


def causal_mask(start: torch.Tensor, q_len: int, k_len: int, used: int | None = None) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: key j is visible to query i iff start <= j <= U - Tq + i, where U
    (`used`, default Tk) is the number of keys written; columns U..Tk-1 (unused capacity of a
    static-shape cache) are hidden.

    The diagonal is always visible so that padding query rows attend to themselves and stay
    finite instead of producing NaN from an all-masked softmax.
    """
    used = k_len if used is None else used
    j = torch.arange(k_len, device=start.device)
    i_abs = torch.arange(q_len, device=start.device) + (used - q_len)  # (Tq,)
    visible = (j[None, None, :] >= start[:, None, None]) & (j[None, None, :] <= i_abs[None, :, None])
    visible |= j[None, None, :] == i_abs[None, :, None]
    return visible[:, None]


def check_cache_argument(layers) -> None:
    """The engine hands its KV cache to each decoder layer as `cache=` (transformers 5.24, the
    version pyproject.toml names; earlier 5.x releases, 5.17 for one, call it `past_key_values`).
    A layer without that parameter would take it into `**kwargs` and ignore it, so every decode
    step would attend to its own token only: wrong answers, not an error. Refuse such a
    transformers up front."""
    import inspect

    import transformers

    for cls in {type(layer) for layer in layers}:
        if "cache" not in inspect.signature(cls.forward).parameters:
            raise UnsupportedModelError(
                f"transformers {transformers.__version__}: {cls.__name__}.forward takes no `cache` argument, "
                f"so the engine's KV cache would be ignored; install the transformers version pyproject.toml names "
                f"(on a machine without a package index, carry its wheel: `make gpu-wheels`, docs/kernels.md)")


class Engine:
    """Prefill and decode over one loaded model; stateless between calls.

    `cache_chunk`: KV capacity grows by this many columns at a time. `static_shapes`: attention
    reads the whole cache capacity with a mask, so decode-step shapes only change at a growth
    (the prerequisite for capturing the decode step in a CUDA graph; plain plans only, because
    the edited kernels take right-aligned keys). See lvlm/cache.py.
    """

    def __init__(self, model: torch.nn.Module, adapter: Adapter, facts: ModelFacts, *,
                 cache_chunk: int = DEFAULT_CHUNK, static_shapes: bool = False):
        self.model, self.adapter, self.facts = model, adapter, facts
        self.cache_chunk, self.static_shapes = cache_chunk, static_shapes
        self.layers = adapter.get(model, "layers")
        check_cache_argument(self.layers)
        self.rotary = adapter.get(model, "rotary")
        self.norm = adapter.get(model, "norm")
        self.embed = adapter.get(model, "embed")
        self.lm_head = adapter.get(model, "lm_head")
        self.image_features = adapter.get(model, "image_features")
        self.positions = positions_for(adapter)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's execution device (its weight may sit on
        "meta" when it is offloaded)."""
        return execution_device(self.embed)

    @property
    def layer_devices(self) -> list[torch.device]:
        """Each decoder layer's execution device. Under an accelerate device map (#18) a layer's
        cache, key classes and the per-row tensors the plan and kernels read live there; resolved
        once per prefill and kept by the cache (`KVCache.devices`)."""
        return [execution_device(layer) for layer in self.layers]

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
            **{name: getattr(cfg, name) for name in self.adapter.feature_kwargs},
            return_dict=True,
        )
        features = torch.cat(list(out.pooler_output), dim=0).to(embeds.device, embeds.dtype)  # (N_img_tokens, E)
        if int(image_mask.sum()) != features.shape[0]:
            raise PromptError(
                f"the prompt has {int(image_mask.sum())} image tokens but the images give "
                f"{features.shape[0]} features; each image needs exactly one image placeholder"
            )
        return embeds.masked_scatter(image_mask[..., None], features)

    # -- one forward over all layers -------------------------------------------------------
    def run_layers(self, state: ForwardState) -> torch.Tensor:
        """Run every decoder layer on `state.hidden`; returns the final-norm hidden states.

        Per forward, the rotary table is computed once (again only if a plan re-packs the rows,
        e.g. a visual-token exit at prefill) and each distinct mask once (`attention_mask`)."""
        cache = state.cache
        for layer_idx, layer in enumerate(self.layers):
            state.layer = layer_idx
            device = cache.devices[layer_idx]
            if device is not None and state.hidden.device != device:  # a device-map boundary: plan tensors follow the layer
                state.hidden, state.row_start = state.hidden.to(device), state.row_start.to(device)
            state.plan.before_layer(self, layer_idx, state)
            cache.begin_layer(layer_idx, state.row_start)
            mask = self.attention_mask(state, layer_idx)
            extra = state.plan.key_mask(layer_idx, state)  # (B, Tk) bool: keys a plan hides
            state.key_masked = extra is not None
            if extra is not None:
                mask = mask & extra[:, None, None, :]
            state.attending = True
            state.hidden = layer(
                state.hidden,
                attention_mask=mask,
                position_ids=self.positions.layer_ids(state.position_ids),
                cache=cache,
                use_cache=True,
                position_embeddings=self.rotary_table(state),
                lvlm_ctx=state,
            )
            state.attending = False
        return self.norm(state.hidden)

    def rotary_table(self, state: ForwardState) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of (B, Tq, D) for the forward's positions, computed once per position layout."""
        if state.rotary_for is not state.position_ids:
            state.rotary = self.rotary(state.hidden, position_ids=self.positions.rotary_ids(state.position_ids))
            state.rotary_for = state.position_ids
        return state.rotary

    def attention_mask(self, state: ForwardState, layer: int) -> torch.Tensor:
        """The per-forward attention mask of a layer: (B, 1, Tq, Tk) bool, built once per distinct
        (row starts, Tq, Tk) in a forward (layers share one unless a token exit changed theirs).

        This is the one place masks are built; an attention path that needs another form (a
        flash kernel taking `kv_start` and lengths instead of a dense mask) plugs in here."""
        cache = state.cache
        q_len = state.hidden.shape[1]
        used = cache.length(layer) + q_len  # keys after this layer's update
        k_len = cache.attended_length(layer, q_len)  # == used, or the capacity with static shapes
        start = cache.start[layer]
        key = (id(start), q_len, k_len, used)
        if key not in state.masks:
            state.masks[key] = causal_mask(start, q_len, k_len, used)
        return state.masks[key]

    def _check_plan(self, plan) -> None:
        if self.static_shapes and not isinstance(plan, NoPlan):
            raise ValueError("static_shapes supports batches without interventions only: the edited "
                             "attention kernels read right-aligned keys, not a padded capacity")

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
        self._check_plan(plan)
        attention_mask = attention_mask.to(torch.long)
        position_ids, next_position = self.positions.prefill(self.model, self.adapter, input_ids, attention_mask, vision)
        row_start = (attention_mask.shape[1] - attention_mask.sum(-1)).to(torch.int32)
        state = ForwardState(
            phase="prefill",
            hidden=self.embed_inputs(input_ids, vision),
            position_ids=position_ids,
            row_start=row_start,
            cache=KVCache(len(self.layers), chunk=self.cache_chunk, static_shapes=self.static_shapes,
                          devices=self.layer_devices),
            plan=plan,
            input_ids=input_ids,
            next_position=next_position,  # decided by the prompt: a visual-token exit keeps it
        )
        hidden = self.run_layers(state)
        dropped = plan.after_prefill(self, state)
        if dropped is not None:
            hidden = hidden.index_select(0, dropped)
            state.position_ids = state.position_ids.index_select(0, dropped)
        logits = self.logits(hidden[:, -1])
        return logits, state

    @torch.inference_mode()
    def decode_one_token(self, tokens: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """Feed one token per row (B,); returns next-token logits (B, V)."""
        state.phase = "decode"
        self._check_plan(state.plan)
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
