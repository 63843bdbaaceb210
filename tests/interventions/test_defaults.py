"""Model-aware defaults: the scaled formulas, value sources, presets, and tuned presets end to end."""

import base64
import io
import math

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import InterventionError, catalog, resolve
from lvlm_hallu.interventions.carve import default_layers as carve_layers
from lvlm_hallu.interventions.defaults import Backbone, apply, preset_values, sink_threshold
from lvlm_hallu.interventions.vhr import default_layers as vhr_layers
from lvlm_hallu.interventions.vhr import default_layers as vhr_layers
from lvlm_hallu.lvlm import profile as profiles

LLAVA_7B = Backbone("llama", 4096, 32)
NARROW = Backbone("llama", 256, 8)  # an unpublished backbone: everything model-aware is scaled


def test_vhr_band_scales_with_depth():
    assert vhr_layers(32) == (1, *range(18, 32))  # {1} ∪ last 14
    assert vhr_layers(8) == (1, 4, 5, 6, 7)  # round(14·8/32) = round(3.5) = 4 (halves up)
    assert vhr_layers(40) == (1, *range(22, 40))  # round(17.5) = 18
    assert vhr_layers(24) == (1, *range(13, 24))  # round(10.5) = 11
    for L in range(2, 48):
        k = max(1, math.floor(14 * L / 32 + 0.5))
        assert vhr_layers(L) == tuple(sorted({1, *range(L - k, L)}))


def test_var_threshold_scales_with_width():
    assert sink_threshold(LLAVA_7B) == (20.0, "published")
    assert sink_threshold(Backbone("llama", 5120, 40)) == (20.0, "published")  # published keeps 20
    assert sink_threshold(Backbone("mistral", 4096, 32)) == (20.0, "scaled")  # same value, by the rule
    assert sink_threshold(NARROW) == (5.0, "scaled")  # 20·√(256/4096)
    tau, _ = sink_threshold(Backbone(None, 192, 4))
    assert tau == pytest.approx(20 * math.sqrt(192 / 4096), abs=1e-4) and tau < math.sqrt(192)


def test_carve_and_pai_and_vte_rules():
    assert carve_layers(32) == tuple(range(20, 26)) and carve_layers(28) == tuple(range(20, 26))
    assert carve_layers(8) == (5, 6)  # round(20·8/32) = 5 .. round(25·8/32) = round(6.25) = 6
    (pai,) = resolve("pai")
    resolved, info = apply(pai, NARROW, {})
    assert (resolved.alpha, resolved.start_layer, resolved.contrast, resolved.gamma) == (0.2, 2, False, 1.1)
    assert set(info["sources"].values()) == {"published"}
    (vte,) = resolve("vte")
    resolved, info = apply(vte, NARROW, {})
    assert resolved.exit_layer == 4 and info["sources"] == {"exit_layer": "scaled"}


def test_sources_published_scaled_request():
    (vhr,) = resolve("vhr")
    on_7b, info = apply(vhr, LLAVA_7B, {})
    assert on_7b.alpha == 2.0 and on_7b.layers == (1, *range(18, 32))
    assert info == {"preset": "default", "sources": {"alpha": "published", "layers": "published",
                                                     "positions": "published"}}
    assert on_7b.positions == "all"  # the paper's o <- alpha*o names no position: every one
    narrow, info = apply(vhr, NARROW, {})
    assert narrow.layers == (1, 4, 5, 6, 7) and info["sources"]["layers"] == "scaled"
    (asked,) = resolve([{"name": "var", "tau": 3.0}])
    resolved, info = apply(asked, NARROW, {})
    assert resolved.tau == 3.0 and resolved.p == 0.4
    assert info["sources"] == {"p": "published", "rho": "published", "tau": "request",
                               "require_visual_sink": "published"}
    assert resolved.require_visual_sink is True  # the official code's rule unless asked or tuned


