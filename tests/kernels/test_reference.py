"""The PyTorch reference against transformers' eager attention and torch SDPA, and each edit
against its paper's definition (docs/methods.md: "VAR", "PAI", "Where each one acts")."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import eager_attention_forward

from lvlm_hallu.kernels.edits import KEY_SINK, KEY_VISUAL, AttentionEdits
from lvlm_hallu.kernels.reference import attention, attention_probs


def _additive_mask(kv_start, tq, tk, dtype):
    """(B, 1, Tq, Tk) additive mask like transformers' causal mask with left padding."""
    row_key = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    visible = (j <= row_key)[None] & (j >= kv_start.long()[:, None, None])
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def _valid_rows(kv_start, tq, tk):
    """(B, Tq) bool: query rows that see at least one key (padding rows are excluded)."""
    row_key = torch.arange(tq)[None, :] + (tk - tq)
    return row_key >= kv_start.long()[:, None]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2), (7, 1), (28, 4)], ids=["2:1", "4:1", "7:1", "qwen2-vl-7b"])
@pytest.mark.parametrize("tq", [40, 7])
def test_plain_equals_transformers_eager_and_sdpa(tq, heads, kv_heads, make_case):
    c = make_case(B=3, H=heads, Hkv=kv_heads, Tq=tq, Tk=40)  # GQA and left padding 0/3/7
    o, readout = attention(*c.args, scale=c.scale)
    assert readout is None
    mask = _additive_mask(c.kv_start, tq, 40, torch.float32)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    eager, _ = eager_attention_forward(module, c.q, c.k, c.v, mask, scaling=c.scale)  # (B, Tq, H, D)
    sdpa = F.scaled_dot_product_attention(c.q, c.k, c.v, attn_mask=mask, scale=c.scale, enable_gqa=True)
    valid = _valid_rows(c.kv_start, tq, 40)  # (B, Tq)
    assert (~valid).any() == (tq == 40)  # the full-length case has padding rows
    torch.testing.assert_close(o.transpose(1, 2)[valid], eager[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.transpose(1, 2)[valid], sdpa.transpose(1, 2)[valid], atol=1e-5, rtol=1e-5)
    # A row that sees no key (left padding) is defined as zero.
    assert torch.equal(o.transpose(1, 2)[~valid], torch.zeros_like(o.transpose(1, 2)[~valid]))


def test_neutral_parameters_change_nothing(case):
    B, H = case.q.shape[:2]
    plain, _ = attention(*case.args, scale=case.scale)
    neutral = AttentionEdits(
        head_scale=torch.ones(B, H),
        boost_alpha=torch.zeros(B, H),
        key_class=case.key_class,
        sink_p=torch.zeros(B, H),
        sink_rho=torch.full((B,), 0.5),
        sink_min_visual=torch.full((B,), 0.2),
        sink_query_start=case.image_end,
    )
    o, _ = attention(*case.args, scale=case.scale, edits=neutral)
    assert torch.equal(o, plain)
    o, _ = attention(*case.args, scale=case.scale, edits=AttentionEdits())
    assert torch.equal(o, plain)


def test_head_scale_multiplies_each_head(case):
    plain, _ = attention(*case.args, scale=case.scale)
    e = case.edits(boost_alpha=None, sink_p=None, key_drop=False, readout=False)
    o, _ = attention(*case.args, scale=case.scale, edits=e)
    torch.testing.assert_close(o, plain * e.head_scale[:, :, None, None])


def test_logit_boost_is_pai_on_last_row(make_case):
    c = make_case(B=2, H=2, Hkv=2, Tq=5, Tk=30)
    e = c.edits(head_scale=None, sink_p=None, key_drop=False, readout=False)
    plain_a, _ = attention_probs(*c.args, scale=c.scale)
    a, _ = attention_probs(*c.args, scale=c.scale, edits=e)
    assert torch.equal(a[:, :, :-1], plain_a[:, :, :-1])  # only the last query row changes
    for b in range(2):
        for h in range(2):
            s = c.q[b, h, -1] @ c.k[b, h].T * c.scale  # (Tk,) logits of the last row
            visual = (c.key_class[b] & KEY_VISUAL) != 0
            s = torch.where(visual, s + e.boost_alpha[b, h] * s.abs(), s)
            s[: int(c.kv_start[b])] = float("-inf")
            torch.testing.assert_close(a[b, h, -1], torch.softmax(s, -1))
    # More attention on the image for a positive alpha whenever the row has positive logits there.
    visual = ((c.key_class & KEY_VISUAL) != 0)[:, None, :]
    assert ((a[:, :, -1] * visual).sum(-1) > (plain_a[:, :, -1] * visual).sum(-1)).all()


def test_key_drop_equals_removing_the_key(make_case):
    c = make_case(B=1, H=2, Hkv=1, Tq=10, Tk=30)
    drop = 5  # before every query row, so right alignment is unaffected by the removal
    key_class = torch.zeros(1, 30, dtype=torch.uint8)
    key_class[0, drop] = 4
    o, _ = attention(*c.args, scale=c.scale, edits=AttentionEdits(key_class=key_class, key_drop=True))
    keep = [j for j in range(30) if j != drop]
    expected, _ = attention(c.q, c.k[:, :, keep], c.v[:, :, keep], c.kv_start, scale=c.scale)
    torch.testing.assert_close(o, expected)


def test_readout_is_head_mean_of_last_row_before_redistribution(case):
    e = case.edits()
    _, readout = attention(*case.args, scale=case.scale, edits=e)
    before, _ = attention_probs(*case.args, scale=case.scale, edits=case.edits(sink_p=None))
    torch.testing.assert_close(readout, before[:, :, -1].mean(1))
    torch.testing.assert_close(readout.sum(-1), torch.ones(3))
    assert (readout[torch.arange(40)[None, :] < case.kv_start[:, None]] == 0).all()  # padding
    dropped = (case.key_class & 4) != 0
    assert (readout[dropped] == 0).all()


def test_sink_redistribution_follows_var(case):
    e = case.edits(head_scale=None, boost_alpha=None, key_drop=False, readout=False)
    before, _ = attention_probs(*case.args, scale=case.scale)
    after, _ = attention_probs(*case.args, scale=case.scale, edits=e)
    torch.testing.assert_close(after.sum(-1), before.sum(-1))  # rows still sum to 1 (or 0: padding)

    sink = ((case.key_class & KEY_SINK) != 0)[:, None, None, :]
    visual = ((case.key_class & KEY_VISUAL) != 0)[:, None, None, :]
    nonsink_visual = visual & ~sink
    changed = (after - before).abs().amax(-1) > 0  # (B, H, Tq)
    assert 10 < changed.sum() < changed.numel() / 2  # the case selects some rows, not all
    p = e.sink_p[:, :, None, None]
    # Selected rows: sinks keep 1 - p, visual non-sinks share Omega in proportion, rest unchanged.
    omega = p[..., 0] * (before * sink).sum(-1)
    gain = omega / (before * nonsink_visual).sum(-1)
    expected = torch.where(sink, (1 - p) * before, before)
    expected = torch.where(nonsink_visual, before * (1 + gain[..., None]), expected)
    torch.testing.assert_close(after[changed], expected[changed])
    # Only eligible rows of heads with p > 0 change, and each satisfies the selection test.
    row_key = torch.arange(40)[None, None, :]
    assert not changed[row_key.expand_as(changed) < case.image_end[:, None, None]].any()
    assert not changed[e.sink_p == 0].any()
    a_v = (before * visual).sum(-1)
    share = (before * (sink & visual)).sum(-1) / a_v
    assert (a_v[changed] >= e.sink_min_visual[:, None, None].expand_as(a_v)[changed]).all()
    assert (share[changed] <= 1 - e.sink_rho[:, None, None].expand_as(share)[changed]).all()


def test_one_pass_form_equals_materialized_redistribution(case):
    """docs/methods.md "VAR" (the fused kernel): o = [O - p·O_S + p·(l_S/l_N)·O_N] / l with unnormalized sums."""
    e = case.edits(head_scale=None, boost_alpha=None, key_drop=False, readout=False)
    o, _ = attention(*case.args, scale=case.scale, edits=e)
    before, _ = attention_probs(*case.args, scale=case.scale)
    after, _ = attention_probs(*case.args, scale=case.scale, edits=e)
    selected = (after - before).abs().amax(-1) > 0
    unnorm = before * 7.5  # any positive per-row factor: the form is scale-free
    vf = case.v.repeat_interleave(2, dim=1)  # (B, H, Tk, D)
    sink = ((case.key_class & KEY_SINK) != 0)[:, None, None, :]
    nonsink_visual = (((case.key_class & KEY_VISUAL) != 0)[:, None, None, :]) & ~sink
    l, l_s, l_n = unnorm.sum(-1), (unnorm * sink).sum(-1), (unnorm * nonsink_visual).sum(-1)
    O, O_S, O_N = unnorm @ vf, (unnorm * sink) @ vf, (unnorm * nonsink_visual) @ vf
    p = e.sink_p[:, :, None, None]
    one_pass = (O - p * O_S + p * (l_s / l_n)[..., None] * O_N) / l[..., None]
    torch.testing.assert_close(o[selected], one_pass[selected], atol=1e-5, rtol=1e-5)


def test_mixed_rows_get_what_they_get_alone(case):
    e = case.edits()
    o, readout = attention(*case.args, scale=case.scale, edits=e)
    for b in range(3):
        row = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
        row = {n: (t[b : b + 1] if isinstance(t, torch.Tensor) else t) for n, t in row.items()}
        ob, rb = attention(
            case.q[b : b + 1], case.k[b : b + 1], case.v[b : b + 1], case.kv_start[b : b + 1],
            scale=case.scale, edits=AttentionEdits(**row),
        )
        torch.testing.assert_close(o[b : b + 1], ob, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(readout[b : b + 1], rb, atol=1e-7, rtol=1e-6)


def test_low_precision_inputs_give_low_precision_output(case):
    q, k, v = (t.to(torch.bfloat16) for t in (case.q, case.k, case.v))
    o16, readout = attention(q, k, v, case.kv_start, scale=case.scale, edits=case.edits())
    assert o16.dtype == torch.bfloat16 and readout.dtype == torch.float32
    # The math runs in fp32: only the final rounding to bf16 differs from fp32 inputs.
    o32, readout32 = attention(q.float(), k.float(), v.float(), case.kv_start, scale=case.scale, edits=case.edits())
    torch.testing.assert_close(o16, o32.to(torch.bfloat16), atol=0, rtol=0)
    torch.testing.assert_close(readout, readout32)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (7, 1), (28, 4)], ids=["4:1", "7:1", "qwen2-vl-7b"])
@pytest.mark.parametrize("tq", [40, 1], ids=["prefill", "decode"])
def test_grouped_heads_with_every_edit_equal_repeated_key_value_heads(make_case, heads, kv_heads, tq):
    """Each edit acts per query head: with H/Hkv = 4 or 7 and every flag on, grouped-query
    attention equals multi-head attention over K/V repeated per group (transformers' repeat_kv)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    c = make_case(B=3, H=heads, Hkv=kv_heads, Tq=tq, Tk=40)
    e = c.edits() if tq > 1 else c.edits(sink_query_start=torch.zeros(3, dtype=torch.int32))
    q = c.q[:, :, -tq:]
    o, readout = attention(q, c.k, c.v, c.kv_start, scale=c.scale, edits=e)
    groups = heads // kv_heads
    o_mha, readout_mha = attention(q, repeat_kv(c.k, groups), repeat_kv(c.v, groups), c.kv_start, scale=c.scale, edits=e)
    torch.testing.assert_close(o, o_mha, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(readout, readout_mha, atol=1e-7, rtol=1e-6)
    plain, _ = attention(q, c.k, c.v, c.kv_start, scale=c.scale)
    assert not torch.allclose(o, plain, atol=1e-4)  # the edits act on these heads
