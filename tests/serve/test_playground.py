"""The playground's endpoints (serve/playground.py) in process: the page and its files, the held-out
samples, CHAIR marks against eval/chair.py's own scoring, the robust colour scale, the inspection
view against the figures `lvlm inspect` draws, and the comparison of finished CHAIR and POPE jobs
against what `lvlm eval compare` computes for the same answers. The page itself in a browser:
test_playground_browser.py."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lvlm_hallu.serve.app import Service, build_app
from lvlm_hallu.serve.config import ServeConfig
from lvlm_hallu.serve.playground import chair_marks, compare_jobs, inspection_view, robust_vmax, samples
from tests.serve.conftest import FakePipeline, data_url, png

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHARED_NLTK = Path(__file__).resolve().parents[3] / "shared" / "nltk_data"


@pytest.fixture(autouse=True)
def nltk_data(monkeypatch):
    if SHARED_NLTK.is_dir():
        monkeypatch.setenv("NLTK_DATA", str(SHARED_NLTK))


@pytest.fixture(scope="module")
def client():
    service = Service(FakePipeline(), ServeConfig(model="fake-lvlm", api_key=KEY))
    with TestClient(build_app(service)) as c:
        yield c


def test_page_and_its_files_need_no_key(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("app.js", "style.css"):
        assert f"/playground/{name}" in page.text
        assert client.get(f"/playground/{name}").status_code == 200
    assert client.get("/playground/config.json").json() == {"api_key": True}
    missing = client.get("/playground/secret.py")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    # nothing the page loads comes from another host (works offline)
    for name in ("index.html", "app.js", "style.css"):
        text = client.get("/" if name == "index.html" else f"/playground/{name}").text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_page_carries_every_automation_hook(client):
    page = client.get("/").text + client.get("/playground/app.js").text
    for hook in ("image-file", "sample-select", "prompt", "add-config", "run", "heatmap", "eval-start", "eval-status",
                 "api-key", "config-${n}", "answer-${i}", "report-${i}", "inspect-${i}"):
        assert f'"{hook}"' in page or f"`{hook}`" in page, hook


def test_endpoints_need_the_key(client):
    assert client.get("/v1/playground/samples").status_code == 401
    assert client.post("/v1/playground/chair", json={"text": "a ball", "objects": []}).status_code == 401


def test_samples_are_held_out_scenes_with_their_objects(client):
    from lvlm_hallu.lvlm.shapes import make_scene

    data = client.get("/v1/playground/samples", headers=AUTH).json()["data"]
    assert len(data) == len(samples()) >= 3
    for s in data:
        scene, _image = make_scene("test", s["index"])
        assert s["id"] == scene.image_id and s["objects"] == sorted({i.kind for i in scene.instances})
        assert s["image"].startswith("data:image/png;base64,")


CAPTIONS = [
    "A red ball and a yellow sun next to two trees.",
    "There is a house, a car and some flowers under the clouds.",
    "Two balls. A ball!",
    "An empty scene.",
]


@pytest.mark.parametrize("text", CAPTIONS)
def test_chair_marks_agree_with_chair_scoring(text):
    from lvlm_hallu.eval.chair import CaptionParser, GroundTruth, load_synonyms, score_captions
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

    gt = {1: frozenset({"ball", "tree", "house"})}
    marks = chair_marks(text, sorted(gt[1]))
    parser = CaptionParser(load_synonyms(SYNONYMS_PATH))
    (caption,) = score_captions([(1, text)], GroundTruth(gt, "test"), parser).to_dict(details=True)["captions"]
    assert marks["absent"] == list(dict.fromkeys(category for _word, category in caption["hallucinated"]))
    assert "".join(s["text"] for s in marks["segments"]) == text
    marked = [s["text"].lower() for s in marks["segments"] if s["absent"]]
    assert len(marked) == len(caption["hallucinated"])  # every absent mention, repeats included


def test_chair_endpoint_uses_a_samples_ground_truth(client):
    first = client.get("/v1/playground/samples", headers=AUTH).json()["data"][0]
    absent = next(k for k in ("fish", "boat", "car", "sun") if k not in first["objects"])
    text = f"A {first['objects'][0]} and a {absent}."
    got = client.post("/v1/playground/chair", headers=AUTH, json={"text": text, "sample": first["id"]}).json()
    assert got["absent"] == [absent] and [s["text"] for s in got["segments"] if s["absent"]] == [absent]
    bad = client.post("/v1/playground/chair", headers=AUTH, json={"text": text, "sample": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sample"
    long = client.post("/v1/playground/chair", headers=AUTH, json={"text": "a" * 20_001, "objects": []})
    assert long.status_code == 400 and long.json()["error"]["param"] == "text"


def test_robust_vmax_ignores_one_outlier():
    values = np.full(200, 0.01)
    values[:10] = np.linspace(0.02, 0.03, 10)
    top = robust_vmax(values)
    assert top == np.sort(values)[197]  # the 99th percentile: an actual value near the top
    values[50] = 0.9  # one sink patch with most of the mass
    assert robust_vmax(values) == pytest.approx(top, rel=0.05)  # the scale hardly moves
    assert np.max(values) / robust_vmax(values) > 25
    assert robust_vmax(np.array([0.2, 0.4])) == 0.2  # an actual value of the map, never above its max
    assert robust_vmax(np.zeros(0)) == 0.0 and robust_vmax(np.zeros(5)) == 0.0


def test_inspect_refuses_what_it_cannot_do(client):
    body = {"image": data_url(png()), "prompt": "Describe this image."}
    fake = client.post("/v1/playground/inspect", headers=AUTH, json=body)
    assert fake.status_code == 400 and fake.json()["error"]["code"] == "inspection_unavailable"
    big = client.post("/v1/playground/inspect", headers=AUTH, json={**body, "max_tokens": 500})
    assert big.status_code == 400 and big.json()["error"]["param"] == "max_tokens"
    broken = client.post("/v1/playground/inspect", headers=AUTH, json={**body, "image": "data:image/png;base64,AAAA"})
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "image"


@pytest.fixture(scope="module")
def shapes():
    from lvlm_hallu import lvlm

    return lvlm.load("shapes", device="cpu")


def test_inspection_view_draws_what_lvlm_inspect_draws(shapes):
    from lvlm_hallu.lvlm.inspection import inspect
    from lvlm_hallu.lvlm.inspection.figures import heatmaps, mass
    from lvlm_hallu.lvlm.shapes import make_scene

    insp = inspect(shapes, make_scene("test", 44)[1], "Describe this image.", "vhr", max_new_tokens=6)
    view = inspection_view(insp)
    json.dumps(view, allow_nan=False)  # strict JSON, as the service answers
    drawn = heatmaps(insp).data
    assert [l["layer"] for l in view["layers"]] == drawn["layers"]
    for layer in view["layers"]:
        n = layer["layer"]
        for label in ("before", "after"):
            assert layer["maps"][label] == drawn[label][n]
            assert layer["mass"][label] == pytest.approx(drawn[f"{label}_mass"][n])
        values = np.concatenate([np.ravel(m) for label in ("before", "after") for m in layer["maps"][label]])
        assert layer["max"] == pytest.approx(values.max()) and 0 < layer["vmax"] <= layer["max"]
        assert layer["clipped"] == int((values > layer["vmax"]).sum()) <= len(values) // 50 + 1
    lines = mass(insp).data
    assert view["mass"]["before"] == pytest.approx(lines["baseline"]) and view["mass"]["after"] == pytest.approx(lines["intervened"])
    assert view["answers"] == {"before": insp.baseline.text.strip(), "after": insp.intervened.text.strip()}
    assert len(view["panels"]) == 1 and view["panels"][0]["image"].startswith("data:image/png")


def stamp(items):
    """The results file's fingerprint as a job writes it (serve/jobs.py), with the items digest
    the comparison checks (the job's other fields do not matter here)."""
    from lvlm_hallu.eval.fingerprint import Fingerprint, items_digest

    return Fingerprint.of(items=items_digest(items))


def _chair_job(root: Path, job_id: str, answers: dict[int, str], n: int) -> dict:
    from lvlm_hallu.eval.runner import ResultsFile, make_record
    from lvlm_hallu.lvlm.shapes import build_split
    from lvlm_hallu.serve.playground import chair_task_of

    build_split(root / job_id / "data", "test", n)
    task = chair_task_of(root / job_id)
    records = [make_record(item, answers.get(int(item.key), "A ball.")) for item in task.items()]
    ResultsFile(root / job_id / "chair.jsonl", stamp(task.items())).append(records)
    metrics, _ = task.score({r["key"]: r for r in records})
    return {"id": job_id, "kind": "chair", "request": {"interventions": None}, "metrics": metrics}


def test_compare_gives_paired_intervals_of_finished_chair_jobs(tmp_path):
    from lvlm_hallu.lvlm.shapes import make_scene

    ids = [make_scene("test", i)[0].image_id for i in range(6)]
    plain = _chair_job(tmp_path, "plain", {i: "A ball and a sun and a fish." for i in ids[:4]}, 6)
    treated = _chair_job(tmp_path, "treated", {i: "A ball and a fish." for i in ids[:2]}, 6)
    out = compare_jobs([plain, treated], tmp_path)
    assert out["data"][0]["intervals"] is None
    chair_s = out["data"][1]["intervals"]["CHAIR_s"]
    assert chair_s["diff"] == pytest.approx(treated["metrics"]["CHAIR_s"] - plain["metrics"]["CHAIR_s"])
    assert chair_s["low"] <= chair_s["diff"] <= chair_s["high"]
    other = _chair_job(tmp_path, "fewer", {}, 4)  # other images: not a paired comparison
    with pytest.raises(Exception, match="different units|unpaired"):
        compare_jobs([plain, other], tmp_path)


# -- the comparison against `lvlm eval compare` -----------------------------------------------------
def _answer(kind: str, config: str, item) -> str:
    """A deterministic answer that differs between images: the plain model names a fish in most
    captions and says yes to most questions; "treated" less often."""
    k = zlib.crc32(item.key.encode())
    if kind == "chair":
        return "A ball and a fish." if k % (2 if config == "plain" else 5) else "A ball."
    if config == "plain":
        return "Yes." if k % 4 else "No."
    return item.meta["label"].capitalize() + "." if k % 3 else "Yes."


def _finished_job(monkeypatch, root: Path, kind: str, job_id: str, config: str, request: dict) -> tuple[dict, object]:
    """Run the service's own job function (serve/jobs.py run_chair / run_pope: its folder, items
    and task) with the answering replaced by `_answer`; the job record and the task it built."""
    from lvlm_hallu.eval.runner import ResultsFile, make_record
    from lvlm_hallu.serve import jobs

    built = {}

    def answer_without_replicas(ctx, task, items, _partial):
        built["task"] = task
        records = [make_record(item, _answer(kind, config, item)) for item in items]
        ResultsFile(ctx.workdir / f"{task.name}.jsonl", stamp(items)).append(records[::-1])  # any file order
        metrics, _ = task.score({r["key"]: r for r in records})
        return {k: round(float(v), 4) for k, v in metrics.items()}

    monkeypatch.setattr(jobs, "_answer_with_progress", answer_without_replicas)
    ctx = jobs.JobContext(job_id, dict(request), "shapes", {}, root / job_id, lambda *a, **k: None)
    metrics = jobs.JOB_KINDS[kind].run(ctx)
    return {"id": job_id, "kind": kind, "request": request, "metrics": metrics}, built["task"]


@pytest.mark.parametrize("kind, request_", [
    ("pope", {"limit": 24, "seed": 0, "options": {"splits": ["adversarial", "random"], "parser": "pope"}}),
    ("pope", {"limit": 7, "seed": 3, "options": {"parser": "pope"}}),
    ("chair", {"limit": 8, "seed": 0, "options": {}}),
])
def test_compare_intervals_equal_lvlm_eval_compare(monkeypatch, tmp_path, kind, request_):
    from lvlm_hallu.eval.compare import compare
    from lvlm_hallu.eval.report import Provenance

    plain, task = _finished_job(monkeypatch, tmp_path / "jobs", kind, "plain", "plain", request_)
    treated, _ = _finished_job(monkeypatch, tmp_path / "jobs", kind, "treated", "treated",
                               {**request_, "interventions": "vhr"})
    out = compare_jobs([plain, treated], tmp_path / "jobs")

    # `lvlm eval compare` on the same answers, with the task the job itself built
    def execute(items, path, spec, description=None):
        return {it.key: {"key": it.key, **it.meta, "answer": _answer(kind, spec, it)} for it in items}

    report, _ = compare(task, ["plain", "treated"], execute, tmp_path / "eval", Provenance(), charts=False)
    assert out["resamples"] == report.significance["resamples"] and out["seed"] == report.significance["seed"]
    assert out["level"] == report.significance["level"] and report.significance["unit"] in out["method"]
    assert out["data"][0]["intervals"] is None
    got, expected = out["data"][1]["intervals"], report.results[1].intervals
    assert got == expected  # every metric, bound and Monte-Carlo error, exactly
    headline = "CHAIR_s" if kind == "chair" else next(m for m in got if m.endswith(" F1"))
    assert got[headline]["diff"] == pytest.approx(treated["metrics"][headline] - plain["metrics"][headline], abs=1e-3)
    assert got[headline]["low"] < got[headline]["high"]  # the answers differ between images: a real interval
    if kind == "pope":
        assert "POPE (mean F1)" in got and len(task.splits) == len(request_["options"].get("splits") or "xxx")


def test_compare_refuses_answers_that_are_not_the_rebuilt_items(monkeypatch, tmp_path):
    request_ = {"limit": 8, "seed": 0, "options": {"splits": ["popular"]}}
    plain, _ = _finished_job(monkeypatch, tmp_path, "pope", "plain", "plain", request_)
    treated, _ = _finished_job(monkeypatch, tmp_path, "pope", "treated", "treated", request_)
    drawn_otherwise = {**treated, "request": {**request_, "seed": 1}}  # its record says another seed
    out = compare_jobs([plain, drawn_otherwise], tmp_path)
    assert [row["intervals"] for row in out["data"]] == [None, None] and "rebuilt" in out["note"]
    assert compare_jobs([plain, {**treated, "id": "elsewhere"}], tmp_path)["note"].startswith("the jobs' folders")
