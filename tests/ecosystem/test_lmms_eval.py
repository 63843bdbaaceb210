"""lmms-eval against our service and in process, scored by lmms-eval's own POPE code.

One Ray Serve app with the embedded shapes model on loopback for the module. For `none` and one
intervention, `lvlm eval pope --server` asks the generated shapes-world POPE splits; lmms-eval
0.7.3's OpenAI-compatible backend, unchanged, asks the same question files (the task this project
ships, python -m lvlm_hallu.lmms_eval.pope) of the same service with the intervention in the
model name ("shapes:vhr"). Both must give the same answer to every question, and lmms-eval's
POPE metrics must equal ours on every split. lmms-eval's `pope_yes_ratio` is the share of
questions whose LABEL is yes (its pope_aggregate_yes_ratio counts ground truth), not POPE's
yes-ratio of the answers (ours, eval/pope.py), so that one is checked against its own definition.
Then `--model lvlm_hallu` runs our engine inside lmms-eval with the intervention as a model
argument and must answer as the service did.

lmms-eval runs in a venv of its own (`make lmms-eval-venv`, `LVLM_LMMS_PYTHON`): it keeps our
transformers but would downgrade protobuf and python-dateutil in the project venv. Without it
these tests are skipped with that instruction; `make test` (CI) builds it first.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

LMMS_VENV = Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "lvlm-hallu-lmms-eval"  # the Makefile's
LMMS_PYTHON = Path(os.environ.get("LVLM_LMMS_PYTHON") or LMMS_VENV / "bin" / "python")
N_IMAGES = int(os.environ.get("LVLM_ECOSYSTEM_N", "2"))  # images per split: 6 questions each
INTERVENTION = "vhr"
SPLITS = ("random", "popular", "adversarial")
METRICS = {"Acc": "pope_accuracy", "Prec": "pope_precision", "Rec": "pope_recall", "F1": "pope_f1_score"}
LMMS_TIMEOUT_S = 300
SHARED_NLTK = Path(__file__).resolve().parents[3] / "shared" / "nltk_data"

needs_lmms = pytest.mark.skipif(not LMMS_PYTHON.is_file(), reason=f"no lmms-eval venv at {LMMS_PYTHON}: run "
                                "`make lmms-eval-venv` (or set LVLM_LMMS_PYTHON); `make test` builds it")


@pytest.fixture(scope="module", autouse=True)
def lmms_runs_this_checkout():
    """The venv is shared by the machine's checkouts; one built from another checkout would run
    that checkout's plugin (or none, if it is gone) and lmms-eval would report no results."""
    if not LMMS_PYTHON.is_file():
        return
    found = subprocess.run([str(LMMS_PYTHON), "-c", "import lvlm_hallu; print(lvlm_hallu.__file__)"],
                           capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=120)
    here = Path(__file__).resolve().parents[2]
    assert found.returncode == 0 and Path(found.stdout.strip()).resolve().is_relative_to(here), (
        f"the lmms-eval venv {LMMS_PYTHON} does not import lvlm_hallu from this checkout ({here}): "
        f"{(found.stdout + found.stderr).strip()[-300:]}; run `make lmms-eval-venv` here")


@pytest.fixture(scope="module")
def base_url(ray_service):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from lvlm_hallu.serve.config import ServeConfig

    with ray_service(ServeConfig(model="shapes", max_batch_size=8, batch_wait_timeout_s=0.05)) as url:
        yield url


