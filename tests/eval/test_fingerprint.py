"""Run fingerprints: results files are never resumed by another run (issue 11, item 1)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from lvlm_hallu.eval.errors import EvalError
from lvlm_hallu.eval.fingerprint import (
    Fingerprint,
    FingerprintMismatch,
    ImageHashes,
    checkpoint_digests,
    items_digest,
    model_identity,
)
from lvlm_hallu.eval.runner import Item, ResultsFile, run
from lvlm_hallu.lvlm.types import Result

# ---------------------------------------------------------------------------------------------
# The fingerprint object and the results-file header


def test_digest_is_canonical_and_differences_name_the_fields():
    a = Fingerprint.of(model={"id": "m", "weights_sha256": "aa"}, decoding={"max_new_tokens": 64}, prompt="p")
    same = Fingerprint.of(prompt="p", decoding={"max_new_tokens": 64}, model={"weights_sha256": "aa", "id": "m"})
    assert a.digest == same.digest and len(a.digest) == 64 and a.short == a.digest[:12]
    b = a.extend(decoding={"max_new_tokens": 512}, prompt="q")
    assert a.differences(b) == ["decoding.max_new_tokens: 64 != 512", 'prompt: "p" != "q"']
    assert a.differences(a.extend(seed=3)) == ["seed: <absent> != 3"]
    assert a.without("prompt").fields.keys() == {"model", "decoding"}


def test_items_digest_covers_keys_prompts_image_names_and_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "x.png").write_bytes(b"x-pixels")
        (folder / "y.png").write_bytes(b"y-pixels")
    (a / "z.png").write_bytes(b"x-pixels")
    items = [Item("1", "describe", str(a / "x.png")), Item("2", "describe", str(a / "y.png"))]
    d = items_digest(items)
    assert d["count"] == 2
    assert d == items_digest([Item("1", "describe", str(b / "x.png")), Item("2", "describe", str(b / "y.png"))])
    assert d != items_digest([Item("1", "describe!", str(a / "x.png")), Item("2", "describe", str(a / "y.png"))])
    assert d != items_digest([Item("1", "describe", str(a / "z.png")), Item("2", "describe", str(a / "y.png"))])
    assert d != items_digest(items[:1])
    (b / "y.png").write_bytes(b"y-re-rendered")  # same name, same folder layout, other pixels
    assert d != items_digest([Item("1", "describe", str(b / "x.png")), Item("2", "describe", str(b / "y.png"))])
    remote = items_digest([Item("1", "describe", "s3://bucket/x.png")])  # a URI stands for itself
    assert remote != items_digest([Item("1", "describe", "s3://other/x.png")])
    with pytest.raises(EvalError, match=r"image not found: .*missing\.png"):
        items_digest([Item("1", "describe", str(a / "missing.png"))])


def test_image_hashes_are_cached_by_path_size_and_mtime(tmp_path):
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(bytes([i]) * 100)
    hashes = ImageHashes(tmp_path / "cache.sqlite3")
    first = hashes.digests(files)
    assert hashes.hashed == 5 and first == [hashlib.sha256(bytes([i]) * 100).hexdigest() for i in range(5)]
    again = ImageHashes(tmp_path / "cache.sqlite3")  # another process: the cache is on disk
    assert again.digests(files) == first and again.hashed == 0
    files[2].write_bytes(b"\x07" * 100)  # same size, rewritten: a new mtime
    os.utime(files[2], ns=(1, 1))
    third = again.digests(files)
    assert again.hashed == 1 and third[2] == hashlib.sha256(b"\x07" * 100).hexdigest() and third[:2] == first[:2]
    # a cache that cannot be opened only costs speed
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    fallback = ImageHashes(blocked / "cache.sqlite3")
    assert fallback.digests(files) == third and fallback.hashed == 5


def test_model_identity_digests_config_and_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llava"}')
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    first = model_identity(str(ckpt))
    assert first["id"] == str(ckpt) and first["config_sha256"] and first["weights_sha256"]
    (ckpt / "model.safetensors").write_bytes(b"\x01" * 100)  # retrained: same config, new weights
    second = model_identity(str(ckpt))
    assert second["config_sha256"] == first["config_sha256"] and second["weights_sha256"] != first["weights_sha256"]
    shapes = model_identity("shapes")
    from lvlm_hallu.lvlm.shapes import MODEL_DIR

    assert shapes == {"id": "shapes", "revision": None, **checkpoint_digests(MODEL_DIR)}
    assert model_identity("m", server="http://h:8000") == {"id": "m", "server": "http://h:8000"}


def test_results_file_carries_the_fingerprint_and_refuses_another(tmp_path):
    path = tmp_path / "r.jsonl"
    fp = Fingerprint.of(model={"id": "a"}, prompt="p")
    items = [Item(str(i), "p") for i in range(3)]
    run(items, lambda batch: ["x"] * len(batch), path, progress=False, fingerprint=fp)
    header = json.loads(path.read_text().splitlines()[0])
    assert header == {"fingerprint": dict(fp.fields), "digest": fp.digest}
    assert len(ResultsFile(path, fp).records) == 3  # same run: resumes
    assert len(ResultsFile(path).records) == 3  # readers without a fingerprint skip the header
    with pytest.raises(FingerprintMismatch, match=r'model\.id: "a" != "b"'):
        ResultsFile(path, fp.extend(model={"id": "b"}))
    legacy = tmp_path / "old.jsonl"
    legacy.write_text('{"key": "1", "answer": "x"}\n')
    with pytest.raises(FingerprintMismatch, match="no run fingerprint"):
        ResultsFile(legacy, fp)


# ---------------------------------------------------------------------------------------------
# The confirmed cases, through the CLI: another model, prompt + max-new-tokens, POPE seed


class EchoModel:
    """Answers with its own name and the request's settings, so reused answers are visible."""

    def __init__(self, name: str):
        self.name, self.calls = name, 0

    def info(self):
        return {"model_id": self.name}

    def generate(self, requests):
        self.calls += len(requests)
        return [Result(text=f"Yes, a dog by {self.name}.", token_ids=[], finish_reason="stop", prompt_tokens=0)
                for _ in requests]


