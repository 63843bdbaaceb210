"""Paired bootstrap intervals in comparisons (issue 11, item 4)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lvlm_hallu.eval.compare import ChairTask, PopeTask, answer_executor, compare
from lvlm_hallu.eval.pope import PopeQuestion
from lvlm_hallu.eval.report import ConfigResult, Provenance, error_bars
from lvlm_hallu.eval.runner import local_answer
from lvlm_hallu.eval.significance import (
    Interval,
    UnitStats,
    check_resamples,
    default_resamples,
    min_resamples,
    paired_bootstrap,
    ratio,
    resample_counts,
)
from lvlm_hallu.lvlm.types import Result


def _pope_task(tmp_path, n=200):
    """n questions, four per image (two yes, two no); the second split repeats the first half."""
    from PIL import Image

    objects = ["dog", "cat", "car", "tree"]
    for k in range(n // 4 + 1):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{k}.jpg")
    qs = [PopeQuestion(i + 1, f"{i // 4}.jpg", f"Is there a {objects[i % 4]} in the image? {i}",
                       "yes" if i % 2 == 0 else "no") for i in range(n)]
    return PopeTask({"random": qs, "popular": qs[: n // 2]}, tmp_path)


def _records(task, answer_of):
    """Records as the runner returns them, with `answer_of(item, label)` as the answer."""
    return {it.key: {"key": it.key, **it.meta, "answer": answer_of(it)} for it in task.items()}


def test_a_configuration_against_itself_is_exactly_zero(tmp_path):
    task = _pope_task(tmp_path)
    rng = random.Random(0)
    records = _records(task, lambda it: rng.choice(["Yes", "No", "I cannot tell"]))
    _metrics, details = task.score(records)
    stats = task.unit_stats(records, details)
    found = paired_bootstrap(stats, stats, resamples=500, seed=3)
    assert set(found) >= {"random Acc", "random Prec", "random Rec", "random F1", "popular Yes", "POPE (mean F1)"}
    for iv in found.values():
        assert (iv.diff, iv.low, iv.high, iv.significant) == (0.0, 0.0, 0.0, False)


def test_a_planted_difference_excludes_zero_and_a_null_one_does_not(tmp_path):
    task = _pope_task(tmp_path)
    truth = {it.key: it.meta["label"] for it in task.items()}
    right = _records(task, lambda it: truth[it.key].capitalize())
    rng = random.Random(1)
    # 25% of the answers flipped: accuracy drops by about 25 points
    flipped = _records(task, lambda it: ("No" if truth[it.key] == "yes" else "Yes") if rng.random() < 0.25
                       else truth[it.key].capitalize())
    base = task.unit_stats(right, task.score(right)[1])
    worse = task.unit_stats(flipped, task.score(flipped)[1])
    found = paired_bootstrap(base, worse, resamples=1000, seed=0)
    acc = found["random Acc"]
    assert acc.diff == pytest.approx(task.score(flipped)[0]["random Acc"] - 100)
    assert acc.high < 0 and acc.significant and acc.low <= acc.diff <= acc.high
    # two configurations whose answers differ only on a handful of questions: no claim
    rng = random.Random(2)
    noisy = _records(task, lambda it: ("No" if truth[it.key] == "yes" else "Yes") if rng.random() < 0.01
                     else truth[it.key].capitalize())
    rng = random.Random(3)
    noisy2 = _records(task, lambda it: ("No" if truth[it.key] == "yes" else "Yes") if rng.random() < 0.01
                      else truth[it.key].capitalize())
    a = task.unit_stats(noisy, task.score(noisy)[1])
    b = task.unit_stats(noisy2, task.score(noisy2)[1])
    assert not paired_bootstrap(a, b, seed=0)["random Acc"].significant
    # seeded: the same seed gives the same interval, another seed (almost surely) another one
    assert paired_bootstrap(base, worse, seed=0)["random Acc"] == acc
    assert paired_bootstrap(base, worse, seed=1)["random Acc"] != acc


def test_bootstrap_point_equals_the_scorers(tmp_path, parser, tiny_coco):
    """The vectorized metrics on the whole set are the scorers' numbers (parity with eval.pope/eval.chair)."""
    task = _pope_task(tmp_path, 60)
    rng = random.Random(5)
    records = _records(task, lambda it: rng.choice(["Yes", "No", "", "no way", "Not sure."]))
    metrics, details = task.score(records)
    point = task.unit_stats(records, details).point()
    assert point.keys() == metrics.keys()
    for k in metrics:
        assert point[k] == pytest.approx(metrics[k], abs=1e-9), k
    from lvlm_hallu.eval.chair import ground_truth_from_coco

    gt = ground_truth_from_coco(tiny_coco.instances, tiny_coco.captions, parser=parser)
    files = {i: str(tiny_coco.images / f"COCO_val2014_{i:012d}.jpg") for i in (1, 2, 3)}
    chair = ChairTask(files, gt, parser)
    captions = {"1": "A man with two dogs, a cat and a table.", "2": "", "3": "A toilet next to a sink."}
    records = {k: {"key": k, "image_id": int(k), "answer": v} for k, v in captions.items()}
    metrics, details = chair.score(records)
    point = chair.unit_stats(records, details).point()
    assert point == pytest.approx(metrics)
    assert details["counts"] == {"empty captions": 1, "repeated-object captions": 0}
    records["3"]["answer"] = "A toilet, a sink and a toilet."  # one category named twice
    assert chair.score(records)[1]["counts"] == {"empty captions": 1, "repeated-object captions": 1}


