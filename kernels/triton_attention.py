"""Fused causal attention with per-call edits, in Triton (prefill and split-KV decode).

Same signature and semantics as `kernels/reference.py` and `kernels/edits.py`:

    attention(q, k, v, kv_start, *, scale, edits=None, out=None) -> (o, readout)

`out` (B, H, Tq, D), any strides, is where o is written: the dispatcher passes a transposed view
of a (B, Tq, H, D) buffer, the layout the layer feeds to o_proj, so no copy follows.

Algorithm (FlashAttention-2, arXiv 2307.08691, as in Triton's fused-attention tutorial): one
program owns BLOCK_M query rows of one (batch, head) and walks the visible keys in blocks of
BLOCK_N, keeping per row the running maximum m, the running sum l = sum_j 2^(s_j - m) and the
running output O = sum_j 2^(s_j - m) v_j, rescaled by 2^(m_old - m_new) whenever m grows; the
output is O / l. Logits are kept in base 2 (scale · log2 e folded into one multiplier), which
commutes with every edit below because all of them are positively homogeneous in s.
Visibility: key j is visible to query row i iff kv_start[b] <= j <= Tk - Tq + i (causal with
right-aligned queries and left padding). A program's key range [lo, hi) has two loops: blocks
in [lo, mid) lie below the diagonal and need no causal mask, and of them only those before
pad_hi can hold left padding (one scalar test per block skips the padding mask elsewhere);
blocks in [mid, hi) cross the diagonal.
Grouped-query attention maps query head h to key/value head h // (H / Hkv).

Edits, each a `tl.constexpr` flag (a disabled flag compiles away; parameters are tensors so a
new request never recompiles):
- USE_HEAD_SCALE (VHR, arXiv 2412.13949): o <- head_scale[b, h] · o in the epilogue.
- USE_LOGIT_BOOST (PAI, arXiv 2407.21771): s <- s + alpha[b, h]·|s| on visual keys of the last
  query row, before masking and before the running maximum sees s. Only the program that owns
  the last row takes the branch; the others skip it per tile with one scalar test.
- USE_SINK_REDIST (VAR, arXiv 2503.03321, docs/methods.md "VAR", the fused kernel): keys split into sinks S, visual
  non-sinks N = V∖S and the rest. Extra accumulators l_S, l_{S∩V}, l_N, O_S, O_N share the
  running-max rescaling of l and O. In the epilogue a row is selected when it is eligible,
  A_V = (l_N + l_{S∩V}) / l >= min_visual and sink share l_{S∩V} / (l_N + l_{S∩V}) <= 1 - rho;
  a selected row's output is [O - p·O_S + p·(l_S / l_N)·O_N] / l, which is the weights
  a'_S = (1-p)·a_S and a'_N = a_N + p·a(S)·a_N / a(N) applied in one pass. The three
  accumulators need small tiles, so prefill runs the eligible rows (query rows from
  sink_query_start, heads with sink_p > 0) in a second launch with this flag, and the rest with
  the large tiles of the plain kernel. The eligible rows are few (the text after the image), so
  that launch would be a serial chain of a few programs walking every key: it splits each row
  block's key range over several programs (chosen from the SM count) that write partial
  states, merged by the same reduction kernel as decode.
- USE_KEY_DROP: keys with the KEY_DROP bit are masked like padding.
- USE_READOUT (CARVE, arXiv 2509.06461): the kernel stores the last row's log-sum-exp; a second,
  one-row pass over the keys writes the head mean of 2^(s_j - lse) directly.

Decode (Tq == 1): one program per (batch, key/value head, split of the key axis) serves every
query head of its group, so K and V are loaded once per group (grouped-query attention); the
split count fills the GPU from B·Hkv against the SM count (flash-decoding). With one split the
program runs the epilogue itself; otherwise each split writes its partial (m, l, O, and the VAR
sums) and the reduction kernel merges them with the same rescaling and runs the epilogue.

Dtypes: fp32, fp16, bf16 inputs, fp32 accumulation, output in q's dtype. Under the CPU
interpreter (TRITON_INTERPRET=1) tiles are upcast to fp32 right after loading because the
interpreter computes bf16 wrongly; on the GPU fp16/bf16 tiles feed the tensor cores directly.

Host cost: the launchers do integer arithmetic in Python, convert a parameter only when its
dtype or layout is not the kernels', allocate only the buffers a call needs, and cache the
dummy pointer, the SM count and the host copy of `sink_query_start`'s minimum (one sync per
new tensor; the plan builds it once per batch layout).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from lvlm_hallu.kernels.edits import KEY_DROP, KEY_SINK, KEY_VISUAL, AttentionEdits

LOG2E = 1.4426950408889634
# Running-max floor: finite so that 2^(m_old - m_new) stays 1 (not NaN) while a row has seen
# only masked keys; masked logits are -inf and still give 2^(-inf) = 0.
M_FLOOR = tl.constexpr(-1.0e30)
# Key-class bits of `AttentionEdits.key_class`, as constants the kernels can read.
VISUAL_BIT = tl.constexpr(KEY_VISUAL)
SINK_BIT = tl.constexpr(KEY_SINK)
DROP_BIT = tl.constexpr(KEY_DROP)
STATS = tl.constexpr(5)  # per partial state: m, l, l_S, l_{S∩V}, l_N


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Shared epilogue: VAR's row test on the one-pass sums, head scale, normalization. Rows are a
# vector (prefill: query rows; decode: the query heads of a group; reduce: one row).
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


@triton.jit
def _finish(acc, l_i, acc_s, acc_n, l_s, l_sv, l_n, row_key, b, h, H,
            HeadScale, SinkP, SinkRho, SinkMinVisual, SinkQueryStart,
            USE_HEAD_SCALE: tl.constexpr, USE_SINK_REDIST: tl.constexpr):
    """acc (R, D), l_* (R,), h scalar or (R,) -> o (R, D) fp32; a row with no visible key gives 0."""
    if USE_SINK_REDIST:
        coef_s, coef_n = _sink_redist_coefs(
            l_i, l_s, l_sv, l_n, row_key, tl.load(SinkP + b * H + h), tl.load(SinkRho + b),
            tl.load(SinkMinVisual + b), tl.load(SinkQueryStart + b))
        acc = acc - coef_s[:, None] * acc_s + coef_n[:, None] * acc_n
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if USE_HEAD_SCALE:
        o = o * (tl.load(HeadScale + b * H + h) + tl.zeros_like(l_i))[:, None]
    return o


@triton.jit
def _mid_parts(Mid, PARTS, HEAD_DIM: tl.constexpr):
    """One fp32 scratch holds every split's partial state (one allocation per call):
    O, O_S, O_N (PARTS, D) each, then the stats (PARTS, 5): m, l, l_S, l_{S∩V}, l_N."""
    return Mid, Mid + PARTS * HEAD_DIM, Mid + 2 * PARTS * HEAD_DIM, Mid + 3 * PARTS * HEAD_DIM


@triton.jit
def _store_partial(Mid, PARTS, part, offs_d, live, acc, m_i, l_i, acc_s, acc_n, l_s, l_sv, l_n,
                   HEAD_DIM: tl.constexpr, USE_SINK_REDIST: tl.constexpr):
    """Store one split's partial state for `_attn_reduce_kernel`. part, live (N,): the partial
    states' indices and which to store; acc, acc_s, acc_n (N, D); the stats (N,)."""
    MidO, MidOS, MidON, MidStats = _mid_parts(Mid, PARTS, HEAD_DIM)
    tile = part[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(MidO + tile, acc, mask=live[:, None])
    tl.store(MidStats + part * STATS + 0, m_i, mask=live)
    tl.store(MidStats + part * STATS + 1, l_i, mask=live)
    if USE_SINK_REDIST:
        tl.store(MidOS + tile, acc_s, mask=live[:, None])
        tl.store(MidON + tile, acc_n, mask=live[:, None])
        tl.store(MidStats + part * STATS + 2, l_s, mask=live)
        tl.store(MidStats + part * STATS + 3, l_sv, mask=live)
        tl.store(MidStats + part * STATS + 4, l_n, mask=live)


# ----------------------------------------------------------------------------------------------
# Prefill: inner loop over one range of key blocks.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_prefill_inner(
    acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n,
    q, K_head, V_head, Cls_row, row_key, boost_row, alpha_bh, boost_here,
    lo, hi, pad_hi, kv_start, qk_scale,
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
        if USE_CLASSES:
            cls = tl.load(Cls_row + cols, mask=cols < hi, other=0).to(tl.int32)
        if USE_LOGIT_BOOST:
            if boost_here:  # only the program holding the last query row
                boost = boost_row[:, None] & ((cls & VISUAL_BIT) != 0)[None, :]
                s = tl.where(boost, s + alpha_bh * tl.abs(s), s)
        if CAUSAL_MASK:  # left padding, drops, the diagonal (cols < hi holds: cols <= row_key < Tk)
            visible = cols >= kv_start
            if USE_KEY_DROP:
                visible = visible & ((cls & DROP_BIT) == 0)
            s = tl.where(visible[None, :] & (cols[None, :] <= row_key[:, None]), s, float("-inf"))
        elif USE_KEY_DROP:  # a mask on every block anyway: fold the padding test into it
            s = tl.where(((cols >= kv_start) & ((cls & DROP_BIT) == 0))[None, :], s, float("-inf"))
        else:
            if start_n < pad_hi:  # only the first blocks can hold left padding
                s = tl.where((cols >= kv_start)[None, :], s, float("-inf"))
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
# Prefill: one program per (BLOCK_M query rows, batch·head[, split of the key axis]).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_prefill_kernel(
    Q, K, V, O,  # (B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, Tq, D) any strides
    KvStart,  # (B,) int32
    Lse,  # (B, H) fp32, base-2 log-sum-exp of the last query row (USE_READOUT)
    HeadScale, BoostAlpha, SinkP,  # (B, H) fp32
    SinkRho, SinkMinVisual, SinkQueryStart,  # (B,) fp32, fp32, int32
    KeyClass,  # (B, Tk) uint8, row stride stride_cb (a view of the cache's key-class buffer)
    Mid,  # SPLIT_KV: fp32 scratch of PARTS = B·H·R·NUM_SPLITS partial states, see _mid_parts
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_cb,
    H, GROUP, Tq, Tk, qk_scale,
    ROW_BASE, R, keys_per_split, NUM_SPLITS, PARTS,  # rows [ROW_BASE, Tq) are this launch's, R of them
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_HEAD_SCALE: tl.constexpr, USE_LOGIT_BOOST: tl.constexpr, USE_SINK_REDIST: tl.constexpr,
    USE_KEY_DROP: tl.constexpr, USE_READOUT: tl.constexpr,
    SKIP_SINK_ROWS: tl.constexpr, SINK_BLOCK_M: tl.constexpr, SPLIT_KV: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row0 = ROW_BASE + tl.program_id(0) * BLOCK_M  # first query row of this program
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: b · stride_b can pass 2^31 at long contexts
    h = bh % H
    hk = h // GROUP
    offs_m = row0 + tl.arange(0, BLOCK_M)  # query rows
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
    Cls_row = KeyClass + b * stride_cb

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
    boost_here = (row0 <= Tq - 1) & (Tq - 1 < row0 + BLOCK_M)
    alpha_bh = 0.0
    if USE_LOGIT_BOOST:
        alpha_bh = tl.load(BoostAlpha + b * H + h)

    # Key ranges: [lo, mid) is visible to every row of the block but for left padding (blocks
    # before pad_hi) and drops; [mid, hi) crosses the diagonal and needs the causal mask.
    lo = (kv_start // BLOCK_N) * BLOCK_N
    first_row_key = Tk - Tq + row0
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
        sink_rows = (tl.load(SinkP + b * H + h) > 0) & (row0 >= r0)
        if USE_SINK_REDIST:
            skip = ~sink_rows
        else:
            skip = sink_rows
        mid = tl.where(skip, lo, mid)
        hi = tl.where(skip, lo, hi)
        row_limit = tl.where(skip, 0, Tq)
    if SPLIT_KV:  # this program's share of the key axis: [c0, c0 + keys_per_split)
        c0 = tl.program_id(2) * keys_per_split
        c1 = c0 + keys_per_split
        lo = tl.maximum(lo, c0)
        hi = tl.minimum(hi, c1)
        mid = tl.minimum(tl.maximum(mid, lo), hi)
    pad_hi = ((kv_start + BLOCK_N - 1) // BLOCK_N) * BLOCK_N  # blocks from here hold no padding
    acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n = _attn_prefill_inner(
        acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n,
        q, K_head, V_head, Cls_row, row_key, boost_row, alpha_bh, boost_here,
        lo, mid, pad_hi, kv_start, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
        False, BLOCK_N, USE_LOGIT_BOOST, USE_SINK_REDIST, USE_KEY_DROP, UPCAST, DOT_PRECISION)
    acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n = _attn_prefill_inner(
        acc, l_i, m_i, acc_s, acc_n, l_s, l_sv, l_n,
        q, K_head, V_head, Cls_row, row_key, boost_row, alpha_bh, boost_here,
        mid, hi, pad_hi, kv_start, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
        True, BLOCK_N, USE_LOGIT_BOOST, USE_SINK_REDIST, USE_KEY_DROP, UPCAST, DOT_PRECISION)

    live = offs_m < row_limit  # (BLOCK_M,) rows this program stores
    if SPLIT_KV:  # partial state of this split; the reduction kernel runs the epilogue
        part = (bh * R + (offs_m - ROW_BASE)) * NUM_SPLITS + tl.program_id(2)  # (BLOCK_M,)
        _store_partial(Mid, PARTS, part, offs_d, live, acc, m_i, l_i, acc_s, acc_n, l_s, l_sv, l_n,
                       HEAD_DIM, USE_SINK_REDIST)
    else:
        o = _finish(acc, l_i, acc_s, acc_n, l_s, l_sv, l_n, row_key, b, h, H,
                    HeadScale, SinkP, SinkRho, SinkMinVisual, SinkQueryStart, USE_HEAD_SCALE, USE_SINK_REDIST)
        if USE_READOUT:
            lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))  # padding rows: no log of 0
            tl.store(Lse + bh + offs_m * 0, lse, mask=(offs_m == Tq - 1) & live)
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 o.to(O.dtype.element_ty), mask=live[:, None])


