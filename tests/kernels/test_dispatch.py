"""Which attention call the dispatcher makes for each key layout, and that every call gives the
reference's output in the layer's (B, Tq, H, D) layout.

A layer without edits must reach torch SDPA with NO mask (is_causal=True for prefill) when no
row is padded, since any explicit mask rules out SDPA's flash and memory-efficient kernels.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from lvlm_hallu.kernels import dispatch, reference  # noqa: E402
from lvlm_hallu.kernels.edits import AttentionEdits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton backend's tensors


class Ctx:
    """The engine's AttentionContext with a fixed layout and edits."""

    def __init__(self, kv_start, layout, edits=None):
        self._kv_start, self.layout, self._edits = kv_start, layout, edits
        self.seen = []

    def edits(self, layer):
        return self._edits

    def kv_start(self, layer):
        return self._kv_start

    def key_layout(self, layer):
        return self.layout

    def after_attention(self, layer, out, readout):
        self.seen.append((tuple(out.shape), readout))
        return out * 2.0  # something visible: the dispatcher must return what this returns


class Calls(list):
    def __init__(self):
        super().__init__()
        self.keys = []

    def with_keys(self, n):
        return [c for c, k in zip(self, self.keys) if k == n]

    def clear(self):
        super().clear()
        self.keys.clear()


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records (attn_mask is None, is_causal) of every torch SDPA call; `calls.keys` holds the
    key count of each call."""
    calls = Calls()
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        calls.keys.append(k.shape[2])
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _module(groups):
    return types.SimpleNamespace(layer_idx=0, num_key_value_groups=groups, is_causal=True, training=False)


def _mask(kv_start, tq, tk):
    """(B, 1, Tq, Tk) bool like the engine's causal mask with left padding."""
    j = torch.arange(tk)
    row_key = torch.arange(tq) + (tk - tq)
    visible = (j[None, None, :] >= kv_start[:, None, None]) & (j[None, None, :] <= row_key[None, :, None])
    return (visible | (j[None, None, :] == row_key[None, :, None]))[:, None]