@pytest.fixture
def cli(monkeypatch, tmp_path):
    from lvlm_hallu.eval import cli

    models: dict[str, EchoModel] = {}
    monkeypatch.setattr(cli, "_load_model", lambda name: models.setdefault(name, EchoModel(name)))
    monkeypatch.setattr(cli, "_resolver", lambda: lambda spec: ())
    monkeypatch.setattr(cli, "RUNS", tmp_path / "runs")
    cli.models = models
    return cli


def _chair(cli, tiny_coco, *extra):
    args = ["chair", "--images", str(tiny_coco.images), "--annotations", str(tiny_coco.root), "-n", "3",
            "--no-progress", *extra]
    return CliRunner().invoke(cli.app, args)


def test_another_model_refuses_to_resume_and_gets_its_own_default_folder(cli, tiny_coco, tmp_path):
    out = tmp_path / "shared"
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", str(out)).exit_code == 0
    res = _chair(cli, tiny_coco, "--model", "fake/b", "--out", str(out))
    assert res.exit_code == 2
    text = res.output
    assert "refusing to resume" in text and 'model.id: "fake/a" != "fake/b"' in text
    assert "fake/b" not in cli.models  # refused before the model loaded
    for name in ("fake/a", "fake/b"):
        assert _chair(cli, tiny_coco, "--model", name).exit_code == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(re.fullmatch(r"chair-(a|b)-[0-9a-f]{12}", f) for f in folders)
    for folder in folders:
        report = json.loads((tmp_path / "runs" / folder / "chair_report.json").read_text())
        assert folder.endswith(report["provenance"]["fingerprint"]["digest"][:12])
        caption = json.loads((tmp_path / "runs" / folder / "chair_none.jsonl").read_text().splitlines()[1])
        assert caption["answer"].endswith(f"by fake/{folder[6]}.")  # each folder holds its own model's answers


