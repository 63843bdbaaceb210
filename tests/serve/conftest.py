"""Shared fakes for the service tests: a deterministic pipeline with the `lvlm` Pipeline interface.

The fake's output is a pure function of one request (prompt, interventions, image size,
max_new_tokens), so "a row batched with others gets what it gets alone" is a plain equality.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import pytest
from PIL import Image

# The Ray instances these tests start are private, as `lvlm serve` starts them (serve/cli.py
# private_ray_env): every Ray port on loopback. Ray reads this when imported, so here, first.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from lvlm_hallu.lvlm.errors import PromptError  # noqa: E402
from lvlm_hallu.lvlm.types import Result, Timings  # noqa: E402


def png(size=(20, 10), color="red", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims width x height (a decompression bomb's header)."""
    data = bytearray(png((8, 8)))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def describe(config) -> str:
    params = ",".join(f"{k}={v}" for k, v in sorted(dataclasses.asdict(config).items()))
    return f"{getattr(config, 'name', type(config).__name__)}({params})"


class FakeTokenizer:
    """One token per character: enough for the service's prompt-length check."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


class FakePipeline:
    """Records every batch; fails rows whose prompt contains "BOOM" (like an engine PromptError)."""

    model_id = "fake-lvlm"
    max_context = 256
    # what request validation reads of the model (interventions.validate): 6 layers, width 32
    facts = SimpleNamespace(num_layers=6, num_heads=4, hidden_size=32, max_context=256)

    def __init__(self, delay_s: float = 0.0):
        self.tokenizer = FakeTokenizer()
        self.batches: list[list[tuple[str, tuple[str, ...]]]] = []
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def answer(self, request) -> str:
        size = "x".join(map(str, request.image.size)) if request.image is not None else "noimage"
        applied = [describe(c) for c in request.interventions] or ["none"]
        words = [request.prompt.split()[0] if request.prompt.split() else "", size, *applied]
        words += [f"w{i}" for i in range(request.max_new_tokens)]
        return " ".join(words[: request.max_new_tokens])

    def generate(self, requests, on_token=None):
        with self._lock:
            self.batches.append([(r.prompt, tuple(describe(c) for c in r.interventions)) for r in requests])
        for r in requests:
            if "BOOM" in r.prompt:
                raise PromptError("prompt contains BOOM")
        results = []
        for row, r in enumerate(requests):
            text = self.answer(r)
            if on_token is not None:
                for i, word in enumerate(text.split(" ")):
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    on_token(row, word if i == 0 else " " + word)
            elif self.delay_s:
                time.sleep(self.delay_s)
            n = len(text.split(" "))
            results.append(Result(text=text, token_ids=list(range(n)), finish_reason="length",
                                  prompt_tokens=len(r.prompt), timings=Timings(1.0, 2.0, n),
                                  report={"rows": len(requests), "heads": (1, 2)}))
        return results


@pytest.fixture
def fake_pipeline():
    return FakePipeline()
