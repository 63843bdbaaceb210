"""Registry of interventions: names -> config classes, presets, and request resolution.

A request names its interventions as a preset string ("none", "vhr", "vhr+var", "vhr:tuned+pai")
or a list of `{"name": ..., "preset": ..., **params}` dicts. `resolve` turns either into a tuple of
frozen config objects, validating every parameter; anything invalid raises `InterventionError`
whose message names the problem and, for unknown names, lists the valid ones.

Model-aware parameters (VHR's α and layers, VAR's p, ρ, τ ...) stay None when the request leaves
them unset; the batch plan fills them once the model is known (interventions/defaults.py), from the
method's `preset`: "default", "paper" (published or scaled values) or "tuned" (`lvlm tune`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping, Sequence, Union

Spec = Union[None, str, Sequence[Union[str, Mapping[str, Any]]]]

PRESETS = ("default", "paper", "tuned")  # see interventions/defaults.py


class InterventionError(ValueError):
    """An intervention request that cannot be honoured (unknown name, bad parameter, conflict)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    config: type
    paper: str
    summary: str
    order: int  # hook order inside a batch plan (token exit before sink detection, ...)


_REGISTRY: dict[str, Entry] = {}


def index_tuple(values: Any, name: str, param: str) -> tuple[int, ...]:
    """A list of layer or dimension indices as a tuple of ints. A bool or a non-integral number is
    refused (InterventionError naming `interventions.<name>.<param>`), not truncated: `[true, 1.9]`
    must not run as layers (1, 1)."""
    where = f"interventions.{name}.{param}"
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, range)):
        raise InterventionError(f"{name}: {param} must be a list of integers, got {values!r}", param=where)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if bad:
        raise InterventionError(f"{name}: {param} must be a list of integers, got {bad[0]!r} in {list(values)!r}",
                                param=where)
    return tuple(int(v) for v in values)


def register(name: str, *, paper: str, summary: str, order: int = 50) -> Callable[[type], type]:
    """Class decorator: register a frozen config dataclass under `name`.

    The class may define `plan_component(plan, configs_by_request, profile)` returning the
    component that acts inside a batch plan (interventions/plan.py).
    """

    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise RuntimeError(f"intervention {name!r} registered twice")
        _REGISTRY[name] = Entry(name, cls, paper, summary, order)
        cls.name = name
        return cls

    return wrap


def names() -> list[str]:
    _load_methods()
    return sorted(_REGISTRY)


def entry(name: str) -> Entry:
    """The registry entry of `name`; an unknown name lists the valid ones."""
    _load_methods()
    found = _REGISTRY.get(name)
    if found is None:
        valid = ", ".join(["none", *names()])
        raise InterventionError(f"unknown intervention {name!r}; valid names: {valid}", param="interventions")
    return found


def _load_methods() -> None:
    """Import the method modules so that their `register` decorators run."""
    from lvlm_hallu.interventions import carve, pai, var, vhr, vte  # noqa: F401


def component_factories() -> dict[str, Callable]:
    """{name: plan_component} in hook order, for the methods that act inside a batch."""
    _load_methods()
    entries = sorted(_REGISTRY.values(), key=lambda e: e.order)
    return {e.name: e.config.plan_component for e in entries if hasattr(e.config, "plan_component")}


def _build(name: str, params: Mapping[str, Any]) -> Any:
    found = entry(name)
    preset = params.get("preset", "default")
    if preset not in PRESETS:
        raise InterventionError(f"{name}: unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}",
                                param=f"interventions.{name}.preset")
    fields = {f.name for f in dataclasses.fields(found.config)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InterventionError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}",
            param=f"interventions.{name}.{unknown[0]}",
        )
    try:
        return found.config(**params)
    except InterventionError:
        raise
    except (TypeError, ValueError) as err:
        raise InterventionError(f"{name}: {err}", param=f"interventions.{name}") from err


def resolve(spec: Spec) -> tuple[Any, ...]:
    """Validate a request's interventions and return their configs (empty tuple = none)."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        items: list[Any] = spec.split("+")
    elif isinstance(spec, Mapping):  # one object, {"name": "vhr", "alpha": 1.5}; list() would take its keys
        items = [spec]
    else:
        items = list(spec)
    configs = []
    for item in items:
        if isinstance(item, str):  # "vhr" or "vhr:tuned"
            name, _, preset = item.strip().partition(":")
            params = {"preset": preset.strip()} if preset else {}
        elif isinstance(item, Mapping):
            params = dict(item)
            name = params.pop("name", None)
            if not isinstance(name, str):
                raise InterventionError("each intervention object needs a string 'name'", param="interventions")
        else:
            raise InterventionError(f"an intervention must be a name or an object, got {type(item).__name__}")
        if name in ("none", ""):
            continue
        configs.append(_build(name, params))
    seen = [c.name for c in configs]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise InterventionError(f"intervention(s) requested twice: {', '.join(dupes)}", param="interventions")
    for config in configs:
        check = getattr(config, "check_compatible", None)
        if check is not None:
            check(configs)
    return tuple(configs)


def catalog(facts: Any = None, profile: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Names, parameter schema with defaults, presets and the paper of every registered intervention.

    A parameter's "default" is the paper's model-independent constant (VHR alpha 2.0); model-aware
    ones (layers, tau) say their rule in "doc". With the model's `facts` (and profile), "presets"
    holds the values each preset resolves to on that model ("tuned": None when it has none).
    """
    from lvlm_hallu.interventions import defaults

    backbone = defaults.Backbone.of(facts, profile) if facts is not None else None
    out = []
    for name in names():
        found = _REGISTRY[name]
        paper = getattr(found.config, "PAPER", {})
        params = []
        for f in dataclasses.fields(found.config):
            default = f.default if f.default is not dataclasses.MISSING else None
            if default is None:
                default = paper.get(f.name)
            params.append({"name": f.name, "type": getattr(f.type, "__name__", str(f.type)),
                           "default": default, "doc": f.metadata.get("doc", "")})
        info = {"name": name, "paper": found.paper, "summary": found.summary, "params": params,
                "presets": list(PRESETS)}
        if backbone is not None and hasattr(found.config, "paper_defaults"):
            info["preset_values"] = defaults.preset_values(name, backbone, profile or {})
        out.append(info)
    return out
