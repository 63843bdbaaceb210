"""`lvlm demo`: hallucination marks, the selection rule, the search over the test split, its cache.

The search is tested with a scripted pipeline (answers chosen per image and per column), so the
rule is checked exactly; one test runs the real embedded model on two test images and checks the
CHAIR marks against the shapes world's own word matcher (lvlm/shapes/quality.py), an independent
implementation.
"""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH
from lvlm_hallu.lvlm.shapes.world import Instance, Scene
from lvlm_hallu.lvlm.types import Result, Timings
from lvlm_hallu import demo


@pytest.fixture(scope="module")
def parser():
    from lvlm_hallu.eval.chair import CaptionParser, load_synonyms

    return CaptionParser(load_synonyms(SYNONYMS_PATH))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "SHIPPED", tmp_path / "shipped.json")


# --------------------------------------------------------------------------------- marks


def test_judge_lists_absent_categories_once_in_order(parser):
    judged = demo.judge(parser, "There are two clouds, a sun, a cloud and a tree.", frozenset({"sun"}))
    assert judged.mentioned == ("cloud", "sun", "cloud", "tree")
    assert judged.hallucinated == ("cloud", "tree")
    assert judged.recalled == ("sun",)


def test_marks_wrap_exactly_the_absent_words_in_the_original_text(parser):
    text = "Two Clouds, a sun and some Crates."
    pieces = demo.segments(parser, text, frozenset({"sun"}))
    assert demo.marked(pieces) == "Two [Clouds], a sun and some [Crates]."
    assert "".join(p for p, _ in pieces) == text  # nothing lost or reordered


@pytest.mark.parametrize("caption", [
    "A teddy bear sits next to a dog.",  # double word merged into one mention
    "The seat of the toilet is up, a man looks at it.",  # the toilet rule drops 'seat'
    'He said "a cat" twice: a cat, a cat!',  # Treebank rewrites the quotes
])
def test_spans_cover_the_parser_mentions_with_coco_tables(caption):
    from lvlm_hallu.eval.chair import CaptionParser

    coco = CaptionParser()
    spans = demo.mention_spans(coco, caption)
    assert [c for _, _, c in spans] == list(coco.parse(caption).categories)
    for start, end, category in spans:  # each span, parsed alone, is the same category
        assert coco.parse(caption[start:end]).categories == (category,)


def test_teddy_bear_is_marked_as_one_phrase():
    from lvlm_hallu.eval.chair import CaptionParser

    pieces = demo.segments(CaptionParser(), "A teddy bear and a dog.", frozenset({"dog"}))
    assert demo.marked(pieces) == "A [teddy bear] and a dog."


# --------------------------------------------------------------------------------- selection


def case(index, gt, plain_bad, treated_bad=(), treated_ok=("x",)):
    mk = lambda bad, ok: demo.Judged("", tuple(ok) + tuple(bad), tuple(bad))
    return demo.Case(index, 3_000_001 + index, tuple(sorted(gt)), mk(plain_bad, gt), mk(treated_bad, treated_ok))


def test_fix_needs_plain_absent_object_clean_treated_and_a_present_object():
    assert case(0, {"sun"}, ["cloud"], treated_ok=["sun"]).fixed
    assert not case(0, {"sun"}, [], treated_ok=["sun"]).fixed  # nothing to fix
    assert not case(0, {"sun"}, ["cloud"], ["moon"], ["sun"]).fixed  # traded for another one
    assert not case(0, {"sun"}, ["cloud"], treated_ok=[]).fixed  # an empty answer fixes nothing


def test_partner_of_a_present_object_is_preferred_then_split_order():
    assert case(0, {"sun"}, ["cloud"], treated_ok=["sun"]).partners == ("cloud",)
    assert case(0, {"ball"}, ["cloud"], treated_ok=["ball"]).partners == ()
    cases = [case(0, {"ball"}, ["cloud"], treated_ok=["ball"]), case(1, {"sun"}, ["moon"], treated_ok=[]),
             case(2, {"tree"}, ["house"], treated_ok=["tree"]), case(3, {"ball"}, ["key"], treated_ok=["ball"])]
    assert [c.index for c in demo.order(cases)] == [2, 0, 3]


# --------------------------------------------------------------------------------- search


SCENES = {  # index -> objects present
    0: ["ball"], 1: ["ball"], 2: ["sun"], 3: ["tree"], 4: ["sun"], 5: ["fish"],
}


class ScriptedPipe:
    """Answers from a script: (index, treated) -> text, else the image's first object (no hallucination);
    `alone` overrides answers of runs of one image (plain + treated row)."""

    def __init__(self, script, alone=None):
        self.script, self.alone, self.calls = script, alone or {}, []

    def generate(self, requests):
        self.calls.append([r.image for r in requests])
        alone = len(requests) == 2
        out = []
        for r in requests:
            key = (r.image, bool(r.interventions))
            text = self.alone.get(key) if alone and key in self.alone else self.script.get(key, f"There is a {SCENES[r.image][0]}.")
            out.append(Result(text, [1, 2], "stop", 10, Timings(5.0, 10.0, 1), {"attention_backend": "reference"}))
        return out


