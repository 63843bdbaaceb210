"""Triton kernels against the PyTorch reference: every flag alone and together, prefill and
split-KV decode, mixed rows, neutral parameters.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tiny shapes).
Tolerances against the fp32 reference: fp32 inputs atol = rtol = 1e-5; fp16 inputs (tiles
upcast to fp32 after loading, as on the interpreter) atol = rtol = 2e-3, i.e. the output's own
fp16 rounding; bf16 inputs (upcast) atol = rtol = 1.6e-2, one bf16 step; fp16 tiles fed to the
dots directly (the GPU path) atol = rtol = 1e-2.
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

import pytest  # noqa: E402

from lvlm_hallu.kernels import reference  # noqa: E402
from lvlm_hallu.kernels import triton_attention as ta  # noqa: E402
from lvlm_hallu.kernels.edits import AttentionEdits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
NO_UPCAST_TOL = dict(atol=1e-2, rtol=1e-2)

# Edits by flag: the fields each flag needs, taken from the case's all-flags edits.
FLAG_FIELDS = {
    "head_scale": ("head_scale",),
    "logit_boost": ("boost_alpha", "key_class"),
    "sink_redist": ("sink_p", "sink_rho", "sink_min_visual", "sink_query_start", "key_class"),
    "key_drop": ("key_drop", "key_class"),
    "readout": ("readout",),
}


def _only(case, *flags) -> AttentionEdits:
    full = case.edits()
    keep = {f for flag in flags for f in FLAG_FIELDS[flag]}
    return AttentionEdits(**{f.name: getattr(full, f.name) for f in dataclasses.fields(full) if f.name in keep})


def _to_device(case, dtype=torch.float32):
    q, k, v = (t.to(DEVICE, dtype) for t in (case.q, case.k, case.v))
    return q, k, v, case.kv_start.to(DEVICE)


def _edits_to_device(e: AttentionEdits) -> AttentionEdits:
    return AttentionEdits(**{
        f.name: (getattr(e, f.name).to(DEVICE) if isinstance(getattr(e, f.name), torch.Tensor) else getattr(e, f.name))
        for f in dataclasses.fields(e)
    })


def _check(got, want, tol):
    (o, r), (o_ref, r_ref) = got, want
    assert o.dtype == o_ref.dtype
    torch.testing.assert_close(o.float().cpu(), o_ref.float(), **tol)
    assert (r is None) == (r_ref is None)
    if r is not None:
        assert r.dtype == torch.float32
        torch.testing.assert_close(r.cpu(), r_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "flags",
    [(), ("head_scale",), ("logit_boost",), ("sink_redist",), ("key_drop",), ("readout",),
     ("logit_boost", "sink_redist", "readout"), tuple(FLAG_FIELDS)],
    ids=lambda f: "+".join(f) or "plain",
)
def test_prefill_matches_reference(case, flags):
    e = _only(case, *flags) if flags else None
    want = reference.attention(*case.args, scale=case.scale, edits=e)
    got = ta.attention_prefill(*_to_device(case), scale=case.scale, edits=e and _edits_to_device(e))
    _check(got, want, TOL[torch.float32])


def test_prefill_low_precision_and_chunked_queries(make_case):
    c = make_case(B=2, Tq=21, Tk=37)  # a query chunk after a KV cache; blocks not aligned
    # Eligible rows from 17 (row 0) and 19 (row 1): the SINK_REDIST launch owns rows 16..20.
    e = c.edits(sink_query_start=torch.tensor([33, 35], dtype=torch.int32))
    q, k, v, kv_start = _to_device(c, torch.float16)
    want = reference.attention(q.cpu(), k.cpu(), v.cpu(), c.kv_start, scale=c.scale, edits=e)
    _check(ta.attention_prefill(q, k, v, kv_start, scale=c.scale, edits=_edits_to_device(e)), want, TOL[torch.float16])
    # Row blocks of the plain launch (32 rows) straddle the first block of the SINK_REDIST launch (16).
    got = ta.attention_prefill(q, k, v, kv_start, scale=c.scale, edits=_edits_to_device(e), block_m=32)
    _check(got, want, TOL[torch.float16])
    # The GPU path: fp16 tiles go into the dots as they are (p rounded to fp16 before P·V).
    got = ta.attention_prefill(q, k, v, kv_start, scale=c.scale, edits=_edits_to_device(e), upcast=False)
    _check(got, want, NO_UPCAST_TOL)
    q, k, v, kv_start = _to_device(c, torch.bfloat16)
    want = reference.attention(q.cpu(), k.cpu(), v.cpu(), c.kv_start, scale=c.scale, edits=e)
    _check(ta.attention_prefill(q, k, v, kv_start, scale=c.scale, edits=_edits_to_device(e)), want, TOL[torch.bfloat16])


@pytest.mark.parametrize(
    "flags",
    [(), *((flag,) for flag in FLAG_FIELDS), tuple(FLAG_FIELDS)],
    ids=lambda f: "+".join(f) or "plain",
)
def test_decode_matches_reference_and_prefill_last_row(case, flags):
    e = _only(case, *flags) if flags else None
    q, k, v, kv_start = _to_device(case)
    de = e and _edits_to_device(e)
    want = reference.attention(case.q[:, :, -1:], case.k, case.v, case.kv_start, scale=case.scale, edits=e)
    got = ta.attention_decode(q[:, :, -1:], k, v, kv_start, scale=case.scale, edits=de, num_splits=2)
    _check(got, want, TOL[torch.float32])
    if flags == tuple(FLAG_FIELDS):
        o_pre, r_pre = ta.attention_prefill(q, k, v, kv_start, scale=case.scale, edits=de)
        torch.testing.assert_close(got[0], o_pre[:, :, -1:], **TOL[torch.float32])
        torch.testing.assert_close(got[1], r_pre, atol=1e-6, rtol=1e-5)
        # The public entry point picks the decode kernel for one query row.
        o_pub, _ = ta.attention(q[:, :, -1:], k, v, kv_start, scale=case.scale, edits=de)
        torch.testing.assert_close(o_pub, got[0], **TOL[torch.float32])


def test_split_kv_equals_unsplit(make_case):
    c = make_case(B=2, H=2, Hkv=1, Tq=1, Tk=100)
    c.kv_start[1] = 45  # whole splits of row 1 lie in the left padding
    c.key_class[1, :45] = 0
    e = _edits_to_device(c.edits(sink_query_start=torch.zeros(2, dtype=torch.int32)))
    q, k, v, kv_start = _to_device(c)
    one = ta.attention_decode(q, k, v, kv_start, scale=c.scale, edits=e, num_splits=1)
    want = reference.attention(*c.args, scale=c.scale, edits=c.edits(sink_query_start=torch.zeros(2, dtype=torch.int32)))
    _check(one, want, TOL[torch.float32])
    for splits in (3, 7):
        o, r = ta.attention_decode(q, k, v, kv_start, scale=c.scale, edits=e, num_splits=splits)
        torch.testing.assert_close(o, one[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r, one[1], atol=1e-7, rtol=1e-5)
    # fp16 K/V through the split path.
    q16, k16, v16, _ = _to_device(c, torch.float16)
    want16 = reference.attention(q16.cpu(), k16.cpu(), v16.cpu(), c.kv_start, scale=c.scale,
                                 edits=c.edits(sink_query_start=torch.zeros(2, dtype=torch.int32)))
    _check(ta.attention_decode(q16, k16, v16, kv_start, scale=c.scale, edits=e, num_splits=3), want16, TOL[torch.float16])


def test_disabled_flags_and_neutral_parameters_give_the_plain_kernel_exactly(case):
    B, H = case.q.shape[:2]
    q, k, v, kv_start = _to_device(case)
    neutral = _edits_to_device(AttentionEdits(
        head_scale=torch.ones(B, H),
        boost_alpha=torch.zeros(B, H),
        key_class=case.key_class,
        sink_p=torch.zeros(B, H),
        sink_rho=torch.full((B,), 0.5),
        sink_min_visual=torch.full((B,), 0.2),
        sink_query_start=case.image_end,
    ))
    plain, _ = ta.attention_prefill(q, k, v, kv_start, scale=case.scale)
    assert torch.equal(ta.attention_prefill(q, k, v, kv_start, scale=case.scale, edits=AttentionEdits())[0], plain)
    assert torch.equal(ta.attention_prefill(q, k, v, kv_start, scale=case.scale, edits=neutral)[0], plain)
    plain, _ = ta.attention_decode(q[:, :, -1:], k, v, kv_start, scale=case.scale, num_splits=2)
    got, _ = ta.attention_decode(q[:, :, -1:], k, v, kv_start, scale=case.scale, edits=neutral, num_splits=2)
    assert torch.equal(got, plain)


def test_mixed_rows_get_what_they_get_alone(case):
    e = case.edits()
    q, k, v, kv_start = _to_device(case)
    o, r = ta.attention_prefill(q, k, v, kv_start, scale=case.scale, edits=_edits_to_device(e))
    for b in range(q.shape[0]):
        row = AttentionEdits(**{
            f.name: (getattr(e, f.name)[b : b + 1] if isinstance(getattr(e, f.name), torch.Tensor) else getattr(e, f.name))
            for f in dataclasses.fields(e)
        })
        ob, rb = ta.attention_prefill(q[b : b + 1], k[b : b + 1], v[b : b + 1], kv_start[b : b + 1],
                                      scale=case.scale, edits=_edits_to_device(row))
        assert torch.equal(o[b : b + 1], ob)
        assert torch.equal(r[b : b + 1], rb)


def test_kernels_compile_for_hopper_without_spills():
    """The interpreter never runs Triton's compiler: compile every GPU kernel variant (prefill's
    fp16 tiles into wgmma, the split VAR rows, decode, reduce, read-out) for sm_90 offline with
    the bundled ptxas, and check that none spills registers."""
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump").exists():
        pytest.skip("this Triton build ships no CUDA tools")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, str(root / "benchmarks/attention.py"), "--sm90-resources"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if "registers" in line]
    assert len(lines) == 8  # 4 prefill variants (2 of them VAR), 2 decode, reduce, readout
    assert all("spill stack 0 B" in line for line in lines), out.stdout
    assert all("wgmma True" in line for line in lines if line.startswith("prefill")), out.stdout


class _Counting:
    """Wraps a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("shape", [dict(B=2, Tq=40, Tk=40), dict(B=2, Tq=21, Tk=37)], ids=["prefill", "chunk"])
