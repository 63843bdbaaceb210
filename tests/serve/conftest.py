"""Shared fixtures of the service tests.

- `tiny` (the real tiny LLaVA, loaded once per session) and `serving`, a `Service` over it built as
  a replica builds it: the continuous scheduler by default, the static runner when asked. The
  HTTP tests (test_app.py, test_bad_input.py) run on these.
- `solo`: what the tiny model answers a request alone (`Pipeline.generate`, no server, no batch), the
  oracle an HTTP answer is compared with; `content` is that answer as the API shows it.
- `FakePipeline`: a deterministic pipeline with the `lvlm` Pipeline interface and no engine (so a
  Service over it always gets the static runner). Its output is a pure function of one request
  (prompt, interventions, image size, max_new_tokens), so "a row batched with others gets what it
  gets alone" is a plain equality. Kept where a test needs what the real engine cannot do.
- `FakeJobs`: the evaluation job registry in process (the Ray one: test_jobs_ray.py).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
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

SCHEDULERS = ("continuous", "static")  # serve/app.py make_runner; the first is the default


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


@pytest.fixture(scope="session")
def tiny():
    """The real tiny LLaVA (lvlm/tiny.py: random weights, 4 layers, width 64, a character-level
    tokenizer, a context of 512 tokens), loaded once for every module that does not load its own."""
    from lvlm_hallu import lvlm

    return lvlm.load("tiny-llava")


@contextlib.contextmanager
def serving(pipeline, scheduler: str = "continuous", *, jobs=None, **config):
    """A `Service` over `pipeline` with the runner a replica gets (serve/app.py `make_runner`): the
    continuous scheduler, or static batches when `scheduler="static"`; a pipeline without an engine
    (the fakes) always gets the static runner. The scheduler's engine loop is closed on the way out."""
    from lvlm_hallu.serve.app import Service
    from lvlm_hallu.serve.config import ServeConfig

    config.setdefault("model", pipeline.model_id)
    service = Service(pipeline, ServeConfig(scheduler=scheduler, warmup=False, **config), jobs=jobs)
    try:
        yield service
    finally:
        close = getattr(service.runner, "close", None)
        if close is not None:
            close()


@pytest.fixture(scope="session")
def solo(tiny):
    """`solo(prompt, image=None, max_new_tokens=8, interventions=None, **fields)`: the `Result` of
    one request run alone on the tiny model (`Pipeline.generate`: no server, no batch). `image` is
    the encoded file the client sent (PNG bytes, decoded as the server decodes them),
    `interventions` what the request's `interventions` field held. Memoised: many tests ask the
    same question."""
    from PIL import Image

    from lvlm_hallu.interventions import resolve
    from lvlm_hallu.lvlm.types import Request

    answers: dict[tuple, Result] = {}

    def run(prompt: str, image: bytes | None = None, *, max_new_tokens: int = 8, interventions=None,
            **fields) -> Result:
        key = (prompt, image, max_new_tokens, json.dumps(interventions, sort_keys=True), tuple(sorted(fields.items())))
        if key not in answers:
            decoded = None if image is None else Image.open(io.BytesIO(image)).convert("RGB")
            request = Request(prompt, decoded, max_new_tokens=max_new_tokens, interventions=resolve(interventions),
                              **fields)
            answers[key] = tiny.generate([request])[0]
        return answers[key]

    return run


def content(result: Result) -> str:
    """The answer's text as the API shows it: without the one leading space a SentencePiece
    tokenizer decodes before the first word (serve/chat.py answer_text)."""
    return result.text[1:] if result.text.startswith(" ") else result.text


class FakeJobs:
    """In-process stand-in for serve.jobs.RayJobs (the Ray one is covered by test_jobs_ray.py and
    the integration test)."""

    def __init__(self):
        from lvlm_hallu.serve.jobs import JobBoard

        self.board = JobBoard()

    @staticmethod
    def kinds():
        return {"chair": "", "pope": ""}

    async def submit(self, kind, model, request, load_kwargs, owner=None):
        return self.board.create(kind, model, request, owner=owner).to_dict()

    async def get(self, job_id, owner=None):
        job = self.board.get(job_id, owner)
        return job and job.to_dict()

    async def list(self, owner=None):
        return [j.to_dict() for j in self.board.list(owner)]

    async def cancel(self, job_id, owner=None):
        if self.board.get(job_id, owner) is None:
            return None
        self.board.cancel(job_id)
        return await self.get(job_id)

    healthy = True

    async def health(self):
        if not self.healthy:
            raise ConnectionError("job registry unreachable")
        return {"ok": True, "jobs": len(self.board.list())}
