"""`lvlm tune`: search spaces inside the papers' ranges, constrained selection, resumable cache,
the profile round trip, and clear errors on bad input."""

import json
import math

import pytest
from typer.testing import CliRunner

from lvlm_hallu import lvlm
from lvlm_hallu.eval import tune as tuning
from lvlm_hallu.eval.tune import Constraints, MetricsCache, Shape, TuneError, build_spaces, load_split, search
from lvlm_hallu.interventions import resolve
from lvlm_hallu.interventions.vhr import default_layers
from lvlm_hallu.lvlm import profile as profiles
from lvlm_hallu.cli import app

SHAPE = Shape(num_layers=8, hidden_size=256, tau=5.0, sink_dims=(7,))


def planted(calls=None):
    """A synthetic objective with a known optimum: VHR alpha 2.5 on the late band; alpha 3 is
    better still but loses 5 recall points (infeasible); PAI's contrast costs 2 F1 points
    (infeasible); VTE loses 1.5 recall points per layer exited before layer 6."""
    late = list(range(8 - 4, 8))

    def evaluate(method, params):
        if calls is not None:
            calls.append((method, dict(params)))
        m = {"CHAIR_s": 40.0, "CHAIR_i": 20.0, "Recall": 60.0, "F1": 80.0, "Len": 9.0}
        if method == "vhr":
            a = params["alpha"]
            m["CHAIR_s"] -= 10 * math.exp(-((a - 2.5) ** 2)) + (3.0 if params["layers"] == late else 0.0)
            m["CHAIR_i"] -= 2 * math.exp(-((a - 2.5) ** 2))
            if a >= 3.0:
                m["CHAIR_s"], m["Recall"] = 10.0, 55.0
        elif method == "pai":
            m["CHAIR_s"] -= 4 * params["alpha"] + (6 if params["contrast"] else 0)
            m["F1"] -= 2.0 if params["contrast"] else 0.0
        elif method == "vte":
            m["Recall"] -= 1.5 * max(0, 6 - params["exit_layer"])
        return m

    return evaluate


SPACE = ["vhr.alpha=1.25,1.5,2,2.5,3", "vhr.layers=paper,late,[1,2]", "pai.alpha=0.2,0.5,1.0"]


def test_search_recovers_the_planted_optimum_and_resumes(tmp_path):
    spaces = build_spaces(["vhr", "pai", "vte"], SHAPE, "small", SPACE)
    calls = []
    cache = MetricsCache(tmp_path, "k1")
    entries = search(spaces, planted(calls), SHAPE, cache=cache, progress=False)
    assert entries["vhr"]["params"] == {"alpha": 2.5, "layers": [4, 5, 6, 7]}
    assert entries["vhr"]["improves"] and entries["vhr"]["metrics"]["CHAIR_s"] == pytest.approx(27.0)
    infeasible = [r for r in entries["vhr"]["table"] if r["params"]["alpha"] == 3]
    assert infeasible and all(not r["feasible"] and "recall -5.0 > 3" in r["violation"] for r in infeasible)
    assert entries["pai"]["params"] == {"alpha": 1.0, "start_layer": 2, "contrast": False}
    assert entries["vte"]["params"] == {"exit_layer": 5}  # 1.5 recall points lost; exit 4 would lose 3
    assert len(entries["vhr"]["table"]) == 15 and len(entries["vte"]["table"]) == 6
    assert len(calls) == 1 + 15 + 9 + 6  # baseline once, then every configuration once (PAI: 3 alphas x (off, 2 gammas))
    again = search(spaces, lambda *a: pytest.fail("evaluated again despite the cache"), SHAPE, cache=cache,
                   progress=False)
    assert {m: e["params"] for m, e in again.items()} == {m: e["params"] for m, e in entries.items()}
    fresh = search(spaces, planted(calls), SHAPE, cache=MetricsCache(tmp_path, "other-eval"), progress=False)
    assert len(calls) == 2 * 31 and fresh["vhr"]["params"] == entries["vhr"]["params"]  # new settings, new key