def test_paired_bootstrap_checks_pairing():
    def stats(keys):
        return UnitStats(("n",), {"all": np.ones((len(keys), 1))}, {"all": tuple(keys)},
                         lambda s: {"n": s["all"][:, 0]})

    with pytest.raises(ValueError, match="different units"):
        paired_bootstrap(stats(["1", "2"]), stats(["1", "3"]))
    assert ratio(np.array([1.0, 2.0]), np.array([0.0, 4.0]), 100).tolist() == [0.0, 50.0]


class FlipModel:
    """Says "Yes" to everything; with "var" on it says "No" to questions about cats."""

    def generate(self, requests):
        out = []
        for r in requests:
            no = "var" in r.interventions and " cat " in r.prompt
            out.append(Result(text="No" if no else "Yes", token_ids=[], finish_reason="stop", prompt_tokens=0))
        return out


def test_compare_reports_intervals_markdown_marks_and_error_bars(tmp_path):
    task = _pope_task(tmp_path)
    execute = answer_executor(lambda spec: local_answer(FlipModel(), interventions=spec), progress=False)
    report, paths = compare(task, ["none", "var", "none"], execute, tmp_path / "out", Provenance(),
                            names=["none", "var", "again"], resamples=400)
    base, var, again = report.results
    assert base.intervals is None
    assert all(iv == {"diff": 0.0, "low": 0.0, "high": 0.0, "significant": False, "low_mc_error": 0.0,
                      "high_mc_error": 0.0, "verdict": "not significant"} for iv in again.intervals.values())
    # var answers "no" to the cat questions (a quarter, all labelled "no" or "yes" alternately)
    acc = var.intervals["random Acc"]
    assert acc["diff"] == pytest.approx(var.metrics["random Acc"] - base.metrics["random Acc"])
    assert acc["significant"] and acc["low"] > 0
    data = json.loads(paths.json.read_text())
    assert data["significance"]["baseline"] == "none" and data["significance"]["resamples"] == 400
    assert data["results"][1]["intervals"]["random Acc"]["significant"] is True
    md = paths.markdown.read_text()
    assert f"| var | {var.metrics['random Acc']:.2f} *" in md
    assert "## Differences to none (95% interval)" in md
    assert f"{acc['diff']:+.2f} [{acc['low']:+.2f}, {acc['high']:+.2f}] *" in md
    # the PNG's error bars span baseline + interval around each configuration's value
    below, above = error_bars(report.results, "random Acc")
    assert below[0] == above[0] == 0
    v, b = var.metrics["random Acc"], base.metrics["random Acc"]
    assert below[1] == pytest.approx(v - (b + acc["low"])) and above[1] == pytest.approx(b + acc["high"] - v)
    assert paths.png.read_bytes()[:4] == b"\x89PNG"


