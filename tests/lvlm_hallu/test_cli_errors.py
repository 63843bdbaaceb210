"""The `lvlm` command's first contact: --version, -h, and every bad input a user can give as one
line on stderr with exit status 2, before any model loads where the input allows it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lvlm_hallu import cli


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code or 0, out, err


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails the test: these inputs must be refused before it."""
    from lvlm_hallu import lvlm

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded for an input that should have been refused first")

    monkeypatch.setattr(lvlm, "load", refuse)


def test_version_and_short_help(capsys):
    from importlib.metadata import version

    code, out, _ = run(capsys, "--version")
    assert (code, out.strip()) == (0, f"lvlm {version('lvlm-hallu')}")
    for args in (["-h"], ["generate", "-h"], ["eval", "chair", "-h"], ["eval", "compare", "-h"]):
        code, out, _ = run(capsys, *args)
        assert code == 0 and out.startswith("Usage: lvlm"), args
    code, out, _ = run(capsys, "eval", "compare", "-h")
    for flag in ("--questions", "--parser", "--image-list", "--gt-json", "--short-caption", "--prompt"):
        block = out[out.index(flag):]
        assert block.split("\n")[0].strip() != flag, f"{flag} has no help text"


@pytest.mark.parametrize("args, needles", [
    (["generate", "-p", "hi", "--max-new-tokens", "0"], ["'--max-new-tokens'", "greater than or equal to 1"]),
    (["generate", "-p", "hi", "--top-p", "0"], ["'--top-p'", "(0, 1]"]),
    (["generate", "-p", "hi", "--temperature", "-1"], ["'--temperature'"]),
    (["generate", "-p", "hi", "--device", "cuda:7"], ["'--device'"]),
    (["generate", "-p", "hi", "--device", "gpu"], ["unknown device 'gpu'"]),
    (["generate", "-p", "hi", "--dtype", "fp8"], ["unknown dtype 'fp8'"]),
    (["generate", "-p", "hi", "--image", "missing.png"], ["missing.png"]),
    (["generate", "-p", "hi", "--interventions", "bogus"], ["bogus"]),
    (["info", "--tokens", "0"], ["'--tokens'"]),
    (["inspect", "-p", "hi", "--layers", "a,b"], ["--layers"]),
    (["inspect", "-p", "hi", "-n", "0"], ["'-n'"]),
    (["demo", "--limit", "0"], ["'--limit'"]),
    (["eval", "chair", "-n", "0"], ["lvlm eval chair", "'-n'"]),
    (["eval", "chair", "--batch-size", "0"], ["--batch-size must be a positive integer"]),
    (["eval", "pope", "--max-new-tokens", "0"], ["'--max-new-tokens'"]),
    (["eval", "chair", "--images", "/nonexistent-folder"], ["CHAIR needs --instances"]),
    (["eval", "compare", "--benchmark", "bogus"], ["unknown benchmark 'bogus'"]),
    (["eval", "score-chair", "missing.jsonl", "--gt-json", "x.json"], ["missing.jsonl"]),
    (["bench", "nosuch"], ["no benchmark 'nosuch'"]),
    (["nosuch"], ["No such command 'nosuch'"]),
])
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(capsys, no_load, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    one_line_error(code, err, *needles)


def test_a_hub_id_that_cannot_be_fetched_says_why_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "generate", "-p", "hi", "--model", "no-such-owner/no-such-model")
    one_line_error(code, err, "cannot load model 'no-such-owner/no-such-model'", "HF_HUB_OFFLINE=1")
    code, _, err = run(capsys, "info", "no-such-owner/no-such-model")
    one_line_error(code, err, "HF_HUB_OFFLINE=1 forbids downloading it")
    code, _, err = run(capsys, "generate", "-p", "hi", "--model", "./no/such/folder")
    one_line_error(code, err, "no such folder")


def test_hub_errors_are_named_by_their_cause(monkeypatch):
    import httpx
    from huggingface_hub import errors as hub

    from lvlm_hallu.lvlm.loader import unavailable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/x"))

    def wrapped(inner):
        try:
            try:
                raise inner
            except Exception as err:
                raise OSError("transformers' many-line message\nwith details") from err
        except OSError as outer:
            return outer

    cases = {
        "gated": hub.GatedRepoError("gated", response=response),
        "has no such repository": hub.RepositoryNotFoundError("nope", response=response),
        "the hub cannot be reached": hub.LocalEntryNotFoundError("no connection"),
        "not a hub id": hub.HFValidationError("bad id"),
    }
    for why, inner in cases.items():
        message = str(unavailable("owner/model", wrapped(inner)))
        assert message.startswith("cannot load model 'owner/model': ") and why in message, message
        assert "\n" not in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE=1 forbids" in str(unavailable("owner/model", wrapped(hub.LocalEntryNotFoundError("x"))))