def test_a_configuration_that_changes_nothing_does_not_improve():
    """VAR on a model without visual sinks measures exactly the baseline; its objective, rounded
    for the table, must not count as beating the unrounded baseline (the shipped shapes VAR said
    `improves: true` for a no-op)."""
    base = {"CHAIR_s": 43.875, "CHAIR_i": 25.73340195573855, "Recall": 67.19, "F1": 79.78, "Len": 9.29}
    spaces = build_spaces(["var"], SHAPE, "small", ["var.p=0.4", "var.rho=0.5", "var.require_visual_sink=true"])
    entries = search(spaces, lambda method, params: dict(base), SHAPE, progress=False)
    assert entries["var"]["objective"] == entries["var"]["baseline_objective"] == 69.6084
    assert entries["var"]["params"] is not None and not entries["var"]["improves"]
    better = search(spaces, lambda method, params: {**base, "CHAIR_i": base["CHAIR_i"] - (0.001 if method else 0)},
                    SHAPE, progress=False)
    assert better["var"]["improves"]


def test_constraints_are_options():
    spaces = build_spaces(["vhr", "vte"], SHAPE, "small", SPACE[:2])
    loose = Constraints(max_recall_drop=10.0, vte_max_recall_drop=6.0)
    entries = search(spaces, planted(), SHAPE, constraints=loose, progress=False)
    assert entries["vhr"]["params"]["alpha"] == 3 and entries["vte"]["params"] == {"exit_layer": 2}
    strict = search(spaces, planted(), SHAPE, constraints=Constraints(vte_max_recall_drop=0.0), progress=False)
    assert strict["vte"]["params"] == {"exit_layer": 6}


def test_default_grids_stay_inside_the_papers_ranges():
    spaces = build_spaces(["vhr", "pai", "var", "vte"], SHAPE, "full")
    assert min(spaces["vhr"]["alpha"]) >= 1 and spaces["vte"]["exit_layer"] == list(range(1, 7))
    assert all(0 < t < math.sqrt(SHAPE.hidden_size) for t in spaces["var"]["tau"])
    configs = tuning.configurations("vhr", spaces["vhr"], SHAPE)
    assert {"alpha": 2.0, "layers": list(default_layers(8))} in configs
    assert {"alpha": 2.0, "layers": [2, 3, 4, 5]} in configs  # the middle band: layers [2, L - 2)
    assert min(spaces["pai"]["gamma"]) >= 1
    small = sum(len(tuning.configurations(m, s, SHAPE)) for m, s in build_spaces(list(tuning.METHODS), SHAPE).items())
    assert small == 9 + 9 + 8 + 6  # the shapes budget: 32 configurations plus the baseline


@pytest.mark.parametrize("override, message", [
    ("vhr.alpha=0.5,2", "alpha < 1 is not VHR"),
    ("var.tau=17", "sqrt\\(E\\) = 16.00"),
    ("var.p=0", "fraction recycled"),
    ("var.require_visual_sink=1", "must be true or false"),
    ("vte.exit_layer=7", "k = L - 1 never exits"),
    ("vhr.layers=[1,9]", "layer indices in 0..7"),
    ("pai.gamma=0.5,2", "gamma < 1 adds it"),
    ("vhr.positions=all,first", "the prompt positions VHR scales at prefill, all or last"),
    ("vhr.beta=1", "'beta' is not searched"),
    ("carve.layers=1", "not among the methods tuned"),
    ("vhr.alpha", "METHOD.PARAM=V1,V2"),
])
def test_search_space_outside_the_range_is_refused(override, message):
    with pytest.raises(TuneError, match=message):
        build_spaces(["vhr", "pai", "var", "vte"], SHAPE, "small", [override])


def test_pai_gamma_is_searched_only_with_the_contrast():
    spaces = build_spaces(["pai"], SHAPE, "small", ["pai.alpha=1.0", "pai.contrast=false,true", "pai.gamma=1.1,2"])
    configs = tuning.configurations("pai", spaces["pai"], SHAPE)
    assert configs == [{"alpha": 1.0, "start_layer": 2, "contrast": False},
                       {"alpha": 1.0, "start_layer": 2, "contrast": True, "gamma": 1.1},
                       {"alpha": 1.0, "start_layer": 2, "contrast": True, "gamma": 2}]