# ----------------------------------------------------------------------------------------------
# Decode: one program per (batch·kv head, split of the key axis), serving the GROUP query heads
# of its key/value head; one query row per head, so the dot products are row-times-tile
# reductions rather than tensor-core tiles.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_decode_kernel(
    Q, K, V, O,  # (B, H, 1, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D), (B, H, 1, D) any strides
    KvStart, Lse,  # (B,) int32, (B, H) fp32
    HeadScale, BoostAlpha, SinkP,  # (B, H) fp32
    SinkRho, SinkMinVisual, SinkQueryStart,  # (B,)
    KeyClass,  # (B, Tk) uint8, row stride stride_cb
    Mid,  # not DIRECT: fp32 scratch of PARTS = B·H·NUM_SPLITS partial states, see _mid_parts
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_od,
    stride_cb,
    H, HKV, GROUP, Tk, qk_scale, keys_per_split, NUM_SPLITS, PARTS,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_PAD: tl.constexpr,
    USE_HEAD_SCALE: tl.constexpr, USE_LOGIT_BOOST: tl.constexpr, USE_SINK_REDIST: tl.constexpr,
    USE_KEY_DROP: tl.constexpr, USE_READOUT: tl.constexpr, DIRECT: tl.constexpr,
):
    USE_CLASSES: tl.constexpr = USE_LOGIT_BOOST or USE_SINK_REDIST or USE_KEY_DROP
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)  # 64-bit offsets: b · stride_b can pass 2^31 at long contexts
    hk = bhk % HKV
    offs_g = tl.arange(0, GROUP_PAD)
    g_live = offs_g < GROUP
    h = hk * GROUP + offs_g  # (GROUP_PAD,) query heads of this key/value head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_start = tl.load(KvStart + b)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_live[:, None], other=0.0).to(tl.float32)  # (G, D)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    alpha = tl.zeros([GROUP_PAD], dtype=tl.float32)
    if USE_LOGIT_BOOST:  # the decode row is the last row
        alpha = tl.load(BoostAlpha + b * H + h, mask=g_live, other=0.0)

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) + M_FLOOR
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    l_s = l_i
    l_sv = l_i
    l_n = l_i
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    acc_s = acc
    acc_n = acc

    lo = tl.maximum(split * keys_per_split, (kv_start // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(Tk, (split + 1) * keys_per_split)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < hi
        k = tl.load(K_head + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D), once per group
        s = tl.sum(q[:, None, :] * k[None, :, :], 2) * qk_scale  # (G, BLOCK_N)
        visible = in_range & (cols >= kv_start)
        if USE_CLASSES:
            cls = tl.load(KeyClass + b * stride_cb + cols, mask=in_range, other=0).to(tl.int32)
        if USE_KEY_DROP:
            visible = visible & ((cls & DROP_BIT) == 0)
        if USE_LOGIT_BOOST:
            s = tl.where(((cls & VISUAL_BIT) != 0)[None, :], s + alpha[:, None] * tl.abs(s), s)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        rescale = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # (G, BLOCK_N)
        l_i = l_i * rescale + tl.sum(p, 1)
        v = tl.load(V_head + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        if USE_SINK_REDIST:
            is_s = ((cls & SINK_BIT) != 0)[None, :]
            is_v = ((cls & VISUAL_BIT) != 0)[None, :]
            p_s = tl.where(is_s, p, 0.0)
            p_n = tl.where(is_v & ~is_s, p, 0.0)
            l_s = l_s * rescale + tl.sum(p_s, 1)
            l_sv = l_sv * rescale + tl.sum(tl.where(is_v & is_s, p, 0.0), 1)
            l_n = l_n * rescale + tl.sum(p_n, 1)
            acc_s = acc_s * rescale[:, None] + tl.sum(p_s[:, :, None] * v[None, :, :], 1)
            acc_n = acc_n * rescale[:, None] + tl.sum(p_n[:, :, None] * v[None, :, :], 1)
        m_i = m_new

    if DIRECT:  # one split: the epilogue here, no reduction launch
        o = _finish(acc, l_i, acc_s, acc_n, l_s, l_sv, l_n, Tk - 1, b, h, H,
                    HeadScale, SinkP, SinkRho, SinkMinVisual, SinkQueryStart, USE_HEAD_SCALE, USE_SINK_REDIST)
        if USE_READOUT:
            tl.store(Lse + b * H + h, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=g_live)
        tl.store(O + b * stride_ob + h[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(O.dtype.element_ty), mask=g_live[:, None])
    else:
        part = (b * H + h) * NUM_SPLITS + split  # (G,)
        _store_partial(Mid, PARTS, part, offs_d, g_live, acc, m_i, l_i, acc_s, acc_n, l_s, l_sv, l_n,
                       HEAD_DIM, USE_SINK_REDIST)


# ----------------------------------------------------------------------------------------------
# Reduction of split partial states (decode splits, and prefill's split VAR rows).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_reduce_kernel(
    Mid,  # scratch of PARTS = B·H·R·NUM_SPLITS partial states, see _mid_parts
    O,  # (B, H, Tq, D) any strides
    Lse,  # (B, H) fp32 (USE_READOUT)
    HeadScale, SinkP,  # (B, H) fp32
    SinkRho, SinkMinVisual, SinkQueryStart,  # (B,)
    stride_ob, stride_oh, stride_om, stride_od,
    H, Tq, Tk, ROW_BASE, R, NUM_SPLITS, PARTS,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, SINK_BLOCK_M: tl.constexpr,
    USE_HEAD_SCALE: tl.constexpr, USE_SINK_REDIST: tl.constexpr, USE_READOUT: tl.constexpr,
    SINK_ROWS_ONLY: tl.constexpr,
):
    bh = tl.program_id(0)
    r = tl.program_id(1)
    row = ROW_BASE + r  # query row
    MidO, MidOS, MidON, MidStats = _mid_parts(Mid, PARTS, HEAD_DIM)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: b · stride_b can pass 2^31 at long contexts
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    live = offs_s < NUM_SPLITS
    part = (bh * R + r) * NUM_SPLITS + offs_s  # (BLOCK_S,)
    m_s = tl.load(MidStats + part * STATS + 0, mask=live, other=M_FLOOR)
    m_i = tl.max(m_s, 0)
    w = tl.exp2(m_s - m_i)  # each split's rescaling to the common maximum
    w = tl.where(live, w, 0.0)
    l_i = tl.sum(w * tl.load(MidStats + part * STATS + 1, mask=live, other=0.0), 0, keep_dims=True)  # (1,)
    tile = part[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_S, D)
    acc = tl.sum(w[:, None] * tl.load(MidO + tile, mask=live[:, None], other=0.0), 0, keep_dims=True)  # (1, D)
    l_s = l_i
    l_sv = l_i
    l_n = l_i
    acc_s = acc
    acc_n = acc
    if USE_SINK_REDIST:
        l_s = tl.sum(w * tl.load(MidStats + part * STATS + 2, mask=live, other=0.0), 0, keep_dims=True)
        l_sv = tl.sum(w * tl.load(MidStats + part * STATS + 3, mask=live, other=0.0), 0, keep_dims=True)
        l_n = tl.sum(w * tl.load(MidStats + part * STATS + 4, mask=live, other=0.0), 0, keep_dims=True)
        acc_s = tl.sum(w[:, None] * tl.load(MidOS + tile, mask=live[:, None], other=0.0), 0, keep_dims=True)
        acc_n = tl.sum(w[:, None] * tl.load(MidON + tile, mask=live[:, None], other=0.0), 0, keep_dims=True)
    row_key = Tk - Tq + row + tl.zeros([1], dtype=tl.int32)
    o = _finish(acc, l_i, acc_s, acc_n, l_s, l_sv, l_n, row_key, b, h, H,
                HeadScale, SinkP, SinkRho, SinkMinVisual, SinkQueryStart, USE_HEAD_SCALE, USE_SINK_REDIST)
    store = tl.zeros([1], dtype=tl.int32) == 0  # (1,) True
    if SINK_ROWS_ONLY:  # prefill: only the rows the split VAR launch owned (same test as there)
        first_eligible = tl.maximum(tl.load(SinkQueryStart + b) - (Tk - Tq), 0)
        r0 = (first_eligible // SINK_BLOCK_M) * SINK_BLOCK_M
        block_start = ROW_BASE + (r // SINK_BLOCK_M) * SINK_BLOCK_M
        one = tl.zeros([1], dtype=tl.int32)  # vector operands only (the interpreter)
        store = store & ((tl.load(SinkP + b * H + h) + one.to(tl.float32)) > 0) & ((block_start + one) >= r0)
    if USE_READOUT:
        lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))
        last = (row + tl.zeros([1], dtype=tl.int32)) == Tq - 1  # (1,): vector masks only (interpreter)
        tl.store(Lse + bh + tl.zeros([1], dtype=tl.int32), lse, mask=store & last)
    tl.store(O + b * stride_ob + h * stride_oh + row * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=store[:, None])


# ----------------------------------------------------------------------------------------------
# READOUT: second pass over the keys for the last query row, from its log-sum-exp; the program
# of a (batch, key block) sums the heads itself and writes the head mean.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _readout_kernel(
    Q, K,  # (B, H, Tq, D), (B, Hkv, Tk, D)
    KvStart, BoostAlpha, KeyClass, Lse,  # (B,), (B, H), (B, Tk) row stride stride_cb, (B, H)
    Out,  # (B, Tk) fp32: head mean of the last query row's weights
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_cb,
    H, GROUP, Tq, Tk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_LOGIT_BOOST: tl.constexpr, USE_KEY_DROP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = cols < Tk
    visible = in_range & (cols >= tl.load(KvStart + b))  # the last row sees every key < Tk
    if USE_LOGIT_BOOST or USE_KEY_DROP:
        cls = tl.load(KeyClass + b * stride_cb + cols, mask=in_range, other=0).to(tl.int32)
    if USE_KEY_DROP:
        visible = visible & ((cls & DROP_BIT) == 0)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(0, H):
        hk = h // GROUP
        q = tl.load(Q + b * stride_qb + h * stride_qh + (Tq - 1) * stride_qm + offs_d * stride_qd).to(tl.float32)
        k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, D)
        s = tl.sum(q[None, :] * k, 1) * qk_scale
        if USE_LOGIT_BOOST:
            s = tl.where((cls & VISUAL_BIT) != 0, s + tl.load(BoostAlpha + b * H + h) * tl.abs(s), s)
        total += tl.where(visible, tl.exp2(s - tl.load(Lse + b * H + h)), 0.0)
    tl.store(Out + b * Tk + cols, total / H, mask=in_range)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# CUDA tile sizes by head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages). Starting points from
# the tutorial's H100 settings, not timed here (no GPU yet). SINK_REDIST carries two more
# (BLOCK_M, D) accumulators; its tiles are the largest that compiled for sm_90 without register
# spills (checked offline with cuobjdump -res-usage at D = 128: benchmarks/attention.py).
_PREFILL_TILES = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
_PREFILL_TILES_REDIST = {64: (64, 64, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 8, 2)}
_DECODE_BLOCK_N = {64: 64, 128: 64, 256: 32}
_DECODE_WARPS = 8  # (G, BLOCK_N, D) product tiles of 8k elements: 8 warps keep them in registers
_READOUT_BLOCK_N = 64
# The interpreter runs each tile in NumPy: keep tiles small. Triton reads TRITON_INTERPRET when a
# kernel is defined, so it is read here once too (not on every call).
_INTERPRET = _interpreting()
_INTERPRETER_BLOCK = 16
_INTERPRETER_TILE = (_INTERPRETER_BLOCK, _INTERPRETER_BLOCK, 4, 1)
_FLAG_NAMES = ("USE_HEAD_SCALE", "USE_LOGIT_BOOST", "USE_SINK_REDIST", "USE_KEY_DROP", "USE_READOUT")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _dummy(device: torch.device) -> torch.Tensor:
    """Pointer for disabled parameters (never read)."""
    return torch.empty(1, device=device, dtype=torch.float32)


def _flag_key(e: AttentionEdits | None) -> tuple[bool, ...]:
    """(HEAD_SCALE, LOGIT_BOOST, SINK_REDIST, KEY_DROP, READOUT)."""
    if e is None:
        return (False,) * 5
    return (e.head_scale is not None, e.boost_alpha is not None, e.sink_p is not None,
            bool(e.key_drop), bool(e.readout))


def _as(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device, dummy: torch.Tensor) -> torch.Tensor:
    """The kernels' dtype and a contiguous layout on q's device; no copy when it already is."""
    if t is None:
        return dummy
    if t.dtype is dtype and t.device == device and t.is_contiguous():
        return t
    return t.to(device=device, dtype=dtype).contiguous()


def _params(e: AttentionEdits | None, device: torch.device, dummy: torch.Tensor) -> tuple:
    """(HeadScale, BoostAlpha, SinkP, SinkRho, SinkMinVisual, SinkQueryStart, KeyClass)."""
    if e is None:
        return (dummy,) * 7
    f32 = torch.float32
    return (
        _as(e.head_scale, f32, device, dummy),
        _as(e.boost_alpha, f32, device, dummy),
        _as(e.sink_p, f32, device, dummy),
        _as(e.sink_rho, f32, device, dummy),
        _as(e.sink_min_visual, f32, device, dummy),
        _as(e.sink_query_start, torch.int32, device, dummy),
        _classes(e.key_class, device, dummy),
    )


def _classes(t: torch.Tensor | None, device: torch.device, dummy: torch.Tensor) -> torch.Tensor:
    """Key classes: rows may be strided (a (B, Tk) view of a wider cache buffer), keys not."""
    if t is None:
        return dummy
    if t.dtype is torch.uint8 and t.device == device and t.stride(-1) == 1:
        return t
    return t.to(device=device, dtype=torch.uint8).contiguous()


_HOST_MIN: dict[int, tuple[torch.Tensor, int]] = {}


def _host_min(t: torch.Tensor) -> int:
    """min(t) on the host, one device sync per tensor object: the plan builds sink_query_start
    once per batch layout and every layer passes the same tensor (never mutated in place).
    Holding the tensor keeps its id from being reused while it is cached."""
    seen = _HOST_MIN.get(id(t))
    if seen is None or seen[0] is not t:
        if len(_HOST_MIN) > 64:
            _HOST_MIN.clear()
        seen = _HOST_MIN[id(t)] = (t, int(t.min()))
    return seen[1]


def _check(q, k, v, edits):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % Hkv:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if Tq > Tk:
        raise ValueError(f"more query rows ({Tq}) than keys ({Tk})")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if edits is not None:
        edits.validate(B, H, Tk)
    return B, H, Tq, D, Hkv, Tk


def _out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype is not q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}")
    return out


def _kv_start(kv_start: torch.Tensor, device: torch.device) -> torch.Tensor:
    if kv_start.dtype is torch.int32 and kv_start.device == device and kv_start.is_contiguous():
        return kv_start
    return kv_start.to(device=device, dtype=torch.int32).contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of q's GPU; 0 off the GPU (callers then pick one split)."""
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(programs: int, key_blocks: int, sms: int, min_blocks: int) -> int:
    """Splits of the key axis so that `programs` · splits fills the GPU twice over (one split
    once `programs` alone fills it), each split walking at least `min_blocks` key blocks."""
    if sms == 0 or programs >= sms:
        return 1
    return max(1, min(_cdiv(2 * sms, programs), key_blocks // min_blocks, 64))


# Launch plans: everything about a call that depends only on shapes, dtype, flags and options
# (grids, constexpr keyword arguments, split counts, scratch sizes) is computed once per key.
_PLANS: dict[tuple, tuple] = {}


def _prefill_plan(B, H, Hkv, Tq, Tk, D, dtype, flags, sms, block_m, block_n, upcast, var_splits, first):
    """(main grid, main kwargs, sink launch or None, readout launch or None)."""
    if _INTERPRET:
        tile = sink_tile = _INTERPRETER_TILE
    else:
        tile = _PREFILL_TILES.get(D, (64, 32, 4, 2))
        sink_tile = _PREFILL_TILES_REDIST.get(D, (32, 32, 4, 2))
    if block_m or block_n:
        tile = (block_m or tile[0], block_n or tile[1], *tile[2:])
    upcast = _INTERPRET if upcast is None else upcast
    precision = "ieee" if upcast or dtype == torch.float32 else "tf32"
    named = dict(zip(_FLAG_NAMES, flags))
    redist = named["USE_SINK_REDIST"]
    main = ((_cdiv(Tq, tile[0]), B * H, 1), dict(
        HEAD_DIM=D, BLOCK_M=tile[0], BLOCK_N=tile[1], **dict(named, USE_SINK_REDIST=False),
        SKIP_SINK_ROWS=redist, SINK_BLOCK_M=sink_tile[0], SPLIT_KV=False, UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=tile[2], num_stages=tile[3]))
    sink = None
    if redist:
        bm, bn = sink_tile[0], sink_tile[1]
        row_base = min(first // bm * bm, (Tq - 1) // bm * bm)  # first row block with an eligible row
        rows = Tq - row_base
        blocks = _cdiv(rows, bm)
        splits = var_splits or _num_splits(blocks * B * H, _cdiv(Tk, bn), sms, 4)
        keys_per_split = _cdiv(_cdiv(Tk, splits), bn) * bn
        splits = _cdiv(Tk, keys_per_split)
        kw = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, **named, SKIP_SINK_ROWS=False, SINK_BLOCK_M=bm,
                  SPLIT_KV=splits > 1, UPCAST=upcast, DOT_PRECISION=precision,
                  num_warps=sink_tile[2], num_stages=sink_tile[3])
        reduce = None
        if splits > 1:
            reduce = ((B * H, rows), dict(
                HEAD_DIM=D, BLOCK_S=max(2, _pow2(splits)), SINK_BLOCK_M=bm,
                USE_HEAD_SCALE=named["USE_HEAD_SCALE"], USE_SINK_REDIST=True,
                USE_READOUT=named["USE_READOUT"], SINK_ROWS_ONLY=True, num_warps=4))
        sink = ((blocks, B * H, splits), kw, row_base, rows, keys_per_split, splits, reduce)
    return main, sink, _readout_plan(B, H, Tk, D, named)


def _readout_plan(B, H, Tk, D, named):
    if not named["USE_READOUT"]:
        return None
    block_n = _INTERPRETER_BLOCK if _INTERPRET else _READOUT_BLOCK_N
    return (B, _cdiv(Tk, block_n)), dict(HEAD_DIM=D, BLOCK_N=block_n, USE_LOGIT_BOOST=named["USE_LOGIT_BOOST"],
                                         USE_KEY_DROP=named["USE_KEY_DROP"])


def _readout(plan, q, k, kv_start, params, lse, qk_scale, group):
    grid, kw = plan
    B, H, Tq = q.shape[0], q.shape[1], q.shape[2]
    Tk = k.shape[2]
    r = torch.empty(B, Tk, device=q.device, dtype=torch.float32)  # (B, Tk) head mean
    _readout_kernel[grid](q, k, kv_start, params[1], params[6], lse, r,
                          *q.stride(), *k.stride(), params[6].stride(0), H, group, Tq, Tk, qk_scale, **kw)
    return r


def attention_prefill(q, k, v, kv_start, *, scale, edits=None, out=None, block_m=None, block_n=None,
                      upcast=None, var_splits=None):
    """Any number of query rows. `block_m`/`block_n` override the tile table (of the launch
    without SINK_REDIST); `upcast` (default: only under the interpreter) computes fp16/bf16
    tiles in fp32; `var_splits` sets the key splits of the SINK_REDIST rows (default: from the
    SM count; 1 off the GPU)."""
    B, H, Tq, D, Hkv, Tk = _check(q, k, v, edits)
    device = q.device
    flags = _flag_key(edits)
    dummy = _dummy(device)
    params = _params(edits, device, dummy)
    first = max(_host_min(params[5]) - (Tk - Tq), 0) if flags[2] else 0  # first eligible query row
    key = ("prefill", B, H, Hkv, Tq, Tk, D, q.dtype, device, flags, block_m, block_n, upcast, var_splits, first)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _prefill_plan(B, H, Hkv, Tq, Tk, D, q.dtype, flags, _sms(device),
                                           block_m, block_n, upcast, var_splits, first)
    (grid, kw), sink, readout_plan = plan
    kv_start = _kv_start(kv_start, device)
    o = _out(q, out)
    lse = torch.empty(B, H, device=device, dtype=torch.float32) if flags[4] else dummy
    qk_scale = scale * LOG2E
    strides = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), params[6].stride(0))
    # Launch 1: every row block not wholly owned by the SINK_REDIST launch, large tiles.
    _attn_prefill_kernel[grid](q, k, v, o, kv_start, lse, *params, dummy,
                               *strides, H, H // Hkv, Tq, Tk, qk_scale, 0, Tq, Tk, 1, 0, **kw)
    if sink is not None:
        # Launch 2 (+ reduction): the row blocks from the first eligible row on, small tiles, the
        # key axis split over programs when those blocks alone would leave the GPU idle.
        grid, kw, row_base, rows, keys_per_split, splits, reduce = sink
        if reduce is None:
            _attn_prefill_kernel[grid](q, k, v, o, kv_start, lse, *params, dummy,
                                       *strides, H, H // Hkv, Tq, Tk, qk_scale, row_base, rows, Tk, 1, 0, **kw)
        else:
            parts = B * H * rows * splits
            mid = torch.empty(parts * (3 * D + 5), device=device, dtype=torch.float32)  # _mid_parts
            _attn_prefill_kernel[grid](q, k, v, o, kv_start, lse, *params, mid,
                                       *strides, H, H // Hkv, Tq, Tk, qk_scale, row_base, rows, keys_per_split,
                                       splits, parts, **kw)
            _attn_reduce_kernel[reduce[0]](mid, o, lse, params[0], params[2], params[3], params[4], params[5],
                                           *strides[12:16], H, Tq, Tk, row_base, rows, splits, parts, **reduce[1])
    readout = None
    if readout_plan is not None:
        readout = _readout(readout_plan, q, k, kv_start, params, lse, qk_scale, H // Hkv)
    return o, readout


def _decode_plan(B, H, Hkv, Tk, D, flags, sms, num_splits, block_n):
    named = dict(zip(_FLAG_NAMES, flags))
    block_n = block_n or (_INTERPRETER_BLOCK if _INTERPRET else _DECODE_BLOCK_N.get(D, 32))
    if num_splits is None:
        num_splits = _num_splits(B * Hkv, _cdiv(Tk, block_n), sms, 2)
    # Splits start on block boundaries so that every key block is loaded whole.
    keys_per_split = _cdiv(_cdiv(Tk, num_splits), block_n) * block_n
    num_splits = _cdiv(Tk, keys_per_split)
    direct = num_splits == 1
    kw = dict(HEAD_DIM=D, BLOCK_N=block_n, GROUP_PAD=_pow2(H // Hkv), **named, DIRECT=direct,
              num_warps=_DECODE_WARPS)
    reduce = None
    if not direct:
        reduce = ((B * H, 1), dict(
            HEAD_DIM=D, BLOCK_S=max(2, _pow2(num_splits)), SINK_BLOCK_M=1,
            USE_HEAD_SCALE=named["USE_HEAD_SCALE"], USE_SINK_REDIST=named["USE_SINK_REDIST"],
            USE_READOUT=named["USE_READOUT"], SINK_ROWS_ONLY=False, num_warps=4))
    return (B * Hkv, num_splits), kw, keys_per_split, num_splits, reduce, _readout_plan(B, H, Tk, D, named)


def attention_decode(q, k, v, kv_start, *, scale, edits=None, out=None, num_splits=None, block_n=None):
    """One query row (Tq == 1) with the key axis split over `num_splits` programs per
    (batch, key/value head) (default: from B·Hkv against the SM count; 1 off the GPU)."""
    B, H, Tq, D, Hkv, Tk = _check(q, k, v, edits)
    if Tq != 1:
        raise ValueError(f"attention_decode takes one query row, got {Tq}")
    device = q.device
    flags = _flag_key(edits)
    key = ("decode", B, H, Hkv, Tk, D, device, flags, num_splits, block_n)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _decode_plan(B, H, Hkv, Tk, D, flags, _sms(device), num_splits, block_n)
    grid, kw, keys_per_split, splits, reduce, readout_plan = plan
    dummy = _dummy(device)
    params = _params(edits, device, dummy)
    kv_start = _kv_start(kv_start, device)
    o = _out(q, out)
    lse = torch.empty(B, H, device=device, dtype=torch.float32) if flags[4] else dummy
    qk_scale = scale * LOG2E
    parts = B * H * splits
    mid = dummy if reduce is None else torch.empty(parts * (3 * D + 5), device=device, dtype=torch.float32)
    ostr = o.stride()
    qstr = q.stride()
    _attn_decode_kernel[grid](
        q, k, v, o, kv_start, lse, *params, mid,
        qstr[0], qstr[1], qstr[3], *k.stride(), *v.stride(), ostr[0], ostr[1], ostr[3], params[6].stride(0),
        H, Hkv, H // Hkv, Tk, qk_scale, keys_per_split, splits, parts, **kw)
    if reduce is not None:
        _attn_reduce_kernel[reduce[0]](mid, o, lse, params[0], params[2], params[3], params[4], params[5],
                                       *ostr, H, 1, Tk, 0, 1, splits, parts, **reduce[1])
    readout = None
    if readout_plan is not None:
        readout = _readout(readout_plan, q, k, kv_start, params, lse, qk_scale, H // Hkv)
    return o, readout


def attention(q, k, v, kv_start, *, scale, edits=None, out=None):
    """o (B, H, Tq, D) in q's dtype and the read-out (B, Tk) fp32 or None; see `kernels/edits.py`."""
    if q.shape[2] == 1:
        return attention_decode(q, k, v, kv_start, scale=scale, edits=edits, out=out)
    return attention_prefill(q, k, v, kv_start, scale=scale, edits=edits, out=out)