def test_var_rows_split_over_keys_match_reference(make_case, monkeypatch, shape):
    """SINK_REDIST rows with their key axis split over programs (partials merged by the
    reduction kernel) give the reference's output and read-out, like the unsplit launch."""
    c = make_case(**shape)
    e = c.edits() if shape["Tq"] == shape["Tk"] else c.edits(sink_query_start=torch.tensor([30, 33], dtype=torch.int32))
    want = reference.attention(*c.args, scale=c.scale, edits=e)
    reduce = _Counting(ta._attn_reduce_kernel)
    monkeypatch.setattr(ta, "_attn_reduce_kernel", reduce)
    q, k, v, kv_start = _to_device(c)
    got = ta.attention_prefill(q, k, v, kv_start, scale=c.scale, edits=_edits_to_device(e), var_splits=3)
    assert reduce.launches == 1
    _check(got, want, TOL[torch.float32])
    if shape["Tq"] == shape["Tk"]:  # the unsplit launch (also covered by the tests above) agrees
        one = ta.attention_prefill(q, k, v, kv_start, scale=c.scale, edits=_edits_to_device(e), var_splits=1)
        assert reduce.launches == 1  # one split: no reduction
        torch.testing.assert_close(got[0], one[0], atol=1e-6, rtol=1e-5)


