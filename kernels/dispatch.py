"""The one attention function every language-model layer calls, registered with transformers.

`register()` adds `lvlm_attention` to transformers' `AttentionInterface` under the name "lvlm"
and the SDPA mask builder under the same name in `AttentionMaskInterface` (without the mask
entry, transformers hands custom attention functions `attention_mask=None`). A model loaded with
`attn_implementation="lvlm"` then routes every attention call here.

Per call, the engine passes an `AttentionContext` through the `lvlm_ctx` keyword argument (the
decoder layer forwards unknown keyword arguments to the attention function). The context says,
for the layer being run, which edits apply (`kernels.edits.AttentionEdits`) and where each row's
keys start (left padding). Dispatch:
  - no context, or no edits for this layer -> transformers' SDPA path, unchanged;
  - edits on a CUDA tensor             -> the fused Triton kernel;
  - edits elsewhere                    -> the PyTorch reference (materialized probabilities).
The backend is chosen once per device type (`backend_for`) and reported by the engine.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kernels.edits import AttentionEdits

ATTN_NAME = "lvlm"


class AttentionContext(Protocol):
    """What the engine provides to every attention call of one forward pass."""

    def edits(self, layer: int) -> AttentionEdits | None:
        """Edits for this layer's attention, or None for the plain path."""

    def kv_start(self, layer: int) -> torch.Tensor:
        """(B,) int32: the first valid key of each row in this layer's cache."""

    def after_attention(self, layer: int, out: torch.Tensor, readout: torch.Tensor | None) -> torch.Tensor:
        """Sees the head outputs (B, H, Tq, D) before o_proj; returns them, possibly rescaled."""


@functools.lru_cache(maxsize=None)
def backend_for(device_type: str) -> str:
    """'triton' on CUDA when Triton imports, else 'reference'. Decided once per device type."""
    if device_type == "cuda":
        try:
            import kernels.triton_attention  # noqa: F401
        except Exception:  # an unusable Triton install must not take generation down
            return "reference"
        return "triton"
    return "reference"


def triton_supports(q: torch.Tensor) -> bool:
    """The Triton kernels take power-of-two head dims >= 16 (LLaVA: 128)."""
    d = q.shape[-1]
    return d >= 16 and d & (d - 1) == 0


def edited_attention(q, k, v, kv_start, *, scale: float, edits: AttentionEdits):
    """Run one attention call with edits on the device's backend: (o (B,H,Tq,D), readout)."""
    if backend_for(q.device.type) == "triton" and triton_supports(q):
        from kernels import triton_attention

        return triton_attention.attention(q, k, v, kv_start, scale=scale, edits=edits)
    from kernels import reference

    return reference.attention(q, k, v, kv_start, scale=scale, edits=edits)


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
    edits = lvlm_ctx.edits(module.layer_idx) if lvlm_ctx is not None else None
    if edits is None or edits.is_empty:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs
        )
        if lvlm_ctx is None:
            return out, None
        out = lvlm_ctx.after_attention(module.layer_idx, out.transpose(1, 2), None).transpose(1, 2)
        return out, None
    kv_start = lvlm_ctx.kv_start(module.layer_idx)
    out, readout = edited_attention(query, key, value, kv_start, scale=scale, edits=edits)
    # Padding query rows (left of kv_start) see no key; keep them finite so they cannot leak
    # NaN into the real rows through 0 * NaN in the next layer's value products.
    out = torch.nan_to_num(out)
    out = lvlm_ctx.after_attention(module.layer_idx, out, readout)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def register() -> str:
    """Register the attention and mask functions under ATTN_NAME (idempotent); return the name."""
    AttentionInterface.register(ATTN_NAME, lvlm_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
