import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from lvlm_hallu.cli import app


def test_generate_prints_answer_and_timings(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), "red").save(img)
    res = CliRunner().invoke(app, ["generate", "--model", "tiny-llava", "--image", str(img), "--prompt", "Describe.",
                                   "-n", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model"] == "tiny-llava" and out["completion_tokens"] <= 5
    assert out["timings"]["prefill_ms"] > 0


def test_generate_bad_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    res = CliRunner().invoke(app, ["generate", "--model", "tiny-llava", "--image", str(bad), "--prompt", "x"])
    assert res.exit_code == 2
    assert "cannot read image" in res.output


def test_generate_without_image_says_text_only_in_one_line():
    res = CliRunner().invoke(app, ["generate", "--model", "tiny-llava", "--prompt", "Hello.", "-n", "3", "--json"])
    assert res.exit_code == 0, res.output
    notices = [line for line in res.stderr.splitlines() if "text-only prompt" in line]
    assert len(notices) == 1 and "no --image given" in notices[0]
    assert json.loads(res.stdout)["completion_tokens"] <= 3  # the notice stays off stdout


def test_generate_with_image_has_no_text_only_notice(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), "red").save(img)
    res = CliRunner().invoke(app, ["generate", "--model", "tiny-llava", "--image", str(img), "--prompt", "x", "-n", "2"])
    assert res.exit_code == 0, res.output
    assert "text-only" not in res.output


@pytest.mark.parametrize("spec, names", [("vhr", "vhr acts"), ("var+pai", "var+pai act"), ("vte", "vte acts"),
                                          ("carve", "carve acts")])
def test_generate_refuses_image_methods_on_text_only_prompt(spec, names):
    res = CliRunner().invoke(app, ["generate", "--model", "no-such-model-is-loaded", "--prompt", "Hello.",
                                   "--interventions", spec])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert f"error: {names} on the image's tokens and this prompt is text-only" in out  # refused before any load


def test_every_registered_method_needs_an_image():
    from lvlm_hallu.interventions import names, resolve
    from lvlm_hallu.interventions.inputs import needs_image

    assert all(needs_image(resolve(name)[0]) for name in names())


def test_generate_help_lists_the_embedded_models_paper_and_tuned_values():
    from lvlm_hallu.lvlm.shapes import ASSETS

    shipped = json.loads((ASSETS / "tuned.json").read_text())["methods"]
    res = CliRunner().invoke(app, ["generate", "--help"], terminal_width=400)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for method, entry in shipped.items():
        tuned = ", ".join(f"{k}={v}" for k, v in entry["params"].items()) if entry["params"] else "none"
        assert f"{method}: paper " in text and f"; tuned {tuned}" in text, method
    assert "pai: paper alpha=0.2, start_layer=2, contrast=False, gamma=1.1;" in text  # the published constants


def test_profile_json_prints_only_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    res = CliRunner().invoke(app, ["profile", "--model", "tiny-llava", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # nothing but the JSON on stdout
    layers = [str(l) for l in range(2, 4)]  # tiny-llava: 4 layers, VAR's layers 2..L-1
    assert isinstance(data["sink_dims"], list) and data["tau"] == 2.5
    assert sorted(data["bos_phi_max"]) == sorted(data["visual_phi_max"]) == layers
    assert "cached at" not in res.stderr
    plain = CliRunner().invoke(app, ["profile", "--model", "tiny-llava"])  # the cached profile, and where it is
    assert plain.exit_code == 0 and "cached at" in plain.stderr and json.loads(plain.stdout) == data