def _call(case, tq, layout, edits=None, device="cpu"):
    """One dispatcher call on `device`; returns the output on the CPU and the context."""
    q, k, v, kv_start = (t.to(device) for t in (case.q[:, :, -tq:], case.k, case.v, case.kv_start))
    if edits is not None:
        edits = AttentionEdits(**{n: (t.to(device) if isinstance(t, torch.Tensor) else t)
                                  for n, t in edits.__dict__.items()})
    ctx = Ctx(kv_start, layout, edits)
    mask = _mask(case.kv_start, tq, case.k.shape[2]).to(device)
    out, weights = dispatch.lvlm_attention(_module(case.q.shape[1] // case.k.shape[1]), q, k, v, mask,
                                           scaling=case.scale, lvlm_ctx=ctx)
    assert weights is None
    assert out.shape == (q.shape[0], tq, q.shape[1], q.shape[3]) and out.is_contiguous()
    return out.cpu(), ctx


def _unpadded(case):
    case.kv_start = torch.zeros_like(case.kv_start)
    return case


@pytest.mark.parametrize("tq", [40, 1], ids=["prefill", "decode"])
def test_unpadded_layers_call_sdpa_without_a_mask(make_case, sdpa_calls, tq):
    case = _unpadded(make_case())
    out, ctx = _call(case, tq, "causal")
    assert sdpa_calls == [(True, tq > 1)]  # no mask; is_causal for prefill only
    want, _ = reference.attention(case.q[:, :, -tq:], case.k, case.v, case.kv_start, scale=case.scale)
    torch.testing.assert_close(out, 2.0 * want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert ctx.seen == [((3, 4, tq, 16), None)]  # after_attention sees (B, H, Tq, D)


@pytest.mark.parametrize("layout,tq", [("padded", 40), ("padded", 1), ("masked", 40), ("causal", 7)],
                         ids=["padded-prefill", "padded-decode", "masked", "chunk-after-cache"])
def test_other_layouts_pass_the_mask_on_cpu(make_case, sdpa_calls, layout, tq):
    """Off the GPU, padding, a plan's key mask, or a query chunk after a cache (SDPA's is_causal
    would align the diagonal top-left) keep the engine's mask."""
    case = make_case() if layout != "causal" else _unpadded(make_case())
    out, _ = _call(case, tq, layout)
    assert sdpa_calls == [(False, False)]
    want, _ = reference.attention(case.q[:, :, -tq:], case.k, case.v, case.kv_start, scale=case.scale)
    valid = (torch.arange(tq) + case.k.shape[2] - tq)[None, :] >= case.kv_start[:, None]  # (B, Tq) rows with keys
    torch.testing.assert_close(out[valid], 2.0 * want.transpose(1, 2)[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq", [40, 1], ids=["prefill", "decode"])
def test_padded_layers_take_the_fused_kernel_on_the_triton_backend(make_case, sdpa_calls, monkeypatch, tq):
    """On the Triton backend a padded batch without edits runs our kernel with per-row starts
    (no SDPA, no mask); unpadded layers still go to SDPA without a mask."""
    monkeypatch.setattr(dispatch, "backend_for", lambda device_type: "triton")
    case = make_case()
    out, _ = _call(case, tq, "padded", device=DEVICE)
    assert sdpa_calls == []
    want, _ = reference.attention(case.q[:, :, -tq:], case.k, case.v, case.kv_start, scale=case.scale)
    torch.testing.assert_close(out, 2.0 * want.transpose(1, 2), atol=1e-5, rtol=1e-5)  # padding rows: 0 in both
    assert dispatch.plain_call(case.q, case.k, "causal") == "sdpa-causal"
    assert dispatch.plain_call(case.q[:, :, -7:], case.k, "causal") == "fused"  # chunk after a cache
    assert dispatch.plain_call(case.q, case.k, "masked") == "sdpa-mask"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_edited_layers_write_the_layers_layout(case, sdpa_calls, monkeypatch, backend):
    monkeypatch.setattr(dispatch, "backend_for", lambda device_type: backend)
    e = case.edits()
    out, ctx = _call(case, 40, "padded", e, device=DEVICE if backend == "triton" else "cpu")
    assert sdpa_calls == []
    want, readout = reference.attention(*case.args, scale=case.scale, edits=e)
    torch.testing.assert_close(out, 2.0 * want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ctx.seen[0][1].cpu(), readout, atol=1e-5, rtol=1e-4)


def test_engine_prefill_and_decode_without_padding_use_sdpa_without_mask(sdpa_calls):
    """Through the engine: one request (no padding) reaches SDPA with no mask in every layer, at
    prefill with is_causal; a left-padded batch passes its mask (CPU backend)."""
    from lvlm_hallu import lvlm
    from lvlm_hallu.lvlm.engine import NoPlan
    from PIL import Image

    pipe = lvlm.load("tiny-llava")
    layers = pipe.facts.num_layers
    reqs = [lvlm.Request("Describe this image.", Image.new("RGB", (40, 30), "red"), max_new_tokens=2),
            lvlm.Request("Hi", Image.new("RGB", (64, 64), "blue"), max_new_tokens=2)]
    batch = pipe.prepare(reqs[:1])
    T = batch["input_ids"].shape[1]  # the vision tower's own SDPA calls have other key counts
    logits, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), NoPlan())
    assert sdpa_calls.with_keys(T) == [(True, True)] * layers
    sdpa_calls.clear()
    pipe.engine.decode_one_token(logits.argmax(-1), state)
    assert sdpa_calls.with_keys(T + 1) == [(True, False)] * layers
    sdpa_calls.clear()
    batch = pipe.prepare(reqs)
    assert (batch["attention_mask"] == 0).any()
    pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), NoPlan())
    assert sdpa_calls.with_keys(batch["input_ids"].shape[1]) == [(False, False)] * layers