def test_another_prompt_and_max_new_tokens_refuse_with_both_differences(cli, tiny_coco, tmp_path):
    out = str(tmp_path / "shared")
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", out).exit_code == 0
    res = _chair(cli, tiny_coco, "--model", "fake/a", "--out", out, "--prompt", "Describe it.",
                 "--max-new-tokens", "64")
    assert res.exit_code == 2
    text = res.output
    assert "decoding.max_new_tokens: 512 != 64" in text
    assert 'prompt: "Please describe this image in detail." != "Describe it."' in text
    assert "items.sha256" in text  # the prompt is part of every item
    # the same run resumes without generating anything
    calls = cli.models["fake/a"].calls
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", out).exit_code == 0
    assert cli.models["fake/a"].calls == calls


def test_another_intervention_parameter_refuses(cli, tiny_coco, tmp_path, monkeypatch):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Cfg:
        alpha: float
        name: str = "vhr"

    out = str(tmp_path / "shared")
    monkeypatch.setattr(cli, "_resolver", lambda: lambda spec: (Cfg(1.0),))
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", out, "--interventions", "vhr").exit_code == 0
    monkeypatch.setattr(cli, "_resolver", lambda: lambda spec: (Cfg(2.0),))
    res = _chair(cli, tiny_coco, "--model", "fake/a", "--out", out, "--interventions", "vhr")
    assert res.exit_code == 2 and "interventions[0].alpha: 1.0 != 2.0" in res.output


def _pope(cli, world: Path, *extra):
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

    args = ["pope", "--model", "fake/a", "--images", str(world / "images"), "--annotations", str(world),
            "--synonyms", str(SYNONYMS_PATH), "-n", "6", "--no-progress", *extra]
    return CliRunner().invoke(cli.app, args)


def test_pope_with_another_seed_never_reuses_answers(cli, shapes_coco, tmp_path):
    """The confirmed bug: a new seed's questions were answered with the old answers."""
    out = str(tmp_path / "shared")
    assert _pope(cli, shapes_coco, "--out", out, "--seed", "0").exit_code == 0
    calls = cli.models["fake/a"].calls
    res = _pope(cli, shapes_coco, "--out", out, "--seed", "1")
    assert res.exit_code == 2
    text = res.output
    assert "items.sha256" in text and "scorer.questions_sha256.random" in text
    assert cli.models["fake/a"].calls == calls
    # the seed-0 question files in the shared folder were not overwritten by the refused run
    questions = [json.loads(x) for x in (tmp_path / "shared" / "pope_random_questions.jsonl").read_text().splitlines()]
    report = json.loads((tmp_path / "shared" / "pope_report.json").read_text())
    assert report["provenance"]["seed"] == 0 and len(questions) == 36
    # without --out, each seed gets its own folder and its own answers
    for seed in ("0", "1"):
        assert _pope(cli, shapes_coco, "--seed", seed).exit_code == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    assert cli.models["fake/a"].calls == calls + 2 * 3 * 36
    hashes = [json.loads((f / "pope_report.json").read_text())["provenance"]["question_file_hash"] for f in folders]
    assert hashes[0] != hashes[1]


class TunedEchoModel(EchoModel):
    """An EchoModel with what model-aware intervention values come from: facts and a profile."""

    facts = SimpleNamespace(hidden_size=192, num_layers=6)
    tuned_alpha = 2.0

    def profile(self):
        return {"model_id": self.name, "tuned": {"vhr": {"params": {"alpha": self.tuned_alpha, "layers": [2, 3]}}}}


