"""Per-call attention edits: the data contract between the intervention plan and the kernels.

Every attention implementation in `kernels/` (the PyTorch reference and the Triton kernels) takes
the same arguments:

    attention(q, k, v, kv_start, *, scale, edits=None) -> (o, readout)
    (the Triton kernels also take `out=`: a (B, H, Tq, D) tensor of any strides to write o into)

    q         (B, H, Tq, D)    query rows; row i sits at key index Tk - Tq + i (right-aligned)
    k, v      (B, Hkv, Tk, D)  keys/values, H % Hkv == 0 (grouped-query attention)
    kv_start  (B,) int32       first valid key of each row (left padding); key j is visible to
                               query i iff kv_start[b] <= j <= Tk - Tq + i (causal)
    scale     float            softmax scale (head_dim ** -0.5 for Llama)
    o         (B, H, Tq, D)    in q's dtype
    readout   (B, Tk) fp32     only with `edits.readout`: post-softmax weights of the LAST query
                               row, averaged over heads (after LOGIT_BOOST, before SINK_REDIST);
                               None otherwise

Each field of `AttentionEdits` switches on one feature flag when it is not None/False. All
per-row and per-head parameters are tensors so that a new request never recompiles a kernel.
A row whose parameter is neutral (head_scale 1, boost_alpha 0, sink_p 0) gets the plain output.
A query row that sees no key at all (left padding, or every visible key dropped) gets o = 0.

Key classes are bit flags in `key_class` (B, Tk) uint8:
    KEY_VISUAL = 1   the key is an image token (the row's visual positions V)
    KEY_SINK   = 2   the key is in the layer's sink set S (text sinks such as BOS, or visual sinks)
    KEY_DROP   = 4   the key is ignored like a masked key (KEY_DROP flag only)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEY_VISUAL = 1
KEY_SINK = 2
KEY_DROP = 4


@dataclass(frozen=True)
class AttentionEdits:
    """Feature switches and their per-row tensors for one attention call (one layer)."""

    # HEAD_SCALE (VHR, arXiv 2412.13949): o[b, h] *= head_scale[b, h] for every query row.
    head_scale: torch.Tensor | None = None  # (B, H) fp32
    # LOGIT_BOOST (PAI, arXiv 2407.21771): s' = s + alpha * |s| on visual keys, LAST query row only.
    boost_alpha: torch.Tensor | None = None  # (B, H) fp32
    # Key classes (bit flags above); needed by LOGIT_BOOST, SINK_REDIST, KEY_DROP and READOUT users.
    key_class: torch.Tensor | None = None  # (B, Tk) uint8
    # SINK_REDIST (VAR, arXiv 2503.03321; docs/methods.md "VAR", the fused kernel): on for a row/head when sink_p is set.
    sink_p: torch.Tensor | None = None  # (B, H) fp32, fraction of sink attention recycled (0 = off)
    sink_rho: torch.Tensor | None = None  # (B,) fp32, paper's rho: select when sink share <= 1 - rho
    sink_min_visual: torch.Tensor | None = None  # (B,) fp32, select when A_V >= this (paper: 0.2)
    sink_query_start: torch.Tensor | None = None  # (B,) int32, key index from which query rows are eligible
    # KEY_DROP: keys with the KEY_DROP bit are invisible.
    key_drop: bool = False
    # READOUT (CARVE, arXiv 2509.06461): head-mean weights of the last query row over all keys.
    readout: bool = False

    @property
    def is_empty(self) -> bool:
        return (
            self.head_scale is None
            and self.boost_alpha is None
            and self.sink_p is None
            and not self.key_drop
            and not self.readout
        )

    def validate(self, batch: int, heads: int, keys: int) -> None:
        """Raise ValueError when a tensor does not have the documented shape."""
        bh, b = (batch, heads), (batch,)
        for t, name, shape in (  # runs on every kernel call: kept cheap (no dict, no conversions)
            (self.head_scale, "head_scale", bh),
            (self.boost_alpha, "boost_alpha", bh),
            (self.key_class, "key_class", (batch, keys)),
            (self.sink_p, "sink_p", bh),
            (self.sink_rho, "sink_rho", b),
            (self.sink_min_visual, "sink_min_visual", b),
            (self.sink_query_start, "sink_query_start", b),
        ):
            if t is not None and t.shape != shape:
                raise ValueError(f"AttentionEdits.{name} has shape {tuple(t.shape)}, expected {shape}")
        needs_classes = self.boost_alpha is not None or self.sink_p is not None or self.key_drop
        if needs_classes and self.key_class is None:
            raise ValueError("LOGIT_BOOST, SINK_REDIST and KEY_DROP need key_class")
        if self.sink_p is not None and (
            self.sink_rho is None or self.sink_min_visual is None or self.sink_query_start is None
        ):
            raise ValueError("SINK_REDIST needs sink_rho, sink_min_visual and sink_query_start")