def test_unknown_method_and_grid():
    with pytest.raises(TuneError, match="cannot tune carve; methods: vhr, pai, var, vte"):
        build_spaces(["carve"], SHAPE)
    with pytest.raises(TuneError, match="unknown grid 'huge'"):
        build_spaces(["vhr"], SHAPE, "huge")


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    from lvlm_hallu.lvlm.shapes.world import build_split

    root = tmp_path_factory.mktemp("shapes")
    instances, captions = build_split(root, "val", 12)
    return root, instances, captions


def test_validation_split_checks(val_split, tmp_path):
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH

    root, instances, captions = val_split
    split = load_split(root / "images", instances, captions, synonyms=SYNONYMS_PATH, n=5, pope_n=2)
    assert len(split.chair.items()) == 5 and len(split.pope.items()) == 12  # 2 images x 3 yes + 3 no
    empty = tmp_path / "instances_empty.json"
    empty.write_text(json.dumps({**json.loads(instances.read_text()), "images": [], "annotations": []}))
    with pytest.raises(TuneError, match="lists no images"):
        load_split(root / "images", empty, None, synonyms=SYNONYMS_PATH, n=5, pope_n=0)
    (tmp_path / "no_images").mkdir()
    with pytest.raises(TuneError, match="12 of 12 images of the split are missing|5 of 5 images"):
        load_split(tmp_path / "no_images", instances, captions, synonyms=SYNONYMS_PATH, n=5, pope_n=0)
    with pytest.raises(TuneError, match="--images must be a folder"):
        load_split(tmp_path / "nowhere", instances, captions, synonyms=SYNONYMS_PATH, n=5, pope_n=0)
    test_split = tmp_path / "instances_test.json"
    test_split.write_text(instances.read_text().replace("split val", "split test"))
    with pytest.raises(TuneError, match="is a test split"):
        load_split(root / "images", test_split, None, synonyms=SYNONYMS_PATH, n=5, pope_n=0)


def test_cli_reports_a_split_without_images(val_split, tmp_path):
    root, instances, _ = val_split
    empty = tmp_path / "instances.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    result = CliRunner().invoke(app, ["tune", "--images", str(root / "images"), "--instances", str(empty),
                                      "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2 and "lists no images" in result.output


def test_tune_writes_the_profile_and_tuned_presets_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path / "cache"))
    pipe = lvlm.load("tiny-llava")  # 4 layers, width 64
    L = pipe.facts.num_layers
    shape = tuning.model_shape(pipe, {})
    spaces = build_spaces(["vhr"], shape, "small", ["vhr.alpha=1.5,2.5", "vhr.layers=late,first"])

    def evaluate(method, params):  # planted: alpha 2.5 on layer 1 only
        good = method == "vhr" and params == {"alpha": 2.5, "layers": [1]}
        return {"CHAIR_s": 30.0 if good else 40.0, "CHAIR_i": 10.0, "Recall": 50.0, "F1": 70.0}

    entries = tuning.tune(pipe, spaces, evaluate, tmp_path / "out", eval_info={"n": 3}, progress=False)
    assert entries["vhr"]["params"] == {"alpha": 2.5, "layers": [1]}
    stored = json.loads(profiles.cache_path(pipe).read_text())["tuned"]["vhr"]
    assert stored["params"] == {"alpha": 2.5, "layers": [1]} and len(stored["table"]) == 4
    assert "**chosen**" in (tmp_path / "out" / "tune_report.md").read_text()
    (res,) = pipe.generate([lvlm.Request("Describe it.", tuning_image(), max_new_tokens=2,
                                         interventions=resolve("vhr:tuned"))])
    assert res.report["vhr"]["alpha"] == 2.5 and res.report["vhr"]["layers"] == [1]
    assert res.report["vhr"]["sources"] == {"alpha": "tuned", "layers": "tuned", "positions": "published"} and L == 4
    with pytest.raises(ValueError, match="only the embedded models"):
        tuning.tune(pipe, spaces, evaluate, tmp_path / "out", eval_info={"n": 3}, ship=True, progress=False)


