import json

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
