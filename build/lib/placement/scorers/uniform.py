"""uniform: every candidate projection of every layer at one rank (the LoRA default, the baseline).

With the empty budget the rank is ``placement.rank``; with an explicit budget it is the
largest rank that the budget pays for on every candidate.
"""
from __future__ import annotations

import math

from placement.assemble import dense_spec, new_plan
from placement.modules import candidate_modules
from placement.scorers import register_scorer


@register_scorer("uniform", needs_probe=False)
def score(model, probe, budget, settings):
    cands = candidate_modules(model, settings.target_modules)
    rank = settings.rank
    if budget.explicit:
        per_rank = sum(budget.unit_cost(m) for m in cands)
        rank = math.floor(budget.limit(cands, settings.rank) / per_rank + 1e-9)
        if rank < 1:
            raise ValueError(f"placement.budget={budget} is below rank 1 on all {len(cands)} modules "
                             f"({per_rank} units); raise the budget or use a selecting scorer")
    return new_plan("uniform", [dense_spec(m, rank, settings) for m in cands], budget, settings, cands,
                    details={"rank": rank})