def test_tuned_values_are_fingerprinted_and_a_retuned_model_refuses_to_resume(cli, tiny_coco, tmp_path, monkeypatch):
    """The confirmed bug: `vhr:tuned` was fingerprinted as {"preset": "tuned"} with null values, so
    answers made with the old tuned values were resumed after a new `lvlm tune`."""
    from lvlm_hallu.interventions import resolve

    monkeypatch.setattr(cli, "_resolver", lambda: lambda spec: tuple(resolve(spec)))
    monkeypatch.setattr(cli, "_load_model", lambda name: cli.models.setdefault(name, TunedEchoModel(name)))
    out = tmp_path / "shared"
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", str(out), "--interventions", "vhr:tuned").exit_code == 0
    header = json.loads((out / "chair_vhr_tuned.jsonl").read_text().splitlines()[0])["fingerprint"]
    assert header["interventions"][0]["alpha"] is None and header["interventions"][0]["preset"] == "tuned"
    (pinned,) = header["interventions_resolved"]
    assert pinned["alpha"] == 2.0 and pinned["layers"] == [2, 3]
    assert pinned["sources"] == {"alpha": "tuned", "layers": "tuned", "positions": "published"}
    report = json.loads((out / "chair_report.json").read_text())
    assert report["results"][0]["details"]["interventions_resolved"][0]["alpha"] == 2.0
    # The same values resume without generating; new tuned values are another run.
    model = cli.models["fake/a"]
    calls = model.calls
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", str(out), "--interventions", "vhr:tuned").exit_code == 0
    assert model.calls == calls
    model.tuned_alpha = 3.0
    res = _chair(cli, tiny_coco, "--model", "fake/a", "--out", str(out), "--interventions", "vhr:tuned")
    assert res.exit_code == 2 and "interventions_resolved[0].alpha: 2.0 != 3.0" in res.output
    assert model.calls == calls  # refused before anything was generated
    # Without --out each set of tuned values gets its own folder, named after the model loaded.
    for alpha in (2.0, 3.0):
        model.tuned_alpha = alpha
        assert _chair(cli, tiny_coco, "--model", "fake/a", "--interventions", "vhr:tuned").exit_code == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    alphas = set()
    for folder in folders:
        report = json.loads((folder / "chair_report.json").read_text())
        fp = report["provenance"]["fingerprint"]
        assert folder.name.endswith(fp["digest"][:12])
        alphas.add(fp["fields"]["interventions_resolved"][0][0]["alpha"])
    assert alphas == {2.0, 3.0}


# ---------------------------------------------------------------------------------------------
# Content, not names: re-rendered images and edited annotations under the old file names


def test_re_rendered_images_under_old_names_start_a_new_run(cli, tiny_coco, tmp_path):
    """The confirmed bug: new pixels under the same names kept the fingerprint, so the old answers
    were scored again."""
    from PIL import Image

    out = str(tmp_path / "shared")
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", out).exit_code == 0
    calls = cli.models["fake/a"].calls
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", out).exit_code == 0  # unchanged: resumes
    assert cli.models["fake/a"].calls == calls
    for imid in (1, 2):
        Image.new("RGB", (8, 8), "white").save(tiny_coco.images / f"COCO_val2014_{imid:012d}.jpg")
    res = _chair(cli, tiny_coco, "--model", "fake/a", "--out", out)
    assert res.exit_code == 2 and "items.sha256" in res.output and cli.models["fake/a"].calls == calls
    assert _chair(cli, tiny_coco, "--model", "fake/a").exit_code == 0  # its own folder, answered again
    assert cli.models["fake/a"].calls == calls + 3


def test_edited_annotations_under_the_old_name_are_another_run(cli, tiny_coco, tmp_path):
    out = str(tmp_path / "shared")
    assert _chair(cli, tiny_coco, "--model", "fake/a", "--out", out).exit_code == 0
    coco = json.loads(tiny_coco.instances.read_text())
    coco["annotations"][3]["category_id"] = 18  # image 2 now holds a dog, not a cat
    tiny_coco.instances.write_text(json.dumps(coco))
    res = _chair(cli, tiny_coco, "--model", "fake/a", "--out", out)
    assert res.exit_code == 2 and "scorer.ground_truth_sha256" in res.output
    assert "items.sha256" not in res.output  # the images and prompts are the same
