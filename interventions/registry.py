"""Registry of interventions: names -> config classes, presets, and request resolution.

A request names its interventions as a preset string ("none", "vhr", "vhr+var") or a list of
`{"name": ..., **params}` dicts. `resolve` turns either into a tuple of frozen config objects,
validating every parameter; anything invalid raises `InterventionError` whose message names the
problem and, for unknown names, lists the valid ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence, Union

Spec = Union[None, str, Sequence[Union[str, Mapping[str, Any]]]]


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


def _load_methods() -> None:
    """Import the method modules so that their `register` decorators run."""
    from interventions import carve, pai, var, vhr, vte  # noqa: F401


def component_factories() -> dict[str, Callable]:
    """{name: plan_component} in hook order, for the methods that act inside a batch."""
    _load_methods()
    entries = sorted(_REGISTRY.values(), key=lambda e: e.order)
    return {e.name: e.config.plan_component for e in entries if hasattr(e.config, "plan_component")}


def _build(name: str, params: Mapping[str, Any]) -> Any:
    _load_methods()
    entry = _REGISTRY.get(name)
    if entry is None:
        valid = ", ".join(["none", *names()])
        raise InterventionError(f"unknown intervention {name!r}; valid names: {valid}", param="interventions")
    fields = {f.name for f in dataclasses.fields(entry.config)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InterventionError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}",
            param=f"interventions.{name}.{unknown[0]}",
        )
    try:
        return entry.config(**params)
    except InterventionError:
        raise
    except (TypeError, ValueError) as err:
        raise InterventionError(f"{name}: {err}", param=f"interventions.{name}") from err


def resolve(spec: Spec) -> tuple[Any, ...]:
    """Validate a request's interventions and return their configs (empty tuple = none)."""
    if spec is None:
        return ()
    items: list[Any] = spec.split("+") if isinstance(spec, str) else list(spec)
    configs = []
    for item in items:
        if isinstance(item, str):
            name, params = item.strip(), {}
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


def catalog() -> list[dict[str, Any]]:
    """Names, parameter schema with defaults, and the paper of every registered intervention."""
    out = []
    for name in names():
        entry = _REGISTRY[name]
        params = []
        for f in dataclasses.fields(entry.config):
            default = f.default if f.default is not dataclasses.MISSING else None
            params.append({"name": f.name, "type": getattr(f.type, "__name__", str(f.type)),
                           "default": default, "doc": f.metadata.get("doc", "")})
        out.append({"name": name, "paper": entry.paper, "summary": entry.summary, "params": params})
    return out