def test_interval_significance():
    assert Interval(1.0, 0.2, 2.0).significant and Interval(-1.0, -2.0, -0.1).significant
    assert not Interval(0.5, -0.1, 1.0).significant and not Interval(0.0, 0.0, 0.0).significant
    assert ConfigResult("x", "x", {"a": 1.0}, intervals={"a": Interval(1, 0.5, 2).to_dict()}).significant("a")


def test_pope_resamples_whole_images_the_same_in_every_split(tmp_path):
    """POPE's unit is the image (its splits share each image's positives): a split that repeats
    another's questions gets exactly its interval, and one image is one unit."""
    task = _pope_task(tmp_path, 120)
    twin = PopeTask({"random": task.splits["random"], "popular": task.splits["random"]}, tmp_path)
    truth = {it.key: it.meta["label"] for it in twin.items()}
    rng = random.Random(4)
    flips = {k: rng.random() < 0.3 for k in truth if k.startswith("random/")}

    def answers(flip):
        def answer(it):
            wrong = flip and flips["random/" + it.key.split("/")[1]]
            return ("No" if truth[it.key] == "yes" else "Yes") if wrong else truth[it.key].capitalize()
        return _records(twin, answer)

    base, worse = (twin.unit_stats(r, twin.score(r)[1]) for r in (answers(False), answers(True)))
    assert base.keys == {"images": tuple(sorted({f"{i}.jpg" for i in range(30)}))}
    found = paired_bootstrap(base, worse, resamples=400, seed=0)
    assert found["random F1"] == found["popular F1"] == found["POPE (mean F1)"]
    assert found["random F1"].high < 0
    qs = [PopeQuestion(i + 1, "one.jpg", f"Is there a {o} in the image?", lab)
          for i, (o, lab) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes"), ("tree", "no")])]
    single = PopeTask({"random": qs}, tmp_path)
    right = _records(single, lambda it: it.meta["label"].capitalize())
    wrong = dict(right, **{"random/1": {**right["random/1"], "answer": "No"}})
    iv = paired_bootstrap(single.unit_stats(right, {}), single.unit_stats(wrong, {}), resamples=400)["random Acc"]
    assert iv.low == iv.high == iv.diff == pytest.approx(-25.0)


def test_a_higher_level_widens_the_interval_around_the_same_resamples(tmp_path):
    """--level: the same seeded resamples, cut at other percentiles: 98.75% (Bonferroni over four
    looks) contains 95%, and the labels in the JSON and Markdown say which level was used."""
    task = _pope_task(tmp_path)

    class SomeFlips:  # "var" flips a third of the answers, chosen by the question's text: images differ
        def generate(self, requests):
            flip = [("var" in r.interventions and sum(map(ord, r.prompt)) % 3 == 0) for r in requests]
            return [Result(text="No" if f else "Yes", token_ids=[], finish_reason="stop", prompt_tokens=0)
                    for f in flip]

    execute = answer_executor(lambda spec: local_answer(SomeFlips(), interventions=spec), progress=False)
    reports = {}
    for level in (0.95, 0.9875):
        report, paths = compare(task, ["none", "var"], execute, tmp_path / "out", Provenance(), resamples=1600,
                                level=level)
        reports[level] = (report.results[1].intervals, json.loads(paths.json.read_text()), paths.markdown.read_text())
    narrow, wide = reports[0.95][0], reports[0.9875][0]
    assert narrow.keys() == wide.keys()
    for name in narrow:
        assert wide[name]["diff"] == narrow[name]["diff"]
        assert wide[name]["low"] <= narrow[name]["low"] and wide[name]["high"] >= narrow[name]["high"], name
    assert any(wide[n]["high"] - wide[n]["low"] > narrow[n]["high"] - narrow[n]["low"] for n in narrow)
    sig = reports[0.9875][1]["significance"]
    assert sig["level"] == 0.9875 and sig["unit"] == "image (its questions in every split)"
    assert "## Differences to none (98.75% interval)" in reports[0.9875][2]
    assert "the 98.75% interval of the difference" in reports[0.9875][2]
    assert "## Differences to none (95% interval)" in reports[0.95][2]


@pytest.mark.parametrize("level", [0.0, 1.0, 95.0, -0.5])
def test_a_level_outside_zero_one_is_refused_before_anything_runs(tmp_path, level):
    task = _pope_task(tmp_path)
    calls = []

    def execute(items, path, spec, description=None):
        calls.append(spec)
        return {}

    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        compare(task, ["none", "var"], execute, tmp_path / "out", Provenance(), level=level)
    assert calls == [] and not (tmp_path / "out").exists()
    stats = UnitStats(("n",), {"all": np.ones((3, 1))}, {"all": ("1", "2", "3")}, lambda s: {"n": s["all"][:, 0]})
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        paired_bootstrap(stats, stats, level=level)


# ---------------------------------------------------------------------------------------------
# Honest intervals (issue 36): enough resamples per tail, Monte-Carlo error, borderline verdicts


def _mean_stats(values) -> UnitStats:
    """One group, one column; the metric is the mean over the resampled units."""
    table = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    return UnitStats(("x",), {"all": table}, {"all": tuple(str(i) for i in range(len(table)))},
                     lambda s: {"mean": s["all"][:, 0] / len(table)})


def test_a_level_needs_ten_resamples_beyond_each_bound():
    assert (min_resamples(0.95), min_resamples(0.9875), min_resamples(0.999)) == (400, 1600, 20000)
    assert (default_resamples(0.9), default_resamples(0.95), default_resamples(0.9875),
            default_resamples(0.999)) == (1000, 1000, 4000, 50000)
    assert check_resamples(None, 0.999) == 50000 and check_resamples(400, 0.95) == 400
    with pytest.raises(ValueError, match=r"20 resamples leave 0\.01 beyond each bound of a 99\.9% interval; "
                                         r"at least 10 per tail .* 20000 or more .* 50000 at this level"):
        check_resamples(20, 0.999)
    with pytest.raises(ValueError, match="399 resamples leave"):
        check_resamples(399, 0.95)
    zero, some = _mean_stats(np.zeros(10)), _mean_stats(np.arange(10.0))
    with pytest.raises(ValueError, match="at least 10 per tail"):
        paired_bootstrap(zero, some, resamples=20, level=0.999)
    # without resamples, a high level takes its default: the same draws as asking for 50,000
    assert paired_bootstrap(zero, some, level=0.999) == paired_bootstrap(zero, some, level=0.999, resamples=50000)


def test_a_level_with_too_few_resamples_is_refused_before_anything_runs(tmp_path):
    task = _pope_task(tmp_path)
    calls = []

    def execute(items, path, spec, description=None):
        calls.append(spec)
        return {}

    with pytest.raises(ValueError, match="at least 10 per tail"):
        compare(task, ["none", "var"], execute, tmp_path / "out", Provenance(), level=0.999, resamples=20)
    assert calls == []


def test_monte_carlo_error_matches_the_spread_over_seeds():
    """The reported error of a bound is its standard deviation over bootstrap seeds (within 35%)."""
    data = np.random.default_rng(7).normal(0.3, 1.0, 60)
    base, other = _mean_stats(np.zeros(60)), _mean_stats(data)
    found = [paired_bootstrap(base, other, resamples=1600, level=0.9875, seed=s)["mean"] for s in range(40)]
    for bound, error in (("low", "low_error"), ("high", "high_error")):
        spread = np.std([getattr(iv, bound) for iv in found], ddof=1)
        reported = np.mean([getattr(iv, error) for iv in found])
        assert 0.65 < reported / spread < 1.35, (bound, reported, spread)


def test_a_bound_at_zero_is_borderline_instead_of_flipping_with_the_seed():
    """The confirmed case: at 98.75% with 1,000 resamples, `significant` followed the seed when
    the true bound sat at 0. The verdict calls it borderline; a clear difference stays significant."""
    data = np.random.default_rng(3).normal(0.0, 1.0, 50)
    base = _mean_stats(np.zeros(50))
    # shift the data so that the 98.75% lower bound of a very long bootstrap sits at 0
    true_low = paired_bootstrap(base, _mean_stats(data), resamples=100_000, level=0.9875, seed=99)["mean"].low
    at_zero = _mean_stats(data - true_low)

    def old_significant(seed):  # what paired_bootstrap computed before: 1,000 resamples, no tail check
        d = resample_counts(50, 1000, np.random.default_rng(seed)) @ at_zero.groups["all"][:, 0] / 50
        return bool(np.percentile(d, 100 * 0.0125 / 2) > 0)

    old = [old_significant(s) for s in range(40)]
    assert 8 <= sum(old) <= 32  # the old verdict is a coin toss
    new = [paired_bootstrap(base, at_zero, level=0.9875, seed=s)["mean"].verdict for s in range(40)]
    assert new.count("borderline") >= 34 and not ({"significant", "not significant"} <= set(new))
    clear = [paired_bootstrap(base, _mean_stats(data - true_low + 0.4), level=0.9875, seed=s)["mean"]
             for s in range(10)]
    assert all(iv.verdict == "significant" and iv.low > 0 for iv in clear)


def test_interval_verdicts_and_their_fields():
    assert Interval(1.0, 0.2, 2.0, 0.05, 0.1).verdict == "significant"
    assert Interval(1.0, 0.05, 2.0, 0.05, 0.1).verdict == "borderline"  # 0 within 2 errors of the low bound
    assert Interval(-1.0, -2.0, -0.3, 0.2, 0.2).verdict == "borderline"
    assert Interval(0.5, -1.0, 1.0, 0.1, 0.1).verdict == "not significant"
    assert Interval(0.5, -0.1, 1.0, 0.1, 0.1).verdict == "borderline"  # excludes 0 by less than its error
    assert Interval(0.0, 0.0, 0.0).verdict == "not significant"  # a configuration against itself
    assert Interval(1.0, 0.2, 2.0, 0.05, 0.1).to_dict() == {
        "diff": 1.0, "low": 0.2, "high": 2.0, "significant": True, "low_mc_error": 0.05, "high_mc_error": 0.1,
        "verdict": "significant"}


def test_cli_refuses_99_9_percent_with_20_resamples_before_loading(tiny_coco, monkeypatch):
    from typer.testing import CliRunner

    from lvlm_hallu.eval import cli

    loaded = []
    monkeypatch.setattr(cli, "_load_model", lambda name: loaded.append(name))
    res = CliRunner().invoke(cli.app, ["compare", "--model", "fake/a", "--images", str(tiny_coco.images),
                                       "--annotations", str(tiny_coco.root), "-n", "2", "--level", "0.999",
                                       "--resamples", "20"])
    assert res.exit_code == 2 and loaded == []
    assert "--resamples: 20 resamples leave 0.01 beyond each bound of a 99.9% interval" in res.output


def test_markdown_marks_borderline_and_gives_seed_and_monte_carlo_errors():
    from lvlm_hallu.eval.report import Report, markdown

    sure = Interval(-2.0, -3.0, -1.0, 0.05, 0.04).to_dict()
    close = Interval(-1.0, -2.0, -0.05, 0.05, 0.04).to_dict()  # excludes 0, by less than 2 errors
    results = (ConfigResult("none", "none", {"a": 10.0, "b": 5.0}),
               ConfigResult("pai", "pai", {"a": 8.0, "b": 4.0}, intervals={"a": sure, "b": close}))
    sig = {"baseline": "none", "method": "paired bootstrap, percentile interval", "level": 0.9875,
           "resamples": 4000, "seed": 7, "unit": "image", "min_per_tail": 10, "borderline_z": 2.0}
    md = markdown(Report(Provenance(benchmark="chair"), results, sig))
    assert "| pai | 8.00 * | 4.00 |" in md  # the borderline difference gets no star
    assert "| pai | -2.00 [-3.00, -1.00] * (MC ±0.05, ±0.04) | -1.00 [-2.00, -0.05] ~ (MC ±0.05, ±0.04) |" in md
    assert "4000 resamples, seed 7" in md and "~ borderline: 0 lies within 2 Monte-Carlo standard errors" in md
    assert results[1].significant("a") and not results[1].significant("b") and close["significant"]