def test_vhr_prompt_positions_are_tunable():
    profile = {"tuned": {"vhr": {"params": {"alpha": 1.5, "layers": [2, 3, 4], "positions": "last"}}}}
    resolved, info = apply(resolve("vhr:tuned")[0], NARROW, profile)
    assert (resolved.alpha, resolved.layers, resolved.positions) == (1.5, (2, 3, 4), "last")
    assert info["sources"]["positions"] == "tuned"
    assert apply(resolve("vhr:paper")[0], NARROW, profile)[0].positions == "all"
    from lvlm_hallu.interventions import catalog

    (vhr,) = [i for i in catalog() if i["name"] == "vhr"]
    assert next(p["default"] for p in vhr["params"] if p["name"] == "positions") == "all"  # /v1/interventions
    (asked,) = resolve([{"name": "vhr", "preset": "tuned", "positions": "all"}])
    assert apply(asked, NARROW, profile)[0].positions == "all"


def test_var_rule_for_layers_without_a_visual_sink_is_tunable():
    profile = {"tuned": {"var": {"params": {"p": 0.8, "require_visual_sink": False}}}}
    resolved, info = apply(resolve("var:tuned")[0], NARROW, profile)
    assert (resolved.p, resolved.require_visual_sink) == (0.8, False)
    assert info["sources"]["require_visual_sink"] == "tuned" and info["sources"]["tau"] == "scaled"
    assert apply(resolve("var:paper")[0], NARROW, profile)[0].require_visual_sink is True
    (asked,) = resolve([{"name": "var", "preset": "tuned", "require_visual_sink": True}])
    resolved, info = apply(asked, NARROW, profile)
    assert resolved.require_visual_sink is True and info["sources"]["require_visual_sink"] == "request"
    with pytest.raises(InterventionError, match="require_visual_sink must be true or false"):
        resolve([{"name": "var", "require_visual_sink": "no"}])


def test_presets_pick_tuned_values():
    profile = {"model_id": "m", "tuned": {"vhr": {"params": {"alpha": 1.7, "layers": [1, 7]}}},
               "tuned_shipped": {"pai": {"params": {"alpha": 0.6, "contrast": True, "gamma": 2.0}, "shipped": True}}}
    (vhr,) = resolve("vhr:tuned")
    resolved, info = apply(vhr, NARROW, profile)
    assert (resolved.alpha, resolved.layers) == (1.7, (1, 7)) and info["sources"] == {"alpha": "tuned", "layers": "tuned",
                                                                                     "positions": "published"}
    (plain,) = resolve("vhr")  # a user's own search is used only on request
    assert apply(plain, NARROW, profile)[0].alpha == 2.0
    (pai,) = resolve("pai")  # shipped values are the default
    resolved, info = apply(pai, NARROW, profile)
    assert (resolved.alpha, resolved.contrast, resolved.gamma) == (0.6, True, 2.0)
    assert info["sources"]["gamma"] == "tuned" and info["sources"]["start_layer"] == "published"
    (paper,) = resolve([{"name": "pai", "preset": "paper"}])
    assert apply(paper, NARROW, profile)[0].gamma == 1.1 and apply(paper, NARROW, profile)[0].alpha == 0.2
    (partial,) = resolve([{"name": "vhr", "preset": "tuned", "alpha": 3.0}])
    resolved, info = apply(partial, NARROW, profile)
    assert (resolved.alpha, resolved.layers) == (3.0, (1, 7)) and info["sources"]["alpha"] == "request"


def test_preset_values_of_a_search_without_a_feasible_setting():
    profile = {"tuned_shipped": {"vte": {"params": None, "shipped": True}}}  # VTE: no exit within the bound
    assert preset_values("vte", NARROW, profile) == {"paper": {"exit_layer": 4}, "tuned": None}


def test_bad_presets():
    with pytest.raises(InterventionError, match="no tuned values.*lvlm tune") as err:
        apply(resolve("var:tuned")[0], NARROW, {"model_id": "m"})
    assert err.value.param == "interventions.var.preset"
    with pytest.raises(InterventionError, match="unknown preset 'best'.*default, paper, tuned"):
        resolve("vhr:best")
    with pytest.raises(InterventionError, match="carve has no tuned values"):
        resolve([{"name": "carve", "preset": "tuned"}])
    with pytest.raises(InterventionError, match="no setting within its constraints"):
        apply(resolve("vhr:tuned")[0], NARROW, {"model_id": "m", "tuned": {"vhr": {"params": None}}})
    with pytest.raises(InterventionError, match="invalid tuned value"):
        apply(resolve("vhr:tuned")[0], NARROW, {"tuned": {"vhr": {"params": {"alpha": -1}}}})


