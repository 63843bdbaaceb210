"""Fused causal attention with per-call edits, in Triton (prefill and split-KV decode).

Same signature and semantics as `kernels/reference.py` and `kernels/edits.py`:

    attention(q, k, v, kv_start, *, scale, edits=None) -> (o, readout)

Algorithm (FlashAttention-2, arXiv 2307.08691, as in Triton's fused-attention tutorial): one
program owns BLOCK_M query rows of one (batch, head) and walks the visible keys in blocks of
BLOCK_N, keeping per row the running maximum m, the running sum l = sum_j 2^(s_j - m) and the
running output O = sum_j 2^(s_j - m) v_j, rescaled by 2^(m_old - m_new) whenever m grows; the
output is O / l. Logits are kept in base 2 (scale · log2 e folded into one multiplier), which
commutes with every edit below because all of them are positively homogeneous in s.
Visibility: key j is visible to query row i iff kv_start[b] <= j <= Tk - Tq + i (causal with
right-aligned queries and left padding); key blocks wholly below the diagonal skip the causal
mask. Grouped-query attention maps query head h to key/value head h // (H / Hkv).

Edits, each a `tl.constexpr` flag (a disabled flag compiles away; parameters are tensors so a
new request never recompiles):
- USE_HEAD_SCALE (VHR, arXiv 2412.13949): o <- head_scale[b, h] · o in the epilogue.
- USE_LOGIT_BOOST (PAI, arXiv 2407.21771): s <- s + alpha[b, h]·|s| on visual keys of the last
  query row, before masking and before the running maximum sees s.
- USE_SINK_REDIST (VAR, arXiv 2503.03321, methods.md §2.7): keys split into sinks S, visual
  non-sinks N = V∖S and the rest. Extra accumulators l_S, l_{S∩V}, l_N, O_S, O_N share the
  running-max rescaling of l and O. In the epilogue a row is selected when it is eligible,
  A_V = (l_N + l_{S∩V}) / l >= min_visual and sink share l_{S∩V} / (l_N + l_{S∩V}) <= 1 - rho;
  a selected row's output is [O - p·O_S + p·(l_S / l_N)·O_N] / l, which is the weights
  a'_S = (1-p)·a_S and a'_N = a_N + p·a(S)·a_N / a(N) applied in one pass. The three
  accumulators need small tiles, so prefill runs the eligible rows (query rows from
  sink_query_start, heads with sink_p > 0) in a second launch with this flag and the rest with
  the large tiles of the plain kernel.
- USE_KEY_DROP: keys with the KEY_DROP bit are masked like padding.
- USE_READOUT (CARVE, arXiv 2509.06461): the kernel stores the last row's log-sum-exp; a second,
  one-row pass over the keys writes 2^(s_j - lse) per head, averaged over heads in PyTorch.

Decode (Tq == 1) splits the key axis over NUM_SPLITS programs per (batch, head) so that long
contexts fill the GPU (flash-decoding); each split writes its partial (m, l, O, and the VAR
sums), and a reduction kernel merges them with the same rescaling and runs the epilogue.

Dtypes: fp32, fp16, bf16 inputs, fp32 accumulation, output in q's dtype. Under the CPU
interpreter (TRITON_INTERPRET=1) tiles are upcast to fp32 right after loading because the
interpreter computes bf16 wrongly; on the GPU fp16/bf16 tiles feed the tensor cores directly.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.edits import KEY_DROP, KEY_SINK, KEY_VISUAL, AttentionEdits

LOG2E = 1.4426950408889634
# Running-max floor: finite so that 2^(m_old - m_new) stays 1 (not NaN) while a row has seen
# only masked keys; masked logits are -inf and still give 2^(-inf) = 0.
M_FLOOR = tl.constexpr(-1.0e30)
# Key-class bits of `AttentionEdits.key_class`, as constants the kernels can read.
VISUAL_BIT = tl.constexpr(KEY_VISUAL)
SINK_BIT = tl.constexpr(KEY_SINK)
DROP_BIT = tl.constexpr(KEY_DROP)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Shared epilogue: VAR's row test on the one-pass sums (works on scalars and on row vectors).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sink_redist_coefs(l_i, l_s, l_sv, l_n, row_key, sink_p, rho, min_visual, query_start):
    # Broadcast the per-head/per-row scalars to the rows' shape first (the interpreter cannot
    # AND a scalar mask with a vector mask).
    zero = tl.zeros_like(l_i)
    sink_p = sink_p + zero
    rho = rho + zero
    min_visual = min_visual + zero
    query_start = query_start + zero.to(tl.int32)
    l_v = l_n + l_sv  # sum over V = N ∪ (S∩V)
    a_v = l_v / tl.where(l_i > 0, l_i, 1.0)
    share = l_sv / tl.where(l_v > 0, l_v, 1.0)
    selected = (row_key >= query_start) & (sink_p > 0) & (a_v >= min_visual)
    selected = selected & (share <= 1.0 - rho) & (l_n > 0)  # l_n > 0: zero-denominator guard
    coef_s = tl.where(selected, sink_p, 0.0)
    coef_n = tl.where(selected, sink_p * l_s / tl.where(l_n > 0, l_n, 1.0), 0.0)
    return coef_s, coef_n


# ----------------------------------------------------------------------------------------------
# Prefill: inner loop over one range of key blocks.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_prefill_inner(
    acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n,
    q, K_head, V_head, Cls_row, row_key, boost_row, alpha_bh,
    lo, hi, kv_start, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_n, offs_d,
    CAUSAL_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_LOGIT_BOOST: tl.constexpr, USE_SINK_REDIST: tl.constexpr, USE_KEY_DROP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    USE_CLASSES: tl.constexpr = USE_LOGIT_BOOST or USE_SINK_REDIST or USE_KEY_DROP
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key indices
        # -- logits (BLOCK_M, BLOCK_N) in base 2 --
        k_ptrs = K_head + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn  # (D, BLOCK_N)
        v_ptrs = V_head + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        if CAUSAL_MASK:
            kT = tl.load(k_ptrs, mask=cols[None, :] < hi, other=0.0)
        else:  # blocks below the diagonal end at mid <= Tk: no bounds mask needed
            kT = tl.load(k_ptrs)
        if UPCAST:
            kT = kT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        visible = cols >= kv_start  # left padding; cols < hi holds below (causal or mid <= Tk)
        if USE_CLASSES:
            cls = tl.load(Cls_row + cols, mask=cols < hi, other=0).to(tl.int32)
        if USE_KEY_DROP:
            visible = visible & ((cls & DROP_BIT) == 0)
        if USE_LOGIT_BOOST:
            boost = boost_row[:, None] & ((cls & VISUAL_BIT) != 0)[None, :]
            s = tl.where(boost, s + alpha_bh * tl.abs(s), s)
        if CAUSAL_MASK:
            mask = visible[None, :] & (cols[None, :] <= row_key[:, None])
        else:
            mask = visible[None, :]
        s = tl.where(mask, s, float("-inf"))
        # -- online softmax --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        rescale = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * rescale + tl.sum(p, 1)
        if CAUSAL_MASK:
            v = tl.load(v_ptrs, mask=cols[:, None] < hi, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        if USE_SINK_REDIST:
            is_s = (cls & SINK_BIT) != 0
            is_v = (cls & VISUAL_BIT) != 0
            p_s = tl.where(is_s[None, :], p, 0.0)
            p_n = tl.where((is_v & ~is_s)[None, :], p, 0.0)
            l_s = l_s * rescale + tl.sum(p_s, 1)
            l_sv = l_sv * rescale + tl.sum(tl.where((is_v & is_s)[None, :], p, 0.0), 1)
            l_n = l_n * rescale + tl.sum(p_n, 1)
            acc_s = tl.dot(p_s.to(v.dtype), v, acc_s * rescale[:, None], input_precision=DOT_PRECISION)
            acc_n = tl.dot(p_n.to(v.dtype), v, acc_n * rescale[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n


# ----------------------------------------------------------------------------------------------
# Prefill: one program per (BLOCK_M query rows, batch·head).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_prefill_kernel(
    Q, K, V, O,  # (B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D)
    KvStart,  # (B,) int32
    Lse,  # (B, H) fp32, base-2 log-sum-exp of the last query row (USE_READOUT)
    HeadScale, BoostAlpha, SinkP,  # (B, H) fp32
    SinkRho, SinkMinVisual, SinkQueryStart,  # (B,) fp32, fp32, int32
    KeyClass,  # (B, Tk) uint8, contiguous
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, Tq, Tk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_HEAD_SCALE: tl.constexpr, USE_LOGIT_BOOST: tl.constexpr, USE_SINK_REDIST: tl.constexpr,
    USE_KEY_DROP: tl.constexpr, USE_READOUT: tl.constexpr,
    SKIP_SINK_ROWS: tl.constexpr, SINK_BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: b · stride_b can pass 2^31 at long contexts
    h = bh % H
    hk = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_key = Tk - Tq + offs_m  # key index of each query row (right-aligned)
    kv_start = tl.load(KvStart + b)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, D)
    if UPCAST:
        q = q.to(tl.float32)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    Cls_row = KeyClass + b * Tk

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + M_FLOOR
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if USE_SINK_REDIST:
        acc_s = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc_n = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
        l_sv = tl.zeros([BLOCK_M], dtype=tl.float32)
        l_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:  # placeholders that the compiler drops
        acc_s = tl.zeros([1, 1], dtype=tl.float32)
        acc_n = tl.zeros([1, 1], dtype=tl.float32)
        l_s = tl.zeros([1], dtype=tl.float32)
        l_sv = tl.zeros([1], dtype=tl.float32)
        l_n = tl.zeros([1], dtype=tl.float32)
    boost_row = offs_m == Tq - 1  # PAI edits the last query row only
    alpha_bh = 0.0
    if USE_LOGIT_BOOST:
        alpha_bh = tl.load(BoostAlpha + b * H + h)

    # Key ranges: [lo, mid) is visible to every row of the block (only padding/drop masks);
    # [mid, hi) crosses the diagonal and needs the causal mask.
    lo = (kv_start // BLOCK_N) * BLOCK_N
    first_row_key = Tk - Tq + start_m * BLOCK_M
    mid = tl.maximum(((first_row_key + 1) // BLOCK_N) * BLOCK_N, lo)
    hi = tl.minimum(Tk, first_row_key + BLOCK_M)
    # SINK_REDIST rows run in their own launch (USE_SINK_REDIST, small tiles for the three
    # accumulators): it owns the row blocks from r0 (the eligible rows, rounded down to its
    # SINK_BLOCK_M) of heads with sink_p > 0; the other launch (SKIP_SINK_ROWS) skips the blocks
    # that lie wholly inside that range. A skipped program walks no keys and stores nothing.
    row_limit = Tq
    if USE_SINK_REDIST or SKIP_SINK_ROWS:
        first_eligible = tl.maximum(tl.load(SinkQueryStart + b) - (Tk - Tq), 0)
        r0 = (first_eligible // SINK_BLOCK_M) * SINK_BLOCK_M
        sink_rows = (tl.load(SinkP + b * H + h) > 0) & (start_m * BLOCK_M >= r0)
        if USE_SINK_REDIST:
            skip = ~sink_rows
        else:
            skip = sink_rows
        mid = tl.where(skip, lo, mid)
        hi = tl.where(skip, lo, hi)
        row_limit = tl.where(skip, 0, Tq)
    acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n = _attn_prefill_inner(
        acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n,
        q, K_head, V_head, Cls_row, row_key, boost_row, alpha_bh,
        lo, mid, kv_start, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
        False, BLOCK_N, USE_LOGIT_BOOST, USE_SINK_REDIST, USE_KEY_DROP, UPCAST, DOT_PRECISION)
    acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n = _attn_prefill_inner(
        acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n,
        q, K_head, V_head, Cls_row, row_key, boost_row, alpha_bh,
        mid, hi, kv_start, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
        True, BLOCK_N, USE_LOGIT_BOOST, USE_SINK_REDIST, USE_KEY_DROP, UPCAST, DOT_PRECISION)

    # -- epilogue --
    if USE_SINK_REDIST:
        coef_s, coef_n = _sink_redist_coefs(
            l_i, l_s, l_sv, l_n, row_key,
            tl.load(SinkP + b * H + h), tl.load(SinkRho + b), tl.load(SinkMinVisual + b),
            tl.load(SinkQueryStart + b))
        acc = acc - coef_s[:, None] * acc_s + coef_n[:, None] * acc_n
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no visible key gives 0
    if USE_HEAD_SCALE:
        o = o * tl.load(HeadScale + b * H + h)
    if USE_READOUT:
        lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))  # padding rows: no log of 0
        tl.store(Lse + bh + offs_m * 0, lse, mask=(offs_m == Tq - 1) & (offs_m < row_limit))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=offs_m[:, None] < row_limit)


# ----------------------------------------------------------------------------------------------
# Decode: one program per (batch·head, split of the key axis); one query row, so the dot
# products are row-times-tile reductions rather than tensor-core tiles.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_decode_split_kernel(
    Q, K, V,  # (B, H, 1, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)
    KvStart, BoostAlpha, KeyClass,  # (B,) int32, (B, H) fp32, (B, Tk) uint8
    MidO, MidOS, MidON,  # (B·H, NUM_SPLITS, D) fp32 partial outputs O, O_S, O_N
    MidStats,  # (B·H, NUM_SPLITS, 5) fp32 partial m, l, l_S, l_{S∩V}, l_N
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, GROUP, Tk, qk_scale, keys_per_split, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_LOGIT_BOOST: tl.constexpr, USE_SINK_REDIST: tl.constexpr, USE_KEY_DROP: tl.constexpr,
):
    USE_CLASSES: tl.constexpr = USE_LOGIT_BOOST or USE_SINK_REDIST or USE_KEY_DROP
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: b · stride_b can pass 2^31 at long contexts
    h = bh % H
    hk = h // GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_start = tl.load(KvStart + b)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd).to(tl.float32)  # (D,)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    alpha_bh = 0.0
    if USE_LOGIT_BOOST:
        alpha_bh = tl.load(BoostAlpha + b * H + h)  # the decode row is the last row

    m_i = tl.max(tl.zeros([BLOCK_N], dtype=tl.float32), 0) + M_FLOOR  # fp32 scalar
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
    l_s = l_i
    l_sv = l_i
    l_n = l_i
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    acc_s = tl.zeros([HEAD_DIM], dtype=tl.float32)
    acc_n = tl.zeros([HEAD_DIM], dtype=tl.float32)

    lo = tl.maximum(split * keys_per_split, (kv_start // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(Tk, (split + 1) * keys_per_split)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < hi
        k = tl.load(K_head + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
        s = tl.sum(q[None, :] * k, 1) * qk_scale  # (BLOCK_N,)
        visible = in_range & (cols >= kv_start)
        if USE_CLASSES:
            cls = tl.load(KeyClass + b * Tk + cols, mask=in_range, other=0).to(tl.int32)
        if USE_KEY_DROP:
            visible = visible & ((cls & DROP_BIT) == 0)
        if USE_LOGIT_BOOST:
            s = tl.where((cls & VISUAL_BIT) != 0, s + alpha_bh * tl.abs(s), s)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        rescale = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)  # (BLOCK_N,)
        l_i = l_i * rescale + tl.sum(p, 0)
        v = tl.load(V_head + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
        acc = acc * rescale + tl.sum(p[:, None] * v, 0)
        if USE_SINK_REDIST:
            is_s = (cls & SINK_BIT) != 0
            is_v = (cls & VISUAL_BIT) != 0
            p_s = tl.where(is_s, p, 0.0)
            p_n = tl.where(is_v & ~is_s, p, 0.0)
            l_s = l_s * rescale + tl.sum(p_s, 0)
            l_sv = l_sv * rescale + tl.sum(tl.where(is_v & is_s, p, 0.0), 0)
            l_n = l_n * rescale + tl.sum(p_n, 0)
            acc_s = acc_s * rescale + tl.sum(p_s[:, None] * v, 0)
            acc_n = acc_n * rescale + tl.sum(p_n[:, None] * v, 0)
        m_i = m_new

    part = bh * NUM_SPLITS + split
    tl.store(MidO + part * HEAD_DIM + offs_d, acc)
    tl.store(MidStats + part * 5 + 0, m_i)
    tl.store(MidStats + part * 5 + 1, l_i)
    if USE_SINK_REDIST:
        tl.store(MidOS + part * HEAD_DIM + offs_d, acc_s)
        tl.store(MidON + part * HEAD_DIM + offs_d, acc_n)
        tl.store(MidStats + part * 5 + 2, l_s)
        tl.store(MidStats + part * 5 + 3, l_sv)
        tl.store(MidStats + part * 5 + 4, l_n)


@triton.jit
def _attn_decode_reduce_kernel(
    MidO, MidOS, MidON, MidStats,  # as written by _attn_decode_split_kernel
    O,  # (B, H, 1, D)
    Lse,  # (B, H) fp32 (USE_READOUT)
    HeadScale, SinkP,  # (B, H) fp32
    SinkRho, SinkMinVisual, SinkQueryStart,  # (B,)
    stride_ob, stride_oh, stride_od,
    H, Tk, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_HEAD_SCALE: tl.constexpr, USE_SINK_REDIST: tl.constexpr, USE_READOUT: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: b · stride_b can pass 2^31 at long contexts
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    live = offs_s < NUM_SPLITS
    part = bh * NUM_SPLITS + offs_s  # (BLOCK_S,)
    m_s = tl.load(MidStats + part * 5 + 0, mask=live, other=M_FLOOR)
    m_i = tl.max(m_s, 0)
    w = tl.exp2(m_s - m_i)  # each split's rescaling to the common maximum
    w = tl.where(live, w, 0.0)
    l_i = tl.sum(w * tl.load(MidStats + part * 5 + 1, mask=live, other=0.0), 0)
    tile = part[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_S, D)
    acc = tl.sum(w[:, None] * tl.load(MidO + tile, mask=live[:, None], other=0.0), 0)  # (D,)
    if USE_SINK_REDIST:
        l_s = tl.sum(w * tl.load(MidStats + part * 5 + 2, mask=live, other=0.0), 0)
        l_sv = tl.sum(w * tl.load(MidStats + part * 5 + 3, mask=live, other=0.0), 0)
        l_n = tl.sum(w * tl.load(MidStats + part * 5 + 4, mask=live, other=0.0), 0)
        acc_s = tl.sum(w[:, None] * tl.load(MidOS + tile, mask=live[:, None], other=0.0), 0)
        acc_n = tl.sum(w[:, None] * tl.load(MidON + tile, mask=live[:, None], other=0.0), 0)
        coef_s, coef_n = _sink_redist_coefs(
            l_i, l_s, l_sv, l_n, Tk - 1,
            tl.load(SinkP + b * H + h), tl.load(SinkRho + b), tl.load(SinkMinVisual + b),
            tl.load(SinkQueryStart + b))
        acc = acc - coef_s * acc_s + coef_n * acc_n
    o = acc / tl.where(l_i > 0, l_i, 1.0)
    if USE_HEAD_SCALE:
        o = o * tl.load(HeadScale + b * H + h)
    if USE_READOUT:
        tl.store(Lse + bh, m_i + tl.log2(l_i))
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, o.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# READOUT: second pass over the keys for the last query row, from its log-sum-exp.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _readout_kernel(
    Q, K,  # (B, H, Tq, D), (B, Hkv, Tk, D)
    KvStart, BoostAlpha, KeyClass, Lse,  # (B,), (B, H), (B, Tk), (B, H)
    R,  # (B, H, Tk) fp32 out: per-head weights of the last query row
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, GROUP, Tq, Tk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_LOGIT_BOOST: tl.constexpr, USE_KEY_DROP: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: b · stride_b can pass 2^31 at long contexts
    h = bh % H
    hk = h // GROUP
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = cols < Tk
    q = tl.load(Q + b * stride_qb + h * stride_qh + (Tq - 1) * stride_qm + offs_d * stride_qd).to(tl.float32)
    k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=in_range[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
    s = tl.sum(q[None, :] * k, 1) * qk_scale
    visible = in_range & (cols >= tl.load(KvStart + b))  # the last row sees every key < Tk
    if USE_LOGIT_BOOST or USE_KEY_DROP:
        cls = tl.load(KeyClass + b * Tk + cols, mask=in_range, other=0).to(tl.int32)
    if USE_KEY_DROP:
        visible = visible & ((cls & DROP_BIT) == 0)
    if USE_LOGIT_BOOST:
        s = tl.where((cls & VISUAL_BIT) != 0, s + tl.load(BoostAlpha + b * H + h) * tl.abs(s), s)
    w = tl.where(visible, tl.exp2(s - tl.load(Lse + bh)), 0.0)
    tl.store(R + bh * Tk + cols, w, mask=in_range)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# CUDA tile sizes by head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages). Starting points from
# the tutorial's H100 settings, not timed here (no GPU yet). SINK_REDIST carries two more
# (BLOCK_M, D) accumulators; its tiles are the largest that compiled for sm_90 without register
# spills (checked offline with cuobjdump -res-usage at D = 128).
_PREFILL_TILES = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
_PREFILL_TILES_REDIST = {64: (64, 64, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 8, 2)}
_DECODE_BLOCK_N = {64: 64, 128: 64, 256: 32}
_INTERPRETER_BLOCK = 16  # the interpreter runs each tile in NumPy: keep tiles small


def _flags(edits: AttentionEdits | None) -> dict:
    e = edits or AttentionEdits()
    return dict(
        USE_HEAD_SCALE=e.head_scale is not None,
        USE_LOGIT_BOOST=e.boost_alpha is not None,
        USE_SINK_REDIST=e.sink_p is not None,
        USE_KEY_DROP=bool(e.key_drop),
        USE_READOUT=bool(e.readout),
    )


def _params(edits: AttentionEdits | None, q: torch.Tensor) -> dict:
    """Per-row/per-head tensors in the kernels' dtypes; a disabled one becomes a dummy pointer."""
    e = edits or AttentionEdits()
    dummy = torch.empty(1, device=q.device, dtype=torch.float32)

    def as_(t, dtype):
        return dummy if t is None else t.to(device=q.device, dtype=dtype).contiguous()

    return dict(
        HeadScale=as_(e.head_scale, torch.float32),
        BoostAlpha=as_(e.boost_alpha, torch.float32),
        SinkP=as_(e.sink_p, torch.float32),
        SinkRho=as_(e.sink_rho, torch.float32),
        SinkMinVisual=as_(e.sink_min_visual, torch.float32),
        SinkQueryStart=as_(e.sink_query_start, torch.int32),
        KeyClass=as_(e.key_class, torch.uint8),
    )


