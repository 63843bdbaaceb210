"""Training-free hallucination interventions (one file per method) and their per-batch plan."""

from lvlm_hallu.interventions.registry import InterventionError, catalog, names, register, resolve

__all__ = ["InterventionError", "catalog", "names", "register", "resolve"]
