"""Interventions through the model name, for OpenAI clients that can only set `model`.

lmms-eval's OpenAI backend, LangChain or a browser extension send `model` and messages but no
extra fields, so they cannot reach our `interventions` field. They can name a configuration in
the model instead: the served model's id, a colon, then an intervention spec exactly as the CLI
and the `interventions` field write it (interventions/registry.py: NAME[:PRESET] joined by "+"):

    "shapes:vhr"                         -> model "shapes", interventions "vhr"
    "shapes:vhr+pai"                     -> model "shapes", interventions "vhr+pai"
    "llava-hf/llava-1.5-7b-hf:vhr:tuned" -> model "llava-hf/llava-1.5-7b-hf", interventions "vhr:tuned"

The first colon separates (hub ids have none; a preset's colon belongs to the spec). A name
that is itself one of the served ids is taken whole, so a local checkpoint whose path holds a
colon is still addressable. The spec is resolved by the registry's own parser, so it means what
the same string means in `interventions`; a spec that does not parse is a 400 naming the grammar.

Both given: the `interventions` field and a spec in the model name must agree. When they
resolve to the same configurations (every parameter equal) the request runs; otherwise it is a
400 (`conflicting_interventions`) naming both, because silently preferring either one would run
a configuration that one of the two settings did not ask for.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from lvlm_hallu.interventions import InterventionError, resolve
from lvlm_hallu.serve.errors import BadRequest, NotFound

GRAMMAR = "MODEL:NAME[:PRESET][+NAME[:PRESET]...], e.g. shapes:vhr, shapes:vhr+pai, shapes:vhr:tuned"


@dataclass(frozen=True)
class ModelName:
    """A request's `model` split into the served model's id and the intervention spec after it."""

    requested: str | None  # the name as the client sent it (echoed in the answer's `model`)
    model: str | None  # the served model's id or alias; None when the request named no model
    spec: str | None  # the intervention spec after the first colon; None when there was none


def split(name: str | None, served: Collection[str] = ()) -> ModelName:
    """Split `name` at its first colon, unless the whole name is one of the `served` ids."""
    if name is None or name in served or ":" not in name:
        return ModelName(name, name, None)
    model, _, spec = name.partition(":")
    return ModelName(name, model, spec)


def parse(name: str | None, served: Collection[str]) -> ModelName:
    """`split`, then check the model part is served (404) and the spec is not empty (400)."""
    found = split(name, served)
    if found.model is not None and found.model not in served:
        available = ", ".join(sorted(served))
        raise NotFound(f"model {found.model!r} is not served here; available: {available} (optionally followed by "
                       f":<interventions>: {GRAMMAR})", param="model", code="model_not_found")
    if found.spec is not None and not found.spec.strip():
        raise BadRequest(f"model {name!r}: no interventions after the colon; expected {GRAMMAR}", param="model",
                         code="invalid_intervention")
    return found


def resolve_spec(found: ModelName) -> tuple[Any, ...] | None:
    """The configurations the model name's spec names (None: it names none), resolved by the registry."""
    if found.spec is None:
        return None
    try:
        return resolve(found.spec)
    except InterventionError as err:
        raise BadRequest(f"model {found.requested!r}: the part after the first colon is not an intervention spec "
                         f"({err}); expected {GRAMMAR}", param="model", code="invalid_intervention") from err


def interventions(found: ModelName, field: Any) -> tuple[Any, ...]:
    """The request's configurations from the model name and the `interventions` field (plain data).

    Either alone decides; both must resolve to the same configurations, else a 400."""
    named = resolve_spec(found)
    if field is None:
        return named or ()
    given = resolve(field)  # InterventionError -> 400 naming `interventions` (serve/errors.py)
    if named is not None and named != given:
        raise BadRequest(f"model {found.requested!r} names interventions {found.spec!r} but the interventions field "
                         f"asks for {field!r}; give one of them (or the same configuration in both)",
                         param="interventions", code="conflicting_interventions")
    return given
