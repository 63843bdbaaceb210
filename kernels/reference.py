"""Attention with per-call edits, written out with materialized probabilities.

This is the CPU path and the test oracle of the Triton kernels in `triton_attention.py`; the
signature and semantics are those of `kernels/edits.py`. Every edit is written as its paper
states it, on the full (B, H, Tq, Tk) matrices, in fp32 (or, for the benchmarks' fp16 eager
baseline, in `compute_dtype`):

- plain attention: a_ij = softmax_j(q_i·k_j·scale) over the keys j visible to query row i
  (causal, right-aligned queries, left padding before kv_start[b], grouped-query heads);
- HEAD_SCALE (VHR, arXiv 2412.13949): o[b, h] <- head_scale[b, h] · o[b, h];
- LOGIT_BOOST (PAI, arXiv 2407.21771): on the LAST query row, s_ij <- s_ij + alpha·|s_ij| for
  visual keys j, before the softmax;
- SINK_REDIST (VAR, arXiv 2503.03321): for an eligible row with A_V = sum of its weights on
  visual keys V and sink share = (weights on S∩V) / A_V, when A_V >= min_visual and
  sink share <= 1 - rho, the sinks S give up the fraction p of their weight,
  Omega = p · sum_{j in S} a_ij, and the visual non-sinks N = V∖S receive Omega in proportion
  to their weights; the row still sums to 1 (docs/methods.md, "VAR", steps 3-4);
- KEY_DROP: keys with the KEY_DROP bit are masked like padding;
- READOUT (CARVE, arXiv 2509.06461): head-mean weights of the last query row, after
  LOGIT_BOOST and before SINK_REDIST.

A query row that sees no key at all (a left-padding row, or every key dropped) gets zero
weights and a zero output, like the kernels (transformers' eager path would give a uniform
row there; such rows are padding and their output is never used).
"""

from __future__ import annotations

import torch

from lvlm_hallu.kernels.edits import KEY_DROP, KEY_SINK, KEY_VISUAL, AttentionEdits


def _key_bits(edits: AttentionEdits, bit: int) -> torch.Tensor:
    # (B, Tk) uint8 -> (B, 1, 1, Tk) bool, broadcast over heads and query rows
    return ((edits.key_class.to(torch.int32) & bit) != 0)[:, None, None, :]


def _visible(kv_start: torch.Tensor, tq: int, tk: int, edits: AttentionEdits | None) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool: key j is visible to query row i."""
    device = kv_start.device
    row_key = torch.arange(tq, device=device)[:, None] + (tk - tq)  # (Tq, 1) key index of row i
    j = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    causal = j <= row_key  # (Tq, Tk)
    after_start = j >= kv_start.to(device).long()[:, None]  # (B, Tk)
    visible = causal[None, None] & after_start[:, None, None, :]
    if edits is not None and edits.key_drop:
        visible = visible & ~_key_bits(edits, KEY_DROP)
    return visible


def _softmax_weights(q, k, kv_start, scale, edits, dt=torch.float32):
    """Post-softmax weights (B, H, Tq, Tk) in dt after LOGIT_BOOST, before SINK_REDIST."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    kf = k.to(dt).repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
    s = torch.matmul(q.to(dt), kf.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if edits is not None and edits.boost_alpha is not None:
        # PAI: s' = s + alpha·|s| on visual keys, last query row only, before masking.
        alpha = edits.boost_alpha.to(s.device, dt)[:, :, None]  # (B, H, 1)
        visual = _key_bits(edits, KEY_VISUAL)[:, :, 0, :]  # (B, 1, Tk)
        last = s[:, :, -1, :]
        s[:, :, -1, :] = torch.where(visual, last + alpha * last.abs(), last)
    visible = _visible(kv_start, Tq, Tk, edits)
    s = s.masked_fill(~visible, float("-inf"))
    # A row with no visible key is all -inf; softmax gives NaN there, which we define as 0.
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def _redistribute(a, edits, tk):
    """VAR (docs/methods.md, "VAR", steps 3-4) on materialized weights a (B, H, Tq, Tk) fp32."""
    B, H, Tq, _ = a.shape
    sink = _key_bits(edits, KEY_SINK)  # S: text and visual sinks
    visual = _key_bits(edits, KEY_VISUAL)  # V
    nonsink_visual = visual & ~sink  # N = V \ S
    a_v = (a * visual).sum(-1)  # (B, H, Tq)  A_V
    a_sv = (a * (sink & visual)).sum(-1)  # weights on visual sinks
    a_s = (a * sink).sum(-1)  # weights on all sinks
    a_n = (a * nonsink_visual).sum(-1)  # weights on visual non-sinks
    share = torch.where(a_v > 0, a_sv / torch.where(a_v > 0, a_v, 1.0), 0.0)

    p = edits.sink_p.to(a.device, a.dtype)[:, :, None]  # (B, H, 1)
    rho = edits.sink_rho.to(a.device, a.dtype)[:, None, None]  # (B, 1, 1)
    min_visual = edits.sink_min_visual.to(a.device, a.dtype)[:, None, None]
    row_key = torch.arange(Tq, device=a.device) + (tk - Tq)  # (Tq,)
    eligible = row_key[None, None, :] >= edits.sink_query_start.to(a.device).long()[:, None, None]
    selected = (
        eligible & (p > 0) & (a_v >= min_visual) & (share <= 1 - rho) & (a_n > 0)
    )  # (B, H, Tq); a_n > 0 guards the empty/zero denominator

    omega = p * a_s  # (B, H, Tq)  mass taken from the sinks
    gain = omega / torch.where(a_n > 0, a_n, 1.0)  # per unit of non-sink visual weight
    redistributed = torch.where(sink, (1 - p[..., None]) * a, a)
    redistributed = torch.where(nonsink_visual, a + gain[..., None] * a, redistributed)
    return torch.where(selected[..., None], redistributed, a)


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    *,
    scale: float,
    edits: AttentionEdits | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Post-edit weights (B, H, Tq, Tk) in compute_dtype (the oracle: fp32) and the read-out
    (B, Tk) fp32 or None.

    The weights are those that multiply V: after LOGIT_BOOST, KEY_DROP and SINK_REDIST
    (HEAD_SCALE acts on the output, not on the weights).
    """
    if edits is not None:
        edits.validate(q.shape[0], q.shape[1], k.shape[2])
    a = _softmax_weights(q, k, kv_start, scale, edits, compute_dtype)
    readout = None
    if edits is not None and edits.readout:
        readout = a[:, :, -1, :].float().mean(dim=1)  # (B, Tk) head mean of the last query row
    if edits is not None and edits.sink_p is not None:
        a = _redistribute(a, edits, k.shape[2])
    return a, readout


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    *,
    scale: float,
    edits: AttentionEdits | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o (B, H, Tq, D) in q's dtype and the read-out (B, Tk) fp32 or None; see `kernels/edits.py`.
    `compute_dtype` fp16 gives the fp16 eager implementation the benchmarks compare against."""
    B, H, Tq, D = q.shape
    a, readout = attention_probs(q, k, v, kv_start, scale=scale, edits=edits, compute_dtype=compute_dtype)
    vf = v.to(compute_dtype).repeat_interleave(H // v.shape[1], dim=1)  # (B, H, Tk, D)
    o = torch.matmul(a, vf)  # (B, H, Tq, D)
    if edits is not None and edits.head_scale is not None:
        o = o * edits.head_scale.to(o.device, compute_dtype)[:, :, None, None]
    return o.to(q.dtype), readout
