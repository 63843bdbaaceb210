"""End to end on Ray Serve: `serve.run` of the real app with the tiny random-weight LLaVA model on
loopback; chat with an image and interventions, streaming, the catalog, an eval job polled to
completion, the official openai client unchanged, malformed requests against the running
service, and the metrics those requests leave behind. One Ray startup for the whole module."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from lvlm_hallu.eval.mentions import METRICS as CAPTION_METRICS
from lvlm_hallu.serve.client import BadRequestError, Client

pytestmark = pytest.mark.slow

KEY = "integration-key"
MODEL = "tiny-llava"
SHARED_NLTK = Path(__file__).resolve().parents[3] / "shared" / "nltk_data"


@pytest.fixture(scope="module")
def base_url(ray_service):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if SHARED_NLTK.is_dir():
        os.environ.setdefault("NLTK_DATA", str(SHARED_NLTK))  # CHAIR/POPE ground truth in the eval worker
    from lvlm_hallu.serve.config import ServeConfig
    from lvlm_hallu.serve.limits import Limits

    config = ServeConfig(model=MODEL, max_batch_size=4, batch_wait_timeout_s=0.05, api_key=KEY,
                         limits=Limits(allow_remote_images=True, max_tokens=64, max_body_bytes=2_000_000,
                                       max_image_bytes=1_000_000, max_image_pixels=2048 * 2048))
    with ray_service(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with Client(base_url, api_key=KEY, timeout=120) as c:
        yield c


def scene(color="red") -> Image.Image:
    image = Image.new("RGB", (48, 48), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=color)
    return image


def test_chat_with_image_and_interventions(client):
    reply = client.chat(scene(), "Describe this image.", interventions=[{"name": "vhr", "alpha": 2.0}, "var"],
                        max_tokens=12)
    assert reply.model == MODEL and isinstance(reply.text, str)
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 10
    assert [a["name"] for a in reply.intervention_report.applied] == ["vhr", "var"]
    assert reply.intervention_report.applied[0]["alpha"] == 2.0
    assert reply.intervention_report.details["attention_backend"]


def test_batched_mixed_interventions_match_each_request_alone(client, base_url):
    specs = ["none", "vhr", "var", [{"name": "vhr", "alpha": 3.0}]]
    colours = ["red", "blue", "green", "black"]

    def ask(i):
        return client.chat(scene(colours[i]), f"Describe image {i}.", interventions=specs[i], max_tokens=10).text

    alone = [ask(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    assert together == alone
    metrics = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("lvlm_batch_size_count")))
    ones = float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith('lvlm_batch_size_bucket{le="1.0"}')))
    assert ones < count  # at least one engine batch held more than one request


def test_stream_matches_the_plain_answer(client):
    plain = client.chat(scene("blue"), "What is this?", interventions="vhr", max_tokens=10).text
    chunks = list(client.stream_chunks(scene("blue"), "What is this?", interventions="vhr", max_tokens=10))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(deltas) >= 2 and "".join(deltas) == plain
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(c.intervention_report and c.intervention_report.applied[0]["name"] == "vhr" for c in chunks)


def test_catalog_and_models(client):
    names = {i.name for i in client.list_interventions()}
    assert {"vhr", "var", "pai"} <= names
    assert [m.id for m in client.list_models()] == [MODEL]


def test_eval_job_runs_on_ray_to_completion(client):
    job = client.submit_eval("pope", limit=4, interventions="vhr", max_tokens=4, options={"splits": ["random"]})
    assert job.state in ("queued", "running") and job.kind == "pope"
    done = client.wait(job.id, timeout=240, poll_s=1.0)
    assert done.state == "succeeded", done.error
    assert done.progress.done == done.progress.total == 4
    assert {"random Acc", "random F1", "random Yes", "POPE (mean F1)"} <= set(done.metrics)  # eval may add more
    assert 0.0 <= done.metrics["random Acc"] <= 100.0
    assert any(j.id == job.id for j in client.jobs())


def test_eval_jobs_queue_behind_each_other(client):
    first = client.submit_eval("chair", limit=2, max_tokens=6)
    second = client.submit_eval("chair", limit=2, max_tokens=6, interventions="var")
    assert second.state == "queued"  # one job runs at a time on this 2-CPU cluster
    done = client.wait(second.id, timeout=240, poll_s=1.0)
    assert done.state == "succeeded", done.error
    assert set(done.metrics) == {"CHAIR_s", "CHAIR_i", "Recall", "Len", *CAPTION_METRICS} and done.metrics["Len"] > 0
    assert client.job(first.id).state == "succeeded"
    assert client.job(first.id).finished_at <= done.started_at


def test_eval_job_cancel(client):
    job = client.submit_eval("chair", limit=50, max_tokens=64)
    cancelled = client.cancel(job.id)
    assert cancelled.state == "cancelled" and client.job(job.id).state == "cancelled"


def test_official_openai_client_unchanged(base_url):
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
    buf = io.BytesIO()
    scene("green").save(buf, format="PNG")
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}},
        {"type": "text", "text": "Describe this image."}]}]
    reply = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                        extra_body={"interventions": [{"name": "vhr", "alpha": 1.5}]})
    report = reply.model_extra["intervention_report"]
    assert report["applied"][0] == {**report["applied"][0], "name": "vhr", "alpha": 1.5}
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stream = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                                         extra_body={"interventions": [{"name": "vhr", "alpha": 1.5}]})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=messages, extra_body={"interventions": "telepathy"})
    assert [m.id for m in oai.models.list()] == [MODEL]


def _png_declaring(width, height):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _image_request(url: str, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 4, **extra, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


AUTH = {"Authorization": f"Bearer {KEY}"}
RUNNING_BAD = [
    ("invalid-json", {"content": b"{nope", "headers": {**AUTH, "content-type": "application/json"}}, 400),
    ("bad-base64", {"json": _image_request("data:image/png;base64,!!!!")}, 400),
    ("non-image", {"json": _image_request(_b64(b"plain text, not pixels"))}, 400),
    ("zero-bytes", {"json": _image_request("data:image/png;base64,")}, 400),
    ("bomb", {"json": _image_request(_b64(_png_declaring(100_000, 100_000)))}, 413),
    ("unknown-intervention", {"json": _image_request(_b64(b"x"), interventions="telepathy")}, 400),
    ("out-of-range", {"json": _image_request(_b64(b"x"), interventions=[{"name": "vhr", "alpha": -2}])}, 400),
    ("n-2", {"json": _image_request(_b64(b"x"), n=2)}, 400),
    ("remote-loopback", {"json": _image_request("http://127.0.0.1:8265/")}, 400),
    ("remote-metadata", {"json": _image_request("http://169.254.169.254/latest/meta-data/")}, 400),
    ("over-context", {"json": {"model": MODEL, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "lorem ipsum " * 60}]}}, 400),
    ("missing-auth", {"json": _image_request(_b64(b"x")), "headers": {}}, 401),
    ("oversized-body", {"json": {"messages": [{"role": "user", "content": "z" * 2_100_000}]}}, 413),
]


def test_malformed_requests_against_the_running_service(base_url, client):
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for name, kwargs, status in RUNNING_BAD:
            r = http.post("/v1/chat/completions", **{"headers": AUTH, **kwargs})
            assert r.status_code == status, (name, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, name
        assert http.get("/health").json()["status"] == "ok"
    assert client.chat(scene(), "Still there?", max_tokens=3).usage.completion_tokens >= 1
    with pytest.raises(BadRequestError, match="telepathy"):
        client.chat(scene(), "x", interventions="telepathy")


def test_metrics_after_traffic(base_url):
    text = httpx.get(f"{base_url}/metrics", headers=AUTH).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    assert samples['lvlm_requests_total{route="/v1/chat/completions",status="200"}'] >= 10
    assert samples['lvlm_requests_total{route="/v1/chat/completions",status="400"}'] >= 5
    assert samples['lvlm_intervention_requests_total{interventions="vhr",status="200"}'] >= 2
    assert samples['lvlm_tokens_total{kind="completion"}'] > 0
    assert samples["lvlm_batch_size_count"] >= 10
    assert samples['lvlm_request_latency_seconds_count{route="/v1/chat/completions"}'] >= 10
