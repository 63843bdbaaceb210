"""serve/model_names.py: the model id, a colon, an intervention spec; resolved by the registry's
own parser (so it equals the `interventions` field), bad specs are 400s naming the grammar, and
the field and the name must agree when both are given."""

from __future__ import annotations

import pytest

from lvlm_hallu.interventions import resolve
from lvlm_hallu.serve.errors import BadRequest, NotFound
from lvlm_hallu.serve.model_names import GRAMMAR, ModelName, interventions, parse, resolve_spec, split

SERVED = frozenset({"shapes"})
HUB = "llava-hf/llava-1.5-7b-hf"


@pytest.mark.parametrize(("name", "model", "spec"), [
    ("shapes", "shapes", None),
    ("shapes:vhr", "shapes", "vhr"),
    ("shapes:vhr+pai", "shapes", "vhr+pai"),
    ("shapes:vhr:tuned+pai", "shapes", "vhr:tuned+pai"),
    (f"{HUB}:vhr:tuned", HUB, "vhr:tuned"),  # the first colon separates; the preset's stays in the spec
    (HUB, HUB, None),
    (None, None, None),
])
def test_split_at_the_first_colon(name, model, spec):
    assert split(name) == ModelName(name, model, spec)


def test_a_served_id_with_a_colon_is_taken_whole():
    served = {"/ckpt/run:3"}
    assert split("/ckpt/run:3", served) == ModelName("/ckpt/run:3", "/ckpt/run:3", None)
    assert split("/ckpt/run:3:vhr", served).model == "/ckpt/run"  # only an exact served id is kept whole


@pytest.mark.parametrize("spec", ["vhr", "vhr+pai", "vhr:tuned", "vhr:paper+var", "pai+vhr:default", "none", "carve"])
def test_the_name_resolves_exactly_as_the_interventions_field(spec):
    found = parse(f"shapes:{spec}", SERVED)
    assert resolve_spec(found) == resolve(spec)
    assert interventions(found, None) == resolve(spec)
    assert interventions(parse("shapes", SERVED), spec) == resolve(spec)


def test_a_name_without_a_spec_names_no_interventions():
    assert resolve_spec(parse("shapes", SERVED)) is None
    assert interventions(parse("shapes", SERVED), None) == ()
    assert interventions(parse(None, SERVED), None) == ()


@pytest.mark.parametrize(("name", "words"), [
    ("shapes:vhx", "unknown intervention 'vhx'"),
    ("shapes:vhr:bogus", "unknown preset 'bogus'"),
    ("shapes:vhr+vhr", "requested twice"),
    ("shapes:vhr+", None),  # "" after "+" is skipped by the registry: it runs as "vhr"
])
def test_a_spec_that_does_not_parse_is_a_400_naming_the_grammar(name, words):
    found = parse(name, SERVED)
    if words is None:
        assert resolve_spec(found) == resolve("vhr")
        return
    with pytest.raises(BadRequest) as err:
        resolve_spec(found)
    assert err.value.status == 400 and err.value.param == "model" and err.value.code == "invalid_intervention"
    assert words in err.value.message and GRAMMAR in err.value.message and repr(name) in err.value.message


def test_an_empty_spec_is_a_400():
    with pytest.raises(BadRequest) as err:
        parse("shapes:", SERVED)
    assert err.value.param == "model" and GRAMMAR in err.value.message


def test_an_unknown_model_is_a_404_before_its_spec_is_read():
    with pytest.raises(NotFound) as err:
        parse("gpt-4o:vhx", SERVED)
    assert err.value.status == 404 and err.value.code == "model_not_found" and "'gpt-4o'" in err.value.message
    assert "available: shapes" in err.value.message


@pytest.mark.parametrize("field", ["vhr", ["vhr"], [{"name": "vhr"}], "vhr:default"])
def test_the_field_and_the_name_may_say_the_same_thing(field):
    assert interventions(parse("shapes:vhr", SERVED), field) == resolve("vhr")


@pytest.mark.parametrize("field", ["vhr+pai", "none", [{"name": "vhr", "alpha": 1.5}], "vhr:paper", "pai"])
def test_the_field_and_the_name_in_conflict_are_a_400(field):
    with pytest.raises(BadRequest) as err:
        interventions(parse("shapes:vhr", SERVED), field)
    assert err.value.status == 400 and err.value.code == "conflicting_interventions"
    assert err.value.param == "interventions" and "'vhr'" in err.value.message


def test_a_bad_field_is_still_the_fields_error():
    from lvlm_hallu.interventions import InterventionError

    with pytest.raises(InterventionError) as err:
        interventions(parse("shapes", SERVED), "vhx")
    assert "unknown intervention 'vhx'" in str(err.value)