def test_catalog_shows_presets_and_paper_defaults():
    vhr = next(c for c in catalog() if c["name"] == "vhr")
    assert vhr["presets"] == ["default", "paper", "tuned"]
    assert next(p for p in vhr["params"] if p["name"] == "alpha")["default"] == 2.0
    facts = type("Facts", (), {"num_layers": 8, "hidden_size": 256})()
    per_model = next(c for c in catalog(facts, {"tuned": {"vhr": {"params": {"alpha": 1.5}}}}) if c["name"] == "vhr")
    assert per_model["preset_values"] == {"paper": {"alpha": 2.0, "layers": (1, 4, 5, 6, 7), "positions": "all"},
                                        "tuned": {"alpha": 1.5}}


# -- end to end: the profile, a pipeline, and the service --------------------------------------------
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lvlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LVLM_CACHE", str(cache))
        yield lvlm.load("tiny-llava")


def _generate(pipe, spec):
    (res,) = pipe.generate([lvlm.Request("Describe it.", Image.new("RGB", (40, 30), "red"), max_new_tokens=3,
                                         interventions=resolve(spec))])
    return res


def test_tuned_preset_round_trip_through_profile_and_http(pipe):
    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig

    L = pipe.facts.num_layers
    client = TestClient(build_app(Service(pipe, ServeConfig(model="tiny-llava", api_key="k"))))
    headers = {"Authorization": "Bearer k"}

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="PNG")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}

    def chat(spec):
        content = [image, {"type": "text", "text": "Describe it."}]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "interventions": spec}
        return client.post("/v1/chat/completions", headers=headers, json=body)

    missing = chat("vhr:tuned")  # no tuned values yet: 400 with a clear message
    assert missing.status_code == 400, missing.text
    error = missing.json()["error"]
    assert "no tuned values" in error["message"] and error["param"] == "interventions.vhr.preset"
    with pytest.raises(InterventionError, match="no tuned values"):
        _generate(pipe, "vhr:tuned")

    profiles.save_tuned(pipe, {"vhr": {"params": {"alpha": 1.7, "layers": [1, L - 1]}}})
    res = _generate(pipe, "vhr:tuned")
    assert res.report["vhr"]["alpha"] == 1.7 and res.report["vhr"]["layers"] == [1, L - 1]
    assert res.report["vhr"]["preset"] == "tuned" and res.report["vhr"]["sources"] == {"alpha": "tuned", "layers": "tuned",
                                                                                               "positions": "published"}
    default = _generate(pipe, "vhr")  # the user's own search is not the default
    assert default.report["vhr"]["alpha"] == 2.0 and default.report["vhr"]["sources"]["alpha"] == "published"
    ok = chat([{"name": "vhr", "preset": "tuned"}])
    assert ok.status_code == 200, ok.text
    details = ok.json()["intervention_report"]["details"]["vhr"]
    assert details["alpha"] == 1.7 and details["sources"]["alpha"] == "tuned"
    listed = client.get("/v1/interventions", headers=headers).json()["data"]
    vhr = next(i for i in listed if i["name"] == "vhr")
    assert any(p["name"] == "preset" and "tuned" in p["doc"] for p in vhr["params"])
    assert vhr["presets"] == ["default", "paper", "tuned"]
    assert vhr["preset_values"] == {"paper": {"alpha": 2.0, "layers": list(vhr_layers(L)), "positions": "all"},
                                    "tuned": {"alpha": 1.7, "layers": [1, L - 1]}}
    var = next(i for i in listed if i["name"] == "var")
    assert var["preset_values"]["tuned"] is None and var["preset_values"]["paper"]["p"] == 0.4


def test_describe_fills_values_for_fingerprints():
    facts = type("Facts", (), {"num_layers": 8, "hidden_size": 256})()
    from lvlm_hallu.interventions.defaults import describe

    (vhr,) = describe(resolve("vhr:paper"), facts, {})
    assert vhr["alpha"] == 2.0 and vhr["layers"] == (1, 4, 5, 6, 7) and vhr["preset"] == "paper"
    assert vhr["sources"] == {"alpha": "published", "layers": "scaled", "positions": "published"}
