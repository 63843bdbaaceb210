"""eval/nltk_data.py: CHAIR's NLTK data is found, downloaded from a (stub) source, or refused in
one line that names the command to run."""

import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

import pytest

from lvlm_hallu.eval import nltk_data
from lvlm_hallu.eval.errors import NLTKDataError

SUBDIRS = {"punkt_tab": ("tokenizers", "english/README"), "averaged_perceptron_tagger_eng": ("taggers", "weights.json"),
           "wordnet": ("corpora", "lexnames")}


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """NLTK sees only an empty folder; no shared folder; the project cache is under tmp_path."""
    import nltk

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    monkeypatch.setattr(nltk_data, "shared_dir", lambda: tmp_path / "no-shared")
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LVLM_NLTK_DOWNLOAD", raising=False)
    return tmp_path


def stub_source(folder: Path, packages=tuple(SUBDIRS)) -> str:
    """A file:// NLTK index serving one small zip per package. NLTK opens file:// URLs only under
    its data roots, so the folder joins nltk.data.path; its zips lie outside the subdir layout that
    nltk.data.find searches, so the source itself never counts as installed data."""
    import nltk

    nltk.data.path.append(str(folder))
    rows = []
    for package in packages:
        subdir, member = SUBDIRS[package]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            content = f"stub {package}\n"
            z.writestr(f"{package}/{member}", content)
        path = folder / "packages" / f"{package}.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        data = buf.getvalue()
        rows.append(f'<package id="{package}" name="{package}" subdir="{subdir}" url="{path.as_uri()}" '
                    f'size="{len(data)}" unzipped_size="{len(content)}" unzip="1" '
                    f'checksum="{hashlib.md5(data).hexdigest()}" sha256_checksum="{hashlib.sha256(data).hexdigest()}"/>')
    index = folder / "index.xml"
    index.write_text('<?xml version="1.0"?>\n<nltk_data><packages>\n' + "\n".join(rows)
                     + "\n</packages><collections></collections></nltk_data>\n")
    return index.as_uri()


def test_found_in_nltk_data_needs_no_download(isolated, monkeypatch):
    import nltk

    source = stub_source(isolated / "src")
    have = isolated / "have"
    for package, (subdir, member) in SUBDIRS.items():
        (have / subdir / package / member).parent.mkdir(parents=True, exist_ok=True)
        (have / subdir / package / member).write_text("x")
    nltk.data.path.insert(0, str(have))  # what NLTK_DATA does
    monkeypatch.setenv("NLTK_DOWNLOAD_URL", source)
    monkeypatch.setattr(nltk_data, "download", lambda *a, **k: pytest.fail("downloaded data that was present"))
    nltk_data.ensure()
    assert nltk_data.missing() == []
    assert not (isolated / "cache").exists()


def test_found_in_the_shared_folder(isolated, monkeypatch):
    shared = isolated / "shared-nltk"
    for package, (subdir, member) in SUBDIRS.items():
        (shared / subdir / package / member).parent.mkdir(parents=True, exist_ok=True)
        (shared / subdir / package / member).write_text("x")
    assert nltk_data.missing() == list(SUBDIRS)
    monkeypatch.setattr(nltk_data, "shared_dir", lambda: shared)
    assert nltk_data.missing() == []
    assert nltk_data.search_path().index(str(shared)) < nltk_data.search_path().index(str(nltk_data.cache_dir()))


def test_missing_data_arrives_from_the_download_source_with_progress_lines(isolated, monkeypatch, capsys):
    (isolated / "have" / "taggers" / "averaged_perceptron_tagger_eng").mkdir(parents=True)
    import nltk

    nltk.data.path.append(str(isolated / "have"))
    monkeypatch.setenv("NLTK_DOWNLOAD_URL", stub_source(isolated / "src"))
    nltk_data.ensure()
    err = capsys.readouterr().err.splitlines()
    cache = isolated / "cache" / "nltk_data"
    assert err == [f"NLTK data for CHAIR: downloading punkt_tab (1/2) into {cache}",
                   f"NLTK data for CHAIR: downloading wordnet (2/2) into {cache}"]
    assert (cache / "tokenizers" / "punkt_tab" / "english" / "README").read_text() == "stub punkt_tab\n"
    assert (cache / "corpora" / "wordnet" / "lexnames").is_file()
    assert not (cache / "taggers").exists()  # present elsewhere: not fetched
    assert nltk_data.missing() == []
    nltk_data.ensure()  # second use: nothing to do, nothing printed
    assert capsys.readouterr().err == ""


def test_offline_is_one_line_naming_the_venv_command(isolated, monkeypatch):
    monkeypatch.setenv("NLTK_DOWNLOAD_URL", (isolated / "nowhere" / "index.xml").as_uri())
    with pytest.raises(NLTKDataError) as info:
        nltk_data.ensure()
    message = str(info.value)
    assert "\n" not in message
    cache = isolated / "cache" / "nltk_data"
    assert message.endswith(f"run: {sys.executable} -m nltk.downloader -d {cache} "
                            "punkt_tab averaged_perceptron_tagger_eng wordnet")
    assert "unreachable" in message
    assert not cache.exists()


def test_download_can_be_switched_off(isolated, monkeypatch):
    monkeypatch.setenv("NLTK_DOWNLOAD_URL", stub_source(isolated / "src"))
    monkeypatch.setenv("LVLM_NLTK_DOWNLOAD", "0")
    with pytest.raises(NLTKDataError, match=r"^NLTK data missing for CHAIR \(punkt_tab, averaged_perceptron_tagger_eng, "
                                            r"wordnet\); run: .* -m nltk\.downloader -d "):
        nltk_data.ensure()


def test_a_package_the_source_lacks_names_it(isolated, monkeypatch):
    monkeypatch.setenv("NLTK_DOWNLOAD_URL", stub_source(isolated / "src", packages=("punkt_tab",)))
    with pytest.raises(NLTKDataError, match="downloading averaged_perceptron_tagger_eng failed"):
        nltk_data.ensure(stream=io.StringIO())


def test_the_printed_command_installs_where_ensure_looks(isolated, monkeypatch):
    """The offline line's command, run as printed (NLTK's NLTK_DOWNLOAD_URL naming the stub
    source), installs the data where ensure() then finds it."""
    import shlex
    import subprocess

    monkeypatch.setenv("NLTK_DOWNLOAD_URL", (isolated / "nowhere.xml").as_uri())
    with pytest.raises(NLTKDataError) as info:
        nltk_data.ensure()
    command = str(info.value).split("run: ", 1)[1]
    env = {**os.environ, "NLTK_DOWNLOAD_URL": stub_source(isolated / "src"), "NLTK_DATA": str(isolated / "src")}
    subprocess.run(command, shell=True, check=True, env=env, timeout=120, capture_output=True)
    assert shlex.split(command)[0] == sys.executable
    assert nltk_data.missing() == []
