"""Turning a scorer's preference order into a plan that respects the budget.

Shared by the scorers that select rather than allocate (page, plop, random): they
rank "units" (a module, or all modules of one type) and keep the best ones at the
base rank. With the uniform (empty) budget they keep ``top_k`` units; with an
explicit budget they keep whole units in order for as long as the next one fits.

Left out: fractional units (half a type); an allocating scorer (gradrank) uses
``placement.budget.allocate_ranks`` instead.
"""
from __future__ import annotations

from placement.budget import Budget, uniform_parameters
from placement.modules import ModuleInfo
from placement.plan import AdapterSpec, PlacementPlan
from placement.settings import ScorerSettings


def dense_spec(m: ModuleInfo, rank: int, settings: ScorerSettings) -> AdapterSpec:
    return AdapterSpec(m.name, rank, settings.alpha_for(rank), shape=(m.d_out, m.d_in))


def select_units(units: list[list[ModuleInfo]], budget: Budget, candidates: list[ModuleInfo],
                 settings: ScorerSettings) -> list[ModuleInfo]:
    """The modules of the leading units: top_k of them, or as many as an explicit budget pays for."""
    if not units:
        raise ValueError("nothing to select: the scorer ranked no module")
    if not budget.explicit:
        return [m for unit in units[: settings.top_k] for m in unit]
    limit = budget.limit(candidates, settings.rank)
    chosen: list[ModuleInfo] = []
    spent = 0.0
    for unit in units:
        cost = sum(settings.rank * budget.unit_cost(m) for m in unit)
        if spent + cost > limit + 1e-9:
            break
        chosen += unit
        spent += cost
    if not chosen:
        first = sum(settings.rank * budget.unit_cost(m) for m in units[0])
        raise ValueError(f"placement.budget={budget} cannot pay for one unit ({first:g} needed at rank "
                         f"{settings.rank}); raise the budget or lower placement.rank")
    return chosen


def new_plan(scorer: str, specs: list[AdapterSpec], budget: Budget, settings: ScorerSettings,
             candidates: list[ModuleInfo], scores: dict[str, float] | None = None,
             details: dict | None = None) -> PlacementPlan:
    return PlacementPlan(adapters=specs, scorer=scorer, budget=str(budget), alpha_policy=settings.alpha_policy,
                         dropout=settings.dropout, seed=settings.seed, scores=dict(scores or {}),
                         details=dict(details or {}),
                         baseline_params=uniform_parameters(candidates, settings.rank))
