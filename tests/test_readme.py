"""The README's first-screen examples run as written: the curl request body and the `openai`
client snippet, against the service app (in process, no Ray) with the embedded model."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the embedded model generates for both examples

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    from fastapi.testclient import TestClient

    from lvlm_hallu import lvlm
    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig

    service = Service(lvlm.load("shapes"), ServeConfig(model="shapes"))
    with TestClient(build_app(service)) as client:
        yield client


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """The image the examples name, made by the command the README gives for it."""
    import shlex
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("readme")
    command = re.search(r"`(python -m lvlm_hallu\.lvlm\.shapes\.world [^`]*)`", README).group(1)
    argv = shlex.split(command)
    subprocess.run([sys.executable, *argv[1:]], cwd=folder, check=True, timeout=120, capture_output=True)
    path = folder / "shapes" / "images" / "test_3000001.png"
    assert path.is_file()
    return path


def test_the_curl_example(http, scene):
    (curl,) = [b for b in blocks("bash") if b.lstrip().startswith("curl")]
    url = re.search(r"(http://127\.0\.0\.1:8000\S*)", curl).group(1)
    body = curl[curl.index("-d '") + 4: curl.rindex("'")]
    encoded = base64.b64encode(scene.read_bytes()).decode()
    body = re.sub(r"'\"\$\(base64 < [^)]*\)\"'", encoded, body)  # what the shell substitutes
    r = http.post(url.replace("http://127.0.0.1:8000", ""), json=json.loads(body))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"].strip()
    assert [a["name"] for a in out["intervention_report"]["applied"]] == ["pai"]


def test_the_openai_example(http, scene, monkeypatch, capsys):
    openai = pytest.importorskip("openai")
    (snippet,) = [b for b in blocks("python") if "from openai import OpenAI" in b]
    real = openai.OpenAI

    def through_the_app(**kwargs):
        assert kwargs["base_url"] == "http://127.0.0.1:8000/v1"
        return real(**{**kwargs, "base_url": "http://testserver/v1"}, http_client=http, max_retries=0)

    monkeypatch.setattr(openai, "OpenAI", through_the_app)
    monkeypatch.chdir(scene.parents[2])
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'applied'" in printed and "pai" in printed
