"""The scorer registry: builtin scorers plus any a user's package declares by entry point.

A scorer is a function ``score(model, probe, budget, settings) -> PlacementPlan``
(``probe`` is None for scorers registered with ``needs_probe=False``). Register one
with ``@register_scorer("name")``; a separate package makes its scorer available to
``placement.scorer=name`` by declaring, in its pyproject.toml::

    [project.entry-points."placerl.scorers"]
    name = "my_package.my_module:score"

Entry points are read only when a name is not a builtin, so a broken plugin cannot
stop the builtins from working.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable

ENTRY_POINT_GROUP = "placerl.scorers"
BUILTIN_MODULES = ("uniform", "random", "page", "plop", "bmask", "gradrank")

Scorer = Callable[..., "PlacementPlan"]  # noqa: F821 - (model, probe, budget, settings)
_REGISTRY: dict[str, Scorer] = {}


PROBE_SOURCES = ("sft", "grpo")


def register_scorer(name: str, *, needs_probe: bool = True, probe_source: str = "sft",
                    budget_kinds: tuple[str, ...] | None = None) -> Callable[[Scorer], Scorer]:
    """``probe_source``: the regime the scorer's probe comes from when ``placement.probe_source=auto``.
    ``budget_kinds``: the ``placement.budget`` kinds it accepts (None: any, the empty uniform one
    too), declared so that a config can be checked before a model loads (:func:`check_budget`)."""
    if probe_source not in PROBE_SOURCES:
        raise ValueError(f"scorer {name!r}: probe_source={probe_source!r} is not one of {', '.join(PROBE_SOURCES)}")

    def decorate(fn: Scorer) -> Scorer:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"scorer {name!r} is already registered by {old.__module__}; pick another name")
        fn.scorer_name = name
        fn.needs_probe = needs_probe
        fn.probe_source = probe_source
        fn.budget_kinds = budget_kinds
        _REGISTRY[name] = fn
        return fn

    return decorate


def _load_builtins() -> None:
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_scorer(name: str) -> Scorer:
    """The scorer registered as ``name`` (builtin, decorated, or declared by entry point)."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name in eps:
        fn = eps[name].load()
        if name not in _REGISTRY:  # a plain function: register it under its entry-point name
            if not callable(fn):
                raise ValueError(f"entry point {name!r} in group {ENTRY_POINT_GROUP} is not callable")
            register_scorer(name, needs_probe=getattr(fn, "needs_probe", True),
                            probe_source=getattr(fn, "probe_source", "sft"),
                            budget_kinds=getattr(fn, "budget_kinds", None))(fn)
        return _REGISTRY[name]
    known = sorted(set(_REGISTRY) | set(eps))
    raise ValueError(f"placement.scorer={name!r} is not a known scorer; choose one of {', '.join(known)} "
                     f"or install a package that declares it in the {ENTRY_POINT_GROUP!r} entry-point group")


def probe_source_for(name: str, configured: str) -> str:
    """``placement.probe_source`` resolved: ``auto`` becomes the scorer's own regime."""
    return get_scorer(name).probe_source if configured == "auto" else configured


def available_scorers() -> list[str]:
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def check_budget(name: str, budget: str) -> None:
    """One line (ValueError) when scorer ``name`` is unknown or cannot spend ``placement.budget``.

    Static: it needs no model, so a run, or a sweep of runs, fails here instead of after its
    actors started and its probe rolled out.
    """
    from placement.budget import Budget

    kinds = get_scorer(name).budget_kinds
    kind = Budget.parse(budget).kind
    if kinds is not None and kind not in kinds:
        raise ValueError(f"placement.budget={budget or 'empty'} cannot be spent by placement.scorer={name}: it "
                         f"needs {' or '.join(k + '=...' for k in kinds)} (e.g. placement.budget=fraction=0.125)")