def test_an_unexpected_exception_is_one_line_exit_1_and_can_show_its_traceback(capsys, monkeypatch):
    from lvlm_hallu.lvlm import cli as model_cli

    def broken(**_kwargs):
        raise RuntimeError("something internal\nbroke")

    monkeypatch.setattr(model_cli, "resolve_device", lambda device: broken())
    code, _, err = run(capsys, "profile")
    assert code == 1 and err.strip() == ("error: unexpected RuntimeError: something internal broke "
                                         "(a bug: LVLM_TRACEBACK=1 shows the traceback)")
    monkeypatch.setenv("LVLM_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        cli.main(["profile"])


def test_score_chair_reads_the_projects_results_files_and_prints_json(capsys, tmp_path):
    results = tmp_path / "chair_none.jsonl"
    rows = [{"fingerprint": {"benchmark": "chair"}, "digest": "abc"},
            {"key": "1", "image_id": 1, "answer": "A dog and a cat."},
            {"key": "2", "image_id": 2, "answer": "A car."}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"1": ["dog"], "2": ["car"]}))
    code, out, err = run(capsys, "eval", "score-chair", results, "--gt-json", gt, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["n_captions"] == 2 and data["metrics"]["CHAIR_s"] == pytest.approx(50.0)
    assert (tmp_path / "chair_none_chair.json").is_file()
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(rows[0]) + "\n")
    code, _, err = run(capsys, "eval", "score-chair", empty, "--gt-json", gt)
    one_line_error(code, err, "no captions to score")


def test_the_server_path_fits_max_tokens_to_the_context_the_service_reports(monkeypatch, capsys):
    from lvlm_hallu.eval import cli as eval_cli

    class Task:
        def items(self):
            return []

    monkeypatch.setattr(eval_cli, "server_context", lambda server, key, model: 256)
    fitted = eval_cli._fit_decoding(Task(), "remote/model", "http://svc", {"max_new_tokens": 512, "temperature": 0.0})
    assert fitted["max_new_tokens"] == 255
    assert "does not fit the context of 'remote/model' at http://svc (256 tokens): lowered to 255" in " ".join(
        capsys.readouterr().err.split())
    assert eval_cli._fit_decoding(Task(), "remote/model", "http://svc", {"max_new_tokens": 64})["max_new_tokens"] == 64
    monkeypatch.setattr(eval_cli, "server_context", lambda server, key, model: None)  # unknown: left as asked
    assert eval_cli._fit_decoding(Task(), "remote/model", "http://svc", {"max_new_tokens": 512})["max_new_tokens"] == 512


def click_group():
    import typer.core

    return typer.core.TyperGroup


def test_demo_hints_run_as_printed(tmp_path):
    """The demo's follow-up commands name this installation's lvlm and parse as its CLI parses them;
    the comparison asks for no more images than the generated world holds."""
    import typer.main

    from lvlm_hallu import demo
    from lvlm_hallu.eval.world import WORLD_IMAGES

    hints = demo.hints("shapes", "pai", tmp_path / "shown image.png")
    for hint in hints:
        argv = shlex.split(hint)
        assert Path(argv[0]).is_file() and Path(argv[0]).name == "lvlm", argv[0]
        command, rest = typer.main.get_command(cli.app), argv[1:]
        while isinstance(command, click_group()):
            command, rest = command.commands[rest[0]], rest[1:]
        params = command.make_context(command.name, list(rest)).params  # raises on anything it would refuse
        if params.get("n") is not None:
            assert params["n"] <= WORLD_IMAGES
    assert str(tmp_path / "shown image.png") in shlex.split(hints[0])


def test_demo_json_holds_the_shown_case_the_answers_and_the_counts(tmp_path):
    from lvlm_hallu import demo

    case = demo.Case(20, 3000021, ("box", "star"), demo.Judged(" A box and a cloud.", ("square", "cloud"), ("cloud",)),
                     demo.Judged(" A box.", ("square",), ()))
    data = demo.as_dict(demo.Outcome(case, searched=64, plain_hallucinated=30, treated_hallucinated=29, fixes=2),
                        "pai", tmp_path / "x.png", "shapes")
    assert data["case"]["image_id"] == 3000021 and data["case"]["plain"]["hallucinated"] == ["cloud"]
    assert data["case"]["plain"]["text"] == "A box and a cloud."  # no leading space
    assert data["counts"] == {"searched": 64, "plain_hallucinated": 30, "treated_hallucinated": 29, "fixes": 2}
    assert json.loads(json.dumps(data))["more"] == demo.hints("shapes", "pai", tmp_path / "x.png")
    assert demo.as_dict(demo.Outcome(None, searched=3), "pai", None, "shapes")["case"] is None