def test_decode_with_one_split_launches_no_reduction(case, monkeypatch):
    reduce = _Counting(ta._attn_reduce_kernel)
    monkeypatch.setattr(ta, "_attn_reduce_kernel", reduce)
    e = case.edits()
    q, k, v, kv_start = _to_device(case)
    want = reference.attention(case.q[:, :, -1:], case.k, case.v, case.kv_start, scale=case.scale, edits=e)
    _check(ta.attention_decode(q[:, :, -1:], k, v, kv_start, scale=case.scale, edits=_edits_to_device(e),
                               num_splits=1), want, TOL[torch.float32])
    assert reduce.launches == 0
    ta.attention_decode(q[:, :, -1:], k, v, kv_start, scale=case.scale, edits=_edits_to_device(e), num_splits=2)
    assert reduce.launches == 1


@pytest.mark.parametrize("tq", [40, 1], ids=["prefill", "decode"])
def test_output_written_in_the_layers_layout(case, tq):
    """`out` = a (B, Tq, H, D) buffer seen as (B, H, Tq, D): the kernels write through the view."""
    e = case.edits()
    q, k, v, kv_start = _to_device(case)
    q = q[:, :, -tq:]
    B, H, _, D = q.shape
    buf = torch.full((B, tq, H, D), float("nan"), device=DEVICE)
    o, _ = ta.attention(q, k, v, kv_start, scale=case.scale, edits=_edits_to_device(e), out=buf.transpose(1, 2))
    assert o.data_ptr() == buf.data_ptr()
    want, _ = reference.attention(case.q[:, :, -tq:], case.k, case.v, case.kv_start, scale=case.scale, edits=e)
    torch.testing.assert_close(buf.cpu(), want.transpose(1, 2), **TOL[torch.float32])
    with pytest.raises(ValueError, match="out must be"):
        ta.attention(q, k, v, kv_start, scale=case.scale, out=buf)


