"""Model-dependent validation of resolved intervention configs, before a request joins a batch.

`resolve` (registry.py) checks what a config can check alone: types, ranges that hold for every
model. What depends on the loaded model — a layer index below the number of layers L, a sink
dimension below the hidden size E, a VTE router present in the operator's router directory —
is checked here against `facts` (the engine's ModelFacts, or anything with `num_layers` and
`hidden_size`), so the service answers 400 instead of failing inside the engine. Every numeric
parameter must also be finite and, where a method would overflow on huge values (PAI's
s + α·|s| with α = 1e308 is inf, then NaN after the softmax), within the bound in `MAX_VALUE`.

Checks are a registry keyed by intervention name (one function per method, no if-chain); a
method without an entry only gets the generic finiteness rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

from lvlm_hallu.interventions.registry import InterventionError

# Largest magnitude accepted per (method, parameter): far above every paper's setting, far below
# what overflows fp16 attention logits or scales (65504) when multiplied by typical logits.
MAX_VALUE: dict[tuple[str, str], float] = {
    ("vhr", "alpha"): 100.0,
    ("pai", "alpha"): 100.0,
    ("pai", "gamma"): 100.0,
    ("var", "tau"): 1e4,
    ("carve", "lam"): 1.0,
}

Check = Callable[[Any, Any], None]
_CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def wrap(fn: Check) -> Check:
        _CHECKS[name] = fn
        return fn

    return wrap


def _numbers(value: Any) -> Iterable[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _numbers(v)


def check_finite(config: Any) -> None:
    """Every numeric field is finite and within MAX_VALUE (NaN compares false to every bound)."""
    name = getattr(config, "name", type(config).__name__)
    for f in dataclasses.fields(config):
        limit = MAX_VALUE.get((name, f.name))
        for x in _numbers(getattr(config, f.name)):
            if isinstance(x, float) and not math.isfinite(x):  # an int is finite (and may not fit a float)
                raise InterventionError(f"{name}: {f.name} must be a finite number, got {x!r}",
                                        param=f"interventions.{name}.{f.name}")
            if limit is not None and abs(x) > limit:
                raise InterventionError(f"{name}: {f.name}={x!r} exceeds the largest accepted value {limit:g}",
                                        param=f"interventions.{name}.{f.name}")


def _layer(name: str, param: str, value: int | None, num_layers: int) -> None:
    if value is not None and not 0 <= value < num_layers:
        raise InterventionError(f"{name}: {param}={value} is outside the model's layers 0..{num_layers - 1}",
                                param=f"interventions.{name}.{param}")


def _layers(name: str, param: str, values: Iterable[int] | None, num_layers: int) -> None:
    bad = [v for v in values or () if not 0 <= v < num_layers]
    if bad:
        raise InterventionError(f"{name}: {param} {bad} outside the model's layers 0..{num_layers - 1}",
                                param=f"interventions.{name}.{param}")


@check("vhr")
def _vhr(config: Any, facts: Any) -> None:
    _layers("vhr", "layers", config.layers, facts.num_layers)


@check("var")
def _var(config: Any, facts: Any) -> None:
    bad = [d for d in config.sink_dims or () if not 0 <= d < facts.hidden_size]
    if bad:
        raise InterventionError(f"var: sink_dims {bad} outside the model's hidden size {facts.hidden_size} "
                                f"(0..{facts.hidden_size - 1})", param="interventions.var.sink_dims")


@check("pai")
def _pai(config: Any, facts: Any) -> None:
    _layer("pai", "start_layer", config.start_layer, facts.num_layers)


@check("carve")
def _carve(config: Any, facts: Any) -> None:
    _layers("carve", "layers", config.layers, facts.num_layers)


@check("vte")
def _vte(config: Any, facts: Any) -> None:
    _layer("vte", "exit_layer", config.exit_layer, facts.num_layers + 1)  # k = L - 1 or L: never exit (neutral)
    _layer("vte", "min_layer", config.min_layer, facts.num_layers)
    if config.policy == "router":
        from lvlm_hallu.interventions.vte import router_names

        available = router_names()
        if config.router not in available:
            listing = ", ".join(available) if available else "none (the operator set no router directory)"
            raise InterventionError(f"vte: no router named {config.router!r} on this server; available: {listing}",
                                    param="interventions.vte.router")


def validate(configs: Iterable[Any], facts: Any) -> None:
    """Raise InterventionError (a 400 in the service) for anything the model cannot honour."""
    for config in configs:
        check_finite(config)
        fn = _CHECKS.get(getattr(config, "name", ""))
        if fn is not None and facts is not None:
            fn(config, facts)


__all__ = ["MAX_VALUE", "check_finite", "validate"]