def searcher(pipe, parser):
    scenes = lambda i: (Scene(3_000_001 + i, "blue", [Instance(k, [0, 0, 9, 9], 81.0) for k in SCENES[i]]), i)
    return demo.Searcher(pipe, parser, ("treated",), scenes=scenes)


def test_search_stops_after_the_batch_with_a_confirmed_partner_fix(parser):
    script = {(0, False): "There is a ball and a box.", (0, True): "There is a ball.",  # plain fix, no partner
              (3, False): "There is a tree and a house.", (3, True): "There is a tree."}  # partner fix
    pipe = ScriptedPipe(script)
    outcome = searcher(pipe, parser).search(limit=6, batch_size=2)
    assert outcome.case.index == 3 and outcome.case.partners == ("house",)
    assert pipe.calls == [[0, 0, 1, 1], [2, 2, 3, 3], [3, 3]]  # two batches, then 3 confirmed alone
    assert (outcome.searched, outcome.plain_hallucinated, outcome.treated_hallucinated, outcome.fixes) == (4, 2, 0, 2)
    assert outcome.results[1].text == "There is a tree."


def test_search_falls_back_to_the_first_fix_that_reproduces_alone(parser):
    script = {(1, False): "There is a ball and a box.", (1, True): "There is a ball.",
              (5, False): "There is a fish and a key.", (5, True): "There is a fish."}
    pipe = ScriptedPipe(script, alone={(1, True): "There is a ball and a key."})  # batch-only fix
    outcome = searcher(pipe, parser).search(limit=6, batch_size=4)
    assert outcome.case.index == 5 and outcome.searched == 6 and outcome.fixes == 2
    assert pipe.calls[-2:] == [[1, 1], [5, 5]]


def test_search_without_a_fix_says_so_with_counts(parser):
    pipe = ScriptedPipe({(2, False): "There is a sun and a cloud.", (2, True): "There is a sun and a moon."})
    outcome = searcher(pipe, parser).search(limit=5, batch_size=5)
    assert outcome.case is None and (outcome.searched, outcome.plain_hallucinated, outcome.treated_hallucinated) == (5, 1, 1)
    out = io.StringIO()
    demo.render(Console(file=out, width=200, color_system=None), outcome, parser, "vhr", None, "shapes")
    assert "No image found where vhr removes" in out.getvalue() and "5 held-out test images searched" in out.getvalue()


def test_cache_answers_with_one_confirmation_run_and_refresh_searches_again(parser):
    script = {(2, False): "There is a sun and a cloud.", (2, True): "There is a sun."}
    pipe = ScriptedPipe(script)
    first = demo.find(searcher(pipe, parser), "k1", limit=4, batch_size=4)
    assert first.case.index == 2 and len(pipe.calls) == 2
    saved = json.loads((demo.cache_dir() / "k1.json").read_text())
    assert saved == {"searched": 4, "plain_hallucinated": 1, "treated_hallucinated": 0, "fixes": 1, "index": 2}
    again = demo.find(searcher(pipe, parser), "k1", limit=4, batch_size=4)
    assert again.case == first.case and again.searched == 4 and pipe.calls[2:] == [[2, 2]]
    demo.find(searcher(pipe, parser), "k1", limit=4, batch_size=4, refresh=True)
    assert pipe.calls[3] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_stale_cache_and_shipped_entry(parser):
    script = {(2, False): "There is a sun and a cloud.", (2, True): "There is a sun."}
    pipe = ScriptedPipe(script)
    demo.find(searcher(pipe, parser), "k2", limit=4, batch_size=4, ship=True)
    shipped = json.loads(demo.SHIPPED.read_text())
    assert shipped["k2"]["index"] == 2
    (demo.cache_dir() / "k2.json").unlink()
    pipe.calls.clear()
    assert demo.find(searcher(pipe, parser), "k2", limit=4, batch_size=4).case.index == 2
    assert pipe.calls == [[2, 2]]  # the shipped entry, confirmed
    # The model changed: the cached image no longer shows a fix, so the demo searches again.
    pipe.script = {(4, False): "There is a sun and a cloud.", (4, True): "There is a sun."}
    pipe.calls.clear()
    assert demo.find(searcher(pipe, parser), "k2", limit=6, batch_size=6).case.index == 4
    assert pipe.calls[0] == [2, 2] and pipe.calls[1] == [i for i in range(6) for _ in (0, 1)]


def test_ship_on_a_cache_hit_stores_the_cached_outcome_without_searching(parser):
    pipe = ScriptedPipe({(2, False): "There is a sun and a cloud.", (2, True): "There is a sun."})
    demo.find(searcher(pipe, parser), "k3", limit=4, batch_size=4)
    pipe.calls.clear()
    demo.find(searcher(pipe, parser), "k3", limit=4, batch_size=4, ship=True)
    assert pipe.calls == [[2, 2]]
    assert json.loads(demo.SHIPPED.read_text()) == {"k3": {"searched": 4, "plain_hallucinated": 1,
                                                           "treated_hallucinated": 0, "fixes": 1, "index": 2}}