def test_decode_groups_of_three_query_heads(make_case):
    """GQA decode: one program per key/value head serves its 3 query heads (padded to 4)."""
    c = make_case(B=2, H=6, Hkv=2, Tq=1, Tk=50)
    e = c.edits(sink_query_start=torch.zeros(2, dtype=torch.int32))
    q, k, v, kv_start = _to_device(c)
    want = reference.attention(*c.args, scale=c.scale, edits=e)
    for splits in (1, 3):
        _check(ta.attention_decode(q, k, v, kv_start, scale=c.scale, edits=_edits_to_device(e), num_splits=splits),
               want, TOL[torch.float32])


def test_split_counts_fill_an_h100():
    """Split choice from the SM count (132 on an H100 SXM): batch 1 at 600 keys fills the GPU,
    batch 8 needs no split, and no split walks fewer than its minimum of key blocks."""
    sms = 132
    grid, _, _, splits, reduce, _ = ta._decode_plan(1, 32, 32, 600, 128, (False,) * 5, sms, None, 64)
    assert grid[0] * splits >= sms and reduce is not None
    assert 2 * splits <= -(-600 // 64)  # each split walks >= 2 key blocks
    grid, _, _, splits, reduce, _ = ta._decode_plan(8, 32, 32, 600, 128, (False,) * 5, sms, None, 64)
    assert splits == 1 and reduce is None  # 256 programs already fill 132 SMs
    _, _, _, splits, _, _ = ta._decode_plan(1, 32, 32, 64, 128, (False,) * 5, sms, None, 64)
    assert splits == 1  # one key block: nothing to split
    # Prefill with VAR at 621 tokens, eligible rows from 611 (the text after 576 image tokens).
    flags = (True, True, True, True, True)
    _, sink, _ = ta._prefill_plan(1, 32, 32, 621, 621, 128, torch.float16, flags, sms, None, None, False, None, 611)
    grid, _, row_base, rows, keys_per_split, splits, reduce = sink
    assert row_base <= 611 < row_base + grid[0] * ta._PREFILL_TILES_REDIST[128][0] or ta._INTERPRET
    assert rows == 621 - row_base
    assert grid[0] * grid[1] * splits >= sms and reduce is not None
    assert ta._num_splits(4, 100, 0, 4) == 1  # off the GPU: one split


def test_key_classes_may_be_a_strided_view(case):
    """The plan hands a (B, Tk) view of the cache's wider key-class buffer: used in place."""
    B, Tk = case.key_class.shape
    buffer = torch.zeros(B, Tk + 24, dtype=torch.uint8)
    buffer[:, :Tk] = case.key_class
    view = _edits_to_device(case.edits(key_class=buffer[:, :Tk]))
    dense = _edits_to_device(case.edits())
    assert not view.key_class.is_contiguous() and ta._classes(view.key_class, view.key_class.device, None) is view.key_class
    q, k, v, kv_start = _to_device(case)
    for a, b in zip(ta.attention_decode(q[:, :, -1:], k, v, kv_start, scale=case.scale, edits=view, num_splits=2),
                    ta.attention_decode(q[:, :, -1:], k, v, kv_start, scale=case.scale, edits=dense, num_splits=2)):
        assert torch.equal(a, b)
    only = dict(head_scale=None, sink_p=None, sink_rho=None, sink_min_visual=None, sink_query_start=None)
    view, dense = (AttentionEdits(**{**e.__dict__, **only}) for e in (view, dense))
    for a, b in zip(ta.attention_prefill(q, k, v, kv_start, scale=case.scale, edits=view),
                    ta.attention_prefill(q, k, v, kv_start, scale=case.scale, edits=dense)):
        assert torch.equal(a, b)


GQA = [(8, 2), (7, 1), (14, 2)]  # H/Hkv = 4 and 7 (Qwen2-VL-7B: 28 query heads, 4 KV heads)


@pytest.mark.parametrize("heads,kv_heads", GQA, ids=[f"{h}q{k}kv" for h, k in GQA])
@pytest.mark.parametrize("flags", [(), tuple(FLAG_FIELDS)], ids=["plain", "all-flags"])
def test_gqa_groups_of_four_and_seven_match_reference(make_case, heads, kv_heads, flags):
    """Prefill (a query chunk after cached keys) and split-KV decode with H/Hkv = 4 and 7: each
    program loads its K/V head once for the whole group of query heads (a group of 7 is padded),
    and gives the reference's output and read-out."""
    c = make_case(B=2, H=heads, Hkv=kv_heads, Tq=12, Tk=30)
    e = _only(c, *flags) if flags else None
    de = e and _edits_to_device(e)
    q, k, v, kv_start = _to_device(c)
    want = reference.attention(*c.args, scale=c.scale, edits=e)
    _check(ta.attention_prefill(q, k, v, kv_start, scale=c.scale, edits=de), want, TOL[torch.float32])
    e1 = e and dataclasses.replace(e, sink_query_start=torch.zeros(2, dtype=torch.int32) if e.sink_p is not None else None)
    want1 = reference.attention(c.q[:, :, -1:], c.k, c.v, c.kv_start, scale=c.scale, edits=e1)
    for splits in (1, 2):
        got = ta.attention_decode(q[:, :, -1:], k, v, kv_start, scale=c.scale, edits=e1 and _edits_to_device(e1),
                                  num_splits=splits)
        _check(got, want1, TOL[torch.float32])


def test_gqa_equals_attention_over_repeated_key_value_heads(make_case, heads=7, kv_heads=1):
    """Grouped-query attention is multi-head attention over K/V heads repeated per group
    (transformers' `repeat_kv`): the GQA launch equals the MHA launch on repeated K/V, edits on."""
    from transformers.models.llama.modeling_llama import repeat_kv

    c = make_case(B=2, H=heads, Hkv=kv_heads, Tq=6, Tk=30)
    e = _edits_to_device(c.edits(sink_query_start=torch.tensor([24, 27], dtype=torch.int32)))
    q, k, v, kv_start = _to_device(c)
    groups = heads // kv_heads
    k_mha, v_mha = repeat_kv(k, groups), repeat_kv(v, groups)  # (B, H, Tk, D)
    for run in (lambda k_, v_: ta.attention_prefill(q, k_, v_, kv_start, scale=c.scale, edits=e),
                lambda k_, v_: ta.attention_decode(q[:, :, -1:], k_, v_, kv_start, scale=c.scale, num_splits=2,
                                                   edits=dataclasses.replace(e, sink_query_start=torch.zeros_like(kv_start)))):
        (o, r), (o_mha, r_mha) = run(k, v), run(k_mha, v_mha)
        torch.testing.assert_close(o, o_mha, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r, r_mha, atol=1e-7, rtol=1e-5)
