"""The one attention function every language-model layer calls, registered with transformers.

`register()` adds `lvlm_attention` to transformers' `AttentionInterface` under the name "lvlm"
and the SDPA mask builder under the same name in `AttentionMaskInterface` (without the mask
entry, transformers hands custom attention functions `attention_mask=None`). A model loaded with
`attn_implementation="lvlm"` then routes every attention call here.

Per call, the engine passes an `AttentionContext` through the `lvlm_ctx` keyword argument (the
decoder layer forwards unknown keyword arguments to the attention function). The context says,
for the layer being run, which edits apply (`kernels.edits.AttentionEdits`) and where each row's
keys start (left padding) and how the layer's keys are masked (`key_layout`). Dispatch:
  - no context                          -> transformers' SDPA path with the mask it was given;
  - no edits, layout "causal" (no row padded, no extra key mask) and Tq == Tk (prefill) or
    Tq == 1 (decode) -> SDPA with NO mask (is_causal=True for prefill), so that torch can pick
    its FlashAttention / memory-efficient kernels; an explicit mask rules them out;
  - no edits, layout "padded" on CUDA   -> the fused Triton kernel without edits (per-row key
    starts are kernel arguments, not a mask), which keeps a flash-style kernel for left-padded
    batches and their decode;
  - no edits otherwise                  -> SDPA with the engine's boolean mask (CPU, layout
    "masked", chunked prefill with a cache);
  - edits on a CUDA tensor              -> the fused Triton kernel;
  - edits elsewhere                     -> the PyTorch reference (materialized probabilities).
The backend is chosen once per device type (`backend_for`) and reported by the engine. The
kernels' output is allocated as (B, Tq, H, D), the layout the layer reshapes into its o_proj
input, and the kernels write (B, H, Tq, D) through a transposed view of it: no copy after.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lvlm_hallu.kernels.edits import AttentionEdits

ATTN_NAME = "lvlm"
KEY_LAYOUTS = ("causal", "padded", "masked")


class AttentionContext(Protocol):
    """What the engine provides to every attention call of one forward pass."""

    def edits(self, layer: int) -> AttentionEdits | None:
        """Edits for this layer's attention, or None for the plain path."""

    def kv_start(self, layer: int) -> torch.Tensor:
        """(B,) int32: the first valid key of each row in this layer's cache."""

    def key_layout(self, layer: int) -> str:
        """One of KEY_LAYOUTS: what the layer's attention mask encodes beyond causality.
        'causal': nothing (no row padded); 'padded': left padding only (kv_start says it all);
        'masked': more (keys a plan hides, a static cache's unused tail): use the mask."""

    def after_attention(self, layer: int, out: torch.Tensor, readout: torch.Tensor | None) -> torch.Tensor:
        """Sees the head outputs (B, H, Tq, D) before o_proj; returns them, possibly rescaled."""


@functools.lru_cache(maxsize=None)
def backend_for(device_type: str) -> str:
    """'triton' on CUDA when Triton imports, else 'reference'. Decided once per device type."""
    if device_type == "cuda":
        try:
            import lvlm_hallu.kernels.triton_attention  # noqa: F401
        except Exception:  # an unusable Triton install must not take generation down
            return "reference"
        return "triton"
    return "reference"


def triton_supports(q: torch.Tensor) -> bool:
    """The Triton kernels take power-of-two head dims >= 16 (LLaVA: 128)."""
    d = q.shape[-1]
    return d >= 16 and d & (d - 1) == 0


def edited_attention(q, k, v, kv_start, *, scale: float, edits: AttentionEdits | None, out=None):
    """Run one attention call with edits (or none: the plain fused kernel) on the device's
    backend: (o (B,H,Tq,D), readout). `out`, when given, is where the kernels write o (any
    strides); the reference path copies into it."""
    if backend_for(q.device.type) == "triton" and triton_supports(q):
        from lvlm_hallu.kernels import triton_attention

        return triton_attention.attention(q, k, v, kv_start, scale=scale, edits=edits, out=out)
    from lvlm_hallu.kernels import reference

    o, readout = reference.attention(q, k, v, kv_start, scale=scale, edits=edits)
    if out is not None:
        out.copy_(o)
        o = out
    return o, readout


def plain_call(q: torch.Tensor, k: torch.Tensor, layout: str) -> str:
    """Which implementation a layer without edits runs (see the module docstring):
    'sdpa-causal' (SDPA, no mask), 'fused' (our kernel, per-row starts) or 'sdpa-mask'."""
    tq, tk = q.shape[2], k.shape[2]
    if layout == "causal" and (tq == tk or tq == 1):
        return "sdpa-causal"
    if layout in ("causal", "padded") and backend_for(q.device.type) == "triton" and triton_supports(q):
        return "fused"
    return "sdpa-mask"


def lvlm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, Tq, D)
    key: torch.Tensor,  # (B, Hkv, Tk, D)
    value: torch.Tensor,  # (B, Hkv, Tk, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    lvlm_ctx: AttentionContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature; returns (out (B, Tq, H, D), None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if lvlm_ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs)
    layer = module.layer_idx
    edits = lvlm_ctx.edits(layer)
    if edits is not None and edits.is_empty:
        edits = None
    call = "edited" if edits is not None else plain_call(query, key, lvlm_ctx.key_layout(layer))
    if call.startswith("sdpa"):
        mask = None if call == "sdpa-causal" else attention_mask
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scale, **kwargs)
        out = lvlm_ctx.after_attention(layer, out.transpose(1, 2), None)  # (B, H, Tq, D) view
        return out.transpose(1, 2).contiguous(), None
    B, H, Tq, D = query.shape
    buf = query.new_empty(B, Tq, H, D)  # the layer's layout; the kernels write through a view
    out, readout = edited_attention(query, key, value, lvlm_ctx.kv_start(layer), scale=scale, edits=edits,
                                    out=buf.transpose(1, 2))
    out = lvlm_ctx.after_attention(layer, out, readout)
    # Rows that see no key (left padding) are 0 in both backends, never NaN: no clean-up pass.
    return out.transpose(1, 2).contiguous(), None  # no copy unless after_attention made a new tensor


@functools.lru_cache(maxsize=None)
def register() -> str:
    """Register the attention and mask functions under ATTN_NAME (idempotent); return the name."""
    AttentionInterface.register(ATTN_NAME, lvlm_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