# --------------------------------------------------------------------------------- output


def test_report_line_summarises_every_method_in_one_line():
    result = Result("x", [1, 2, 3], "stop", 10, Timings(12.4, 100.0, 2), {
        "attention_backend": "reference", "added_ms": 0.31,
        "vhr": {"alpha": 2.0, "heads": {"0": [1, 2], "1": [], "2": [4]}, "twin_rows": 1},
        "pai": {"alpha": 0.2, "layers": "[2, 4)", "sources": {"alpha": "tuned", "layers": "scaled"},
                "big": {str(i): i for i in range(5)}}})
    line = demo.report_line(result)
    assert "\n" not in line
    assert line == ("added_ms=0.31 | vhr(alpha=2, heads=3 in 2/3, twin_rows=1) | pai(alpha=0.2, layers=[2, 4), "
                    "sources={alpha: tuned, layers: scaled}, big={5 keys}) | "
                    "prefill 12 ms, 3 tok at 20 tok/s, attention reference")
    plain = Result("x", [1], "stop", 10, Timings(3.0, 0.0, 0), {"attention_backend": "reference"})
    assert demo.report_line(plain).startswith("no interventions | prefill 3 ms")


def test_render_shows_both_answers_marks_reports_and_pointers(parser):
    pipe = ScriptedPipe({(2, False): "There is a sun and a cloud.", (2, True): "There is a sun."})
    outcome = searcher(pipe, parser).search(limit=3, batch_size=3)
    out = io.StringIO()
    demo.render(Console(file=out, width=160, color_system=None), outcome, parser, "vhr+pai", None, "shapes")
    text = out.getvalue()
    assert "objects in it: sun" in text and "names cloud: the usual partner" in text
    assert "There is a sun and a [cloud]." in text and "absent: cloud" in text and "absent: none" in text
    assert "plain: no interventions | prefill 5 ms, 2 tok at 100 tok/s" in text and "\nvhr+pai: " in text
    assert "lvlm inspect --model shapes" in text and "lvlm eval compare --benchmark chair --interventions none,vhr+pai" in text


# --------------------------------------------------------------------------------- real model


def test_real_model_marks_agree_with_the_world_word_matcher(parser):
    from lvlm_hallu import lvlm
    from lvlm_hallu.interventions import resolve
    from lvlm_hallu.lvlm.shapes.quality import load_synonyms, mentions

    pipe = lvlm.load("shapes")
    cases, results = demo.Searcher(pipe, parser, resolve(demo.DEFAULT_INTERVENTIONS), max_new_tokens=24).run([0, 1])
    table = load_synonyms()
    for c, pair in zip(cases, results):
        assert c.image_id == 3_000_001 + c.index
        for judged, result in zip((c.plain, c.treated), pair):
            assert judged.text == result.text
            words = mentions(result.text, table)  # plain word matching, no lemmatizer
            assert judged.mentioned == tuple(words)
            assert set(judged.hallucinated) == set(words) - set(c.gt)
        for method in demo.DEFAULT_INTERVENTIONS.split("+"):
            assert method in pair[1].report and method not in pair[0].report


def test_cli_demo_runs_searches_and_caches(tmp_path):
    from lvlm_hallu.cli import app

    res = CliRunner().invoke(app, ["demo", "--limit", "2", "--batch-size", "2", "-n", "16"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps at the terminal width
    assert "2 held-out test images searched" in text
    # which branch the demo takes follows from its own count of fixes: pin both directions
    fixes = int(re.search(r"keeping a present one in (\d+)", text).group(1))
    if fixes == 0:
        assert "No image found" in text and "lvlm inspect" not in text
    else:
        assert "No image found" not in text and "lvlm inspect" in text and "absent: none" in text
    assert len(list(demo.cache_dir().glob("*.json"))) == 1
    bad = CliRunner().invoke(app, ["demo", "--interventions", "none"])
    assert bad.exit_code == 2 and "name at least one" in bad.output


def test_retuned_values_are_a_new_search():
    """The cache key holds the values each method resolves to: re-shipped tuned values search again
    instead of reusing counts that another setting produced."""
    from lvlm_hallu import lvlm
    from lvlm_hallu.interventions.registry import resolve
    from lvlm_hallu.lvlm.profile import shipped_presets

    pipe = lvlm.load("shapes")
    configs = resolve("vhr+pai")
    shipped = demo.resolved_values(pipe, configs)
    assert shipped == {m: shipped_presets("shapes")[m] for m in ("vhr", "pai")}
    pipe._profile = {**pipe.profile(), "tuned_shipped": {}, "tuned": {}}  # as if nothing were tuned
    untuned = demo.resolved_values(pipe, configs)
    assert untuned["vhr"]["tuned"] is None and untuned["vhr"]["paper"] == shipped["vhr"]["paper"]
    keys = {demo.cache_key("m", configs, presets=p) for p in (shipped, untuned)}
    assert len(keys) == 2