def tuning_image():
    from PIL import Image

    return Image.new("RGB", (40, 30), "red")


def test_cli_refuses_to_ship_a_model_without_a_package(val_split, tmp_path):
    root, instances, captions = val_split
    result = CliRunner().invoke(app, ["tune", "--model", "tiny-llava", "--images", str(root / "images"),
                                      "--instances", str(instances), "--ship", "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 2 and "--ship is for the embedded models (shapes, shapes-detail)" in result.output


def test_tune_answers_carry_a_fingerprint_and_a_checkpoint_changed_in_place_is_a_new_run(val_split, tmp_path,
                                                                                       monkeypatch):
    import torch

    from lvlm_hallu.eval.fingerprint import checkpoint_digests
    from lvlm_hallu.lvlm import tiny

    monkeypatch.setenv("LVLM_CACHE", str(tmp_path / "cache"))
    root, instances, captions = val_split
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    model, processor = tiny.build("tiny-llava")
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    args = ["tune", "--model", str(ckpt), "--images", str(root / "images"), "--instances", str(instances),
            "--captions", str(captions), "--methods", "vhr", "--space", "vhr.alpha=1.5", "--space",
            "vhr.layers=[1]", "-n", "3", "--pope-n", "2", "--max-new-tokens", "3", "--out", str(out), "--no-progress"]

    def tune_once():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return sorted(p.name for p in (out / "runs").glob("*.jsonl"))

    first = tune_once()
    assert len(first) == 4  # none and vhr, CHAIR and POPE
    headers = {name: json.loads((out / "runs" / name).read_text().splitlines()[0]) for name in first}
    weights = checkpoint_digests(ckpt)["weights_sha256"]
    for name, header in headers.items():
        fp = header["fingerprint"]
        assert fp["model"]["weights_sha256"] == weights and fp["decoding"]["max_new_tokens"] == (
            3 if name.endswith("_chair.jsonl") else 16)
        assert fp["benchmark"] == ("chair" if name.endswith("_chair.jsonl") else "pope")
    (vhr_chair,) = [h for n, h in headers.items() if n.startswith("vhr-") and n.endswith("_chair.jsonl")]
    resolved = vhr_chair["fingerprint"]["interventions_resolved"][0]
    assert resolved["alpha"] == 1.5 and resolved["layers"] == [1]
    assert tune_once() == first  # a rerun resumes: no new files

    with torch.no_grad():  # the same path, other weights
        model.get_input_embeddings().weight.add_(0.5)
    model.save_pretrained(ckpt)
    second = tune_once()
    assert len(second) == 8 and set(first) < set(second)
    assert len(list((out / "configs").glob("*.json"))) == 4

    # a results file of another run under a configuration's name is refused, not resumed
    for cached in (out / "configs").glob("*.json"):
        cached.unlink()
    target = out / "runs" / sorted(set(second) - set(first))[0]  # a file of the current weights
    lines = target.read_text().splitlines()
    header = json.loads(lines[0])
    header["fingerprint"]["decoding"]["max_new_tokens"] = 99
    target.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "belongs to another run" in result.output
    assert "decoding.max_new_tokens: 99 !=" in result.output


# -- the caption metrics as constraints (issue 33): the swap that games CHAIR_s is refused ---------------


def planted_answers(parser, n=20):
    """Recorded captions scored by the real CHAIR task: every image holds one ball and one tree.
    No intervention names an absent car in half the captions; VHR alpha 3 swaps each car for a
    second ball (CHAIR_s 50 -> 0, as many objects named, a repeat in half the captions); alpha 2
    replaces half the cars by the tree that is there; alpha 1.5 changes nothing."""
    from lvlm_hallu.eval.chair import GroundTruth
    from lvlm_hallu.eval.compare import ChairTask

    ids = range(1, n + 1)
    gt = GroundTruth({i: frozenset({"ball", "tree"}) for i in ids}, counts={i: {"ball": 1, "tree": 1} for i in ids})
    task = ChairTask({i: f"{i}.png" for i in ids}, gt, parser)
    car, tree, ball = "There is a ball and a car.", "There is a ball and a tree.", "There is a ball and a ball."

    def caption(alpha, i):
        if i % 2:
            return tree
        return {3.0: ball, 2.0: tree if i % 4 == 0 else car}.get(alpha, car)

    def evaluate(method, params):
        alpha = params.get("alpha") if method == "vhr" else None
        records = {str(i): {"key": str(i), "image_id": i, "answer": caption(alpha, i)} for i in ids}
        return task.score(records)[0]

    return evaluate


@pytest.fixture(scope="module")
def shapes_parser():
    from lvlm_hallu.eval.chair import CaptionParser, SynonymTable

    return CaptionParser(SynonymTable.from_lines(["ball, balls", "car, cars", "tree, trees"]))


def test_a_configuration_that_lowers_chair_s_by_repeating_objects_is_refused(shapes_parser):
    spaces = build_spaces(["vhr"], SHAPE, "small", ["vhr.alpha=1.5,2,3", "vhr.layers=[1]"])
    evaluate = planted_answers(shapes_parser)
    base, gaming = evaluate(None, {}), evaluate("vhr", {"alpha": 3.0, "layers": [1]})
    assert (base["CHAIR_s"], gaming["CHAIR_s"]) == (50.0, 0.0) and gaming["Recall"] == base["Recall"] == 75.0
    assert (base["Repeat %"], gaming["Repeat %"]) == (0.0, 50.0) and gaming["Words"] == base["Words"]
    blind = search(spaces, evaluate, SHAPE, constraints=Constraints(max_repeat_rise=100.0), progress=False)
    assert blind["vhr"]["params"]["alpha"] == 3  # the objective alone rewards the swap
    entries = search(spaces, evaluate, SHAPE, progress=False)
    assert entries["vhr"]["params"] == {"alpha": 2, "layers": [1]} and entries["vhr"]["metrics"]["CHAIR_s"] == 25.0
    (refused,) = [r for r in entries["vhr"]["table"] if r["params"]["alpha"] == 3]
    assert not refused["feasible"] and refused["violation"] == "repeats +50.0 > 2"
    assert "Repeat %" in tuning.markdown(entries) and "repeats +50.0 > 2" in tuning.markdown(entries)


@pytest.mark.parametrize("change, violation", [
    ({"Overcount %": 13.0}, "overcounts +3.0 > 2"),
    ({"Words": 70.0}, "words -30.0% > 20%"),
    ({"Repeat %": 7.5}, ""),  # +2.5 within a margin of 3 below
    ({"Words": None}, "length not measured"),
])
def test_overcounts_and_length_are_constraints(change, violation):
    base = {"CHAIR_s": 40.0, "CHAIR_i": 20.0, "Recall": 60.0, "Repeat %": 5.0, "Overcount %": 10.0, "Words": 100.0}
    metrics = {**base, **change}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    feasible, why = tuning.judge("pai", metrics, base, Constraints(max_repeat_rise=3.0))
    assert (feasible, why) == (not violation, violation)


def test_metrics_cached_before_the_caption_metrics_are_scored_again(tmp_path):
    cache = MetricsCache(tmp_path, "k")
    cache.put("vhr", {"alpha": 2}, {"CHAIR_s": 1.0})
    assert cache.get("vhr", {"alpha": 2}) == {"CHAIR_s": 1.0}
    old = cache.path("vhr", {"alpha": 2})
    entry = json.loads(old.read_text())
    del entry["metrics_version"]  # written by an older lvlm tune: no repeat, count or length numbers
    old.write_text(json.dumps(entry))
    assert cache.get("vhr", {"alpha": 2}) is None


def test_cli_names_the_caption_constraints():
    result = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "200"})
    for option in ("--max-repeat-rise", "--max-overcount-rise", "--max-length-drop"):
        assert option in result.output