def lmms_eval(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m lmms_eval ...` in the lmms-eval venv, offline, its caches under `out`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "OPENAI_API_KEY": "none", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    if SHARED_NLTK.is_dir():
        env.setdefault("NLTK_DATA", str(SHARED_NLTK))
    return subprocess.run([str(LMMS_PYTHON), "-m", "lmms_eval", *args, "--output_path", str(out / "results"),
                           "--log_samples", "--verbosity", "WARNING"],
                          capture_output=True, text=True, timeout=LMMS_TIMEOUT_S, env=env, cwd=out)


def lmms_results(out: Path) -> tuple[dict, dict]:
    """({task: {metric: value}}, {task: {question_id: answer}}) from lmms-eval's output folder."""
    [results_file] = glob.glob(str(out / "results" / "**" / "*_results.json"), recursive=True)
    metrics = {task: {k.split(",")[0]: v for k, v in values.items() if "," in k}
               for task, values in json.loads(Path(results_file).read_text())["results"].items()}
    answers = {}
    for path in glob.glob(str(out / "results" / "**" / "*_samples_*.jsonl"), recursive=True):
        task = Path(path).stem.split("_samples_")[1]
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        # a sample names its question in each metric's record; filtered_resps is the answer lmms-eval scored
        answers[task] = {row["pope_accuracy"]["question_id"]: row["filtered_resps"] for row in rows}
    return metrics, answers


def ours(out: Path) -> tuple[dict, dict]:
    """({metric: value x100}, {split: {question_id: answer}}) of one `lvlm eval pope` run."""
    [result] = json.loads((out / "pope_report.json").read_text())["results"]
    answers: dict[str, dict] = {}
    for line in (out / result["details"]["results_file"]).read_text().splitlines():
        row = json.loads(line)
        if "key" in row:
            answers.setdefault(row["split"], {})[row["question_id"]] = row["answer"]
    return result["metrics"], answers


@pytest.fixture(scope="module")
def runs(base_url, tmp_path_factory):
    """`lvlm eval pope --server` for none and the intervention, the lmms-eval task written from
    its question files, and lmms-eval's OpenAI backend over that task for both configurations."""
    from typer.testing import CliRunner

    from lvlm_hallu.eval.cli import app
    from lvlm_hallu.eval.world import shapes_world
    from lvlm_hallu.lmms_eval import pope as task

    root = tmp_path_factory.mktemp("ecosystem")
    out = {}
    for spec in ("none", INTERVENTION):
        folder = root / f"ours-{spec}"
        result = CliRunner().invoke(app, ["pope", "--model", "shapes", "-n", str(N_IMAGES), "--server", base_url,
                                          "--interventions", spec, "--parser", "lmms-eval", "--out", str(folder),
                                          "--no-progress"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        out[spec] = {"ours": ours(folder)}
    files = [str(root / "ours-none" / f"pope_{s}_questions.jsonl") for s in SPLITS]
    task.main(["--out", str(root / "task"), "--questions", *files, "--images", str(shapes_world(3 * N_IMAGES).images)])
    for spec in ("none", INTERVENTION):
        model = "shapes" if spec == "none" else f"shapes:{spec}"
        folder = root / f"lmms-{spec}"
        folder.mkdir()
        done = lmms_eval(folder, "--model", "openai", "--model_args",
                         f"model={model},base_url={base_url}/v1,num_concurrent=8,max_retries=1,timeout=120",
                         "--tasks", task.GROUP, "--include_path", str(root / "task"))
        assert done.returncode == 0, done.stderr[-4000:]
        out[spec]["lmms"] = lmms_results(folder)
    out["root"] = root
    return out


@needs_lmms
@pytest.mark.parametrize("spec", ["none", INTERVENTION])
def test_lmms_eval_through_the_service_gets_our_answers(runs, spec):
    _, ours_answers = runs[spec]["ours"]
    _, lmms_answers = runs[spec]["lmms"]
    for split in SPLITS:
        theirs = lmms_answers[f"pope_shapes_{split}"]
        assert len(theirs) == 6 * N_IMAGES and theirs == ours_answers[split], split


@needs_lmms
@pytest.mark.parametrize("spec", ["none", INTERVENTION])
def test_lmms_evals_pope_scoring_equals_ours_on_every_split(runs, spec):
    ours_metrics, _ = runs[spec]["ours"]
    lmms_metrics, lmms_answers = runs[spec]["lmms"]
    labels = {s: [json.loads(line)["answer"] for line in (runs["root"] / "task" / f"pope_shapes_{s}.jsonl")
                  .read_text().splitlines()] for s in SPLITS}
    for split in SPLITS:
        theirs = lmms_metrics[f"pope_shapes_{split}"]
        for name, metric in METRICS.items():
            assert 100 * theirs[metric] == ours_metrics[f"{split} {name}"], (split, name)
        answered_yes = sum(a.strip().lower() == "yes" for a in lmms_answers[f"pope_shapes_{split}"].values())
        assert ours_metrics[f"{split} Yes"] == 100 * (answered_yes / len(labels[split]))  # POPE's: answers
        assert theirs["pope_yes_ratio"] == labels[split].count("yes") / len(labels[split])  # lmms-eval's: labels


@needs_lmms
def test_the_comparison_table_is_written(runs):
    """docs/ecosystem.md's table, lmms-eval vs `lvlm eval pope` on the same answers (x100)."""
    lines = ["| config | split | metric | lmms-eval | lvlm eval pope |", "|---|---|---|---:|---:|"]
    for spec in ("none", INTERVENTION):
        for split in SPLITS:
            theirs, ours_metrics = runs[spec]["lmms"][0][f"pope_shapes_{split}"], runs[spec]["ours"][0]
            for name, metric in {**METRICS, "Yes": "pope_yes_ratio"}.items():
                lines.append(f"| {spec} | {split} | {name} | {100 * theirs[metric]:.2f} | "
                             f"{ours_metrics[f'{split} {name}']:.2f} |")
    table = runs["root"] / "pope_table.md"
    table.write_text("\n".join(lines) + "\n")
    print(table)
    assert len(lines) == 2 + 2 * len(SPLITS) * 5


@needs_lmms
def test_lmms_eval_runs_our_engine_in_process_with_the_intervention(runs):
    """`--model lvlm_hallu` (our entry point) answers as the service did with shapes:vhr."""
    folder = runs["root"] / "in-process"
    folder.mkdir()
    done = lmms_eval(folder, "--model", "lvlm_hallu", "--model_args", f"pretrained=shapes,interventions={INTERVENTION}",
                     "--batch_size", "4", "--tasks", "pope_shapes_random", "--include_path", str(runs["root"] / "task"))
    assert done.returncode == 0, done.stderr[-4000:]
    metrics, answers = lmms_results(folder)
    assert answers["pope_shapes_random"] == runs[INTERVENTION]["lmms"][1]["pope_shapes_random"]
    assert metrics["pope_shapes_random"] == runs[INTERVENTION]["lmms"][0]["pope_shapes_random"]


@needs_lmms
def test_the_entry_point_registers_the_model_and_bad_arguments_fail_clearly(tmp_path):
    script = """
import sys
from lmms_eval.models import get_model
from lvlm_hallu.lmms_eval.model import LVLMHallu
assert get_model("lvlm_hallu") is LVLMHallu, get_model("lvlm_hallu")
for call, args in ((LVLMHallu.loglikelihood, []), (LVLMHallu.generate_until_multi_round, [])):
    try:
        call(object.__new__(LVLMHallu), args)
    except NotImplementedError as err:
        print("refused:", err)
for kwargs in ({"interventions": "vhx"}, {"pretrained": "shapes", "temperature": 0.5}, {"batch_size": "auto"}):
    try:
        LVLMHallu(**kwargs)
    except ValueError as err:
        print("bad:", err)
"""
    done = subprocess.run([str(LMMS_PYTHON), "-c", script], capture_output=True, text=True, timeout=LMMS_TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["refused", "refused", "bad", "bad", "bad"]
    assert "log-likelihood" in lines[0] and "generate_until" in lines[0]
    assert "unknown intervention 'vhx'" in lines[2] and "valid names" in lines[2]
    assert "unknown model_args temperature" in lines[3]
    assert "batch_size must be a positive whole number, got 'auto'" in lines[4]


def chat(base_url: str, **fields) -> httpx.Response:
    import base64

    from lvlm_hallu.eval.world import shapes_world

    image = sorted(shapes_world().images.iterdir())[0].read_bytes()
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        {"type": "text", "text": "Describe this image."}]}], "max_tokens": 24, "logprobs": True, **fields}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


TIMINGS = ("prefill_ms", "decode_ms", "decode_tokens_per_s")


def test_the_model_name_runs_what_the_interventions_field_runs(base_url):
    by_name, by_field, plain = (chat(base_url, model="shapes:vhr"), chat(base_url, model="shapes", interventions="vhr"),
                                chat(base_url, model="shapes"))
    assert by_name.status_code == by_field.status_code == 200, by_name.text
    a, b = by_name.json(), by_field.json()
    assert a["model"] == "shapes:vhr" and b["model"] == "shapes"
    assert a["choices"] == b["choices"]  # same text and the same tokens with their log-probabilities
    assert a["usage"] == b["usage"]
    report = {k: v for k, v in a["intervention_report"].items() if k not in TIMINGS}
    assert report == {k: v for k, v in b["intervention_report"].items() if k not in TIMINGS}
    assert [x["name"] for x in report["applied"]] == ["vhr"] and report["details"]
    assert plain.json()["intervention_report"]["applied"] == []


@pytest.mark.parametrize(("fields", "code", "words"), [
    ({"model": "shapes:vhx"}, "invalid_intervention", "MODEL:NAME[:PRESET]"),
    ({"model": "shapes:vhr", "interventions": "pai"}, "conflicting_interventions", "give one of them"),
    ({"model": "gpt-4o:vhr"}, "model_not_found", "available: shapes"),
])
def test_a_bad_model_name_is_refused_by_the_service(base_url, fields, code, words):
    answer = chat(base_url, **fields)
    error = answer.json()["error"]
    assert answer.status_code == (404 if code == "model_not_found" else 400)
    assert error["code"] == code and words in error["message"]