def _check(q, k, v, kv_start, edits):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % Hkv != 0:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if Tq > Tk:
        raise ValueError(f"more query rows ({Tq}) than keys ({Tk})")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if edits is not None:
        edits.validate(B, H, Tk)
    return B, H, Tq, D, Hkv, Tk


def _readout(q, k, kv_start, params, flags, lse, qk_scale, group):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    block_n = _INTERPRETER_BLOCK if _interpreting() else 128
    r = torch.empty(B, H, Tk, device=q.device, dtype=torch.float32)  # (B, H, Tk)
    _readout_kernel[(B * H, triton.cdiv(Tk, block_n))](
        q, k, kv_start, params["BoostAlpha"], params["KeyClass"], lse, r,
        *q.stride(), *k.stride(), H, group, Tq, Tk, qk_scale,
        HEAD_DIM=D, BLOCK_N=block_n,
        USE_LOGIT_BOOST=flags["USE_LOGIT_BOOST"], USE_KEY_DROP=flags["USE_KEY_DROP"],
    )
    return r.mean(dim=1)  # (B, Tk) head mean


def attention_prefill(q, k, v, kv_start, *, scale, edits=None, block_m=None, block_n=None, upcast=None):
    """Any number of query rows. `block_m`/`block_n` override the tile table (of the launch
    without SINK_REDIST); `upcast` (default: only under the interpreter) computes fp16/bf16
    tiles in fp32."""
    B, H, Tq, D, Hkv, Tk = _check(q, k, v, kv_start, edits)
    flags, params = _flags(edits), _params(edits, q)
    kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    if _interpreting():
        tile = sink_tile = (_INTERPRETER_BLOCK, _INTERPRETER_BLOCK, 4, 1)
    else:
        tile = _PREFILL_TILES.get(D, (64, 32, 4, 2))
        sink_tile = _PREFILL_TILES_REDIST.get(D, (32, 32, 4, 2))
    tile = (block_m or tile[0], block_n or tile[1], *tile[2:])
    upcast = _interpreting() if upcast is None else upcast
    fp32_dots = upcast or q.dtype == torch.float32
    o = torch.empty_like(q)  # (B, H, Tq, D)
    lse = torch.empty(B, H, device=q.device, dtype=torch.float32)
    qk_scale = scale * LOG2E
    redist = flags["USE_SINK_REDIST"]

    def launch(tile, use_sink_redist):
        _attn_prefill_kernel[(triton.cdiv(Tq, tile[0]), B * H)](
            q, k, v, o, kv_start, lse,
            params["HeadScale"], params["BoostAlpha"], params["SinkP"],
            params["SinkRho"], params["SinkMinVisual"], params["SinkQueryStart"], params["KeyClass"],
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, H // Hkv, Tq, Tk, qk_scale,
            HEAD_DIM=D, BLOCK_M=tile[0], BLOCK_N=tile[1], **{**flags, "USE_SINK_REDIST": use_sink_redist},
            SKIP_SINK_ROWS=redist and not use_sink_redist, SINK_BLOCK_M=sink_tile[0],
            UPCAST=upcast, DOT_PRECISION="ieee" if fp32_dots else "tf32",
            num_warps=tile[2], num_stages=tile[3],
        )

    launch(tile, False)
    if redist:  # the rows that SINK_REDIST may select, in a second launch on the same stream
        launch(sink_tile, True)
    readout = _readout(q, k, kv_start, params, flags, lse, qk_scale, H // Hkv) if flags["USE_READOUT"] else None
    return o, readout


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_num_splits(batch_heads: int, tk: int, block_n: int, device: torch.device) -> int:
    """Enough (batch·head, split) programs to fill the GPU twice, each with >= 4 key blocks."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    wanted = triton.cdiv(2 * sms, batch_heads)
    return max(1, min(wanted, tk // (4 * block_n), 64))


def attention_decode(q, k, v, kv_start, *, scale, edits=None, num_splits=None, block_n=None):
    """One query row (Tq == 1) with the key axis split over `num_splits` programs."""
    B, H, Tq, D, Hkv, Tk = _check(q, k, v, kv_start, edits)
    if Tq != 1:
        raise ValueError(f"attention_decode takes one query row, got {Tq}")
    flags, params = _flags(edits), _params(edits, q)
    kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    BLOCK_N = block_n or (_INTERPRETER_BLOCK if _interpreting() else _DECODE_BLOCK_N.get(D, 32))
    if num_splits is None:
        num_splits = _default_num_splits(B * H, Tk, BLOCK_N, q.device)
    # Splits start on block boundaries so that every key block is loaded whole.
    keys_per_split = triton.cdiv(triton.cdiv(Tk, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(Tk, keys_per_split)
    f32 = dict(device=q.device, dtype=torch.float32)
    mid_o = torch.empty(B * H, num_splits, D, **f32)  # (B·H, S, D)
    mid_stats = torch.empty(B * H, num_splits, 5, **f32)  # (B·H, S, 5)
    redist = flags["USE_SINK_REDIST"]
    mid_os = torch.empty(B * H, num_splits, D, **f32) if redist else mid_o
    mid_on = torch.empty(B * H, num_splits, D, **f32) if redist else mid_o
    qk_scale = scale * LOG2E
    _attn_decode_split_kernel[(B * H, num_splits)](
        q, k, v, kv_start, params["BoostAlpha"], params["KeyClass"],
        mid_o, mid_os, mid_on, mid_stats,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        H, H // Hkv, Tk, qk_scale, keys_per_split, num_splits,
        HEAD_DIM=D, BLOCK_N=BLOCK_N,
        USE_LOGIT_BOOST=flags["USE_LOGIT_BOOST"], USE_SINK_REDIST=redist,
        USE_KEY_DROP=flags["USE_KEY_DROP"],
        num_warps=4,
    )
    o = torch.empty_like(q)  # (B, H, 1, D)
    lse = torch.empty(B, H, **f32)
    _attn_decode_reduce_kernel[(B * H,)](
        mid_o, mid_os, mid_on, mid_stats, o, lse,
        params["HeadScale"], params["SinkP"],
        params["SinkRho"], params["SinkMinVisual"], params["SinkQueryStart"],
        o.stride(0), o.stride(1), o.stride(3),
        H, Tk, num_splits,
        HEAD_DIM=D, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        USE_HEAD_SCALE=flags["USE_HEAD_SCALE"], USE_SINK_REDIST=redist,
        USE_READOUT=flags["USE_READOUT"],
        num_warps=4,
    )
    readout = _readout(q, k, kv_start, params, flags, lse, qk_scale, H // Hkv) if flags["USE_READOUT"] else None
    return o, readout


def attention(q, k, v, kv_start, *, scale, edits=None):
    """o (B, H, Tq, D) in q's dtype and the read-out (B, Tk) fp32 or None; see `kernels/edits.py`."""
    if q.shape[2] == 1:
        return attention_decode(q, k, v, kv_start, scale=scale, edits=edits)
    return attention_prefill(q, k, v, kv_start, scale=scale, edits=edits)
