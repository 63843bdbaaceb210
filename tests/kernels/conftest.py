"""Small attention cases shared by the kernel tests: GQA, left padding, sinks and image keys.

Shapes stay tiny because the Triton tests run under the CPU interpreter.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from lvlm_hallu.kernels.edits import KEY_DROP, KEY_SINK, KEY_VISUAL, AttentionEdits

if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined: set it before anything imports the kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclasses.dataclass
class Case:
    q: torch.Tensor  # (B, H, Tq, D)
    k: torch.Tensor  # (B, Hkv, Tk, D)
    v: torch.Tensor  # (B, Hkv, Tk, D)
    kv_start: torch.Tensor  # (B,) int32
    key_class: torch.Tensor  # (B, Tk) uint8
    image_end: torch.Tensor  # (B,) int32, first key after the image
    scale: float

    @property
    def args(self):
        return self.q, self.k, self.v, self.kv_start

    def edits(self, **fields) -> AttentionEdits:
        """Every flag on with non-neutral, per-row/per-head different parameters; override by name."""
        B, H = self.q.shape[:2]
        g = torch.Generator().manual_seed(1)
        base = dict(
            head_scale=0.5 + torch.rand(B, H, generator=g),
            boost_alpha=0.5 * torch.rand(B, H, generator=g),
            key_class=self.key_class,
            sink_p=torch.tensor([0.4, 0.8, 0.0, 0.6]).repeat(B, (H + 3) // 4)[:, :H],
            sink_rho=torch.tensor([0.5, 0.8, 0.9])[:B],
            sink_min_visual=torch.tensor([0.2, 0.2, 0.5])[:B],
            sink_query_start=self.image_end.clone(),
            key_drop=True,
            readout=True,
        )
        base.update(fields)
        return AttentionEdits(**base)


def build_case(B=3, H=4, Hkv=2, Tq=40, Tk=40, D=16, dtype=torch.float32, seed=0) -> Case:
    """Row b starts at kv_start[b] with a BOS sink, then 16 image keys (3 of them visual sinks,
    given large keys so that some heads attend to them heavily), then text; one text key is
    marked KEY_DROP."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    kv_start = torch.tensor([0, 3, 7, 1, 5, 2][:B], dtype=torch.int32)
    key_class = torch.zeros(B, Tk, dtype=torch.uint8)
    image_end = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        s = int(kv_start[b])
        key_class[b, s] = KEY_SINK  # BOS: text sink
        key_class[b, s + 2 : s + 18] = KEY_VISUAL
        for j in (s + 4, s + 9, s + 13):  # visual sinks
            key_class[b, j] |= KEY_SINK
        key_class[b, min(s + 20, Tk - 2)] |= KEY_DROP
        image_end[b] = s + 18
        sinks = (key_class[b] & KEY_SINK) != 0
        k[b, :, sinks] *= 2.5
    return Case(q.to(dtype), k.to(dtype), v.to(dtype), kv_start, key_class, image_end, D**-0.5)


@pytest.fixture
def case() -> Case:
    return build_case()


@pytest.fixture
def make_case():
    """The case builder itself, for tests that need other shapes or dtypes."""
    return build_case
