"""random: modules drawn at random (seeded), at the base rank, under the same budget (the control).

It spends a budget exactly as page does (top_k modules, or as many as an explicit
budget pays for), so a page plan and a random plan with the same settings differ
only in which modules were chosen.
"""
from __future__ import annotations

import random as _random

from placement.assemble import dense_spec, new_plan, select_units
from placement.modules import candidate_modules
from placement.scorers import register_scorer


@register_scorer("random", needs_probe=False)
def score(model, probe, budget, settings):
    cands = candidate_modules(model, settings.target_modules)
    order = list(cands)
    _random.Random(settings.seed).shuffle(order)
    chosen = select_units([[m] for m in order], budget, cands, settings)
    return new_plan("random", [dense_spec(m, settings.rank, settings) for m in chosen], budget, settings, cands,
                    details={"seed": settings.seed})
