"""gradrank: ranks proportional to layer importance from gradient norms over probe steps.

I_l = N_l / sum N, where N_l is the layer's gradient norm on the frozen weights (the
rank-free G: sqrt of the sum over its candidate modules of ||G_t,m||_F^2), averaged
over T probe steps. Each layer's modules get rank r_l proportional to I_l, at least 1,
under the budget (by default the uniform baseline's total).

The alpha policy is explicit and recorded in the plan: with alpha proportional to r
(or fixed alpha / rsLoRA) the LoRA gradient at initialisation, E||dL/dB||^2 =
s^2 r / (3 d_in) ||G||^2, grows with the allocated rank by construction. Details record
that expected spread next to the rank-free one, so that part of any "gradient
amplification" can be told apart from what the data does.
"""
from __future__ import annotations

import math

from placement.assemble import new_plan
from placement.budget import allocate_ranks
from placement.plan import AdapterSpec
from placement.modules import candidate_modules
from placement.probe import batch_gradients
from placement.scorers import register_scorer


def spread(values: list[float]) -> dict:
    """max/min ratio and the share of the top 30% of items."""
    ordered = sorted(values, reverse=True)
    top = max(1, round(0.3 * len(ordered)))
    return {"max_over_min": ordered[0] / max(ordered[-1], 1e-30), "top30_share": sum(ordered[:top]) / sum(ordered)}


@register_scorer("gradrank")
def score(model, probe, budget, settings):
    cands = candidate_modules(model, settings.target_modules)
    layers = sorted({m.layer for m in cands})
    steps = min(int(settings.option("steps", 4)), probe.num_samples)
    sq = {m.name: 0.0 for m in cands}  # mean over steps of ||G_t,m||^2
    layer_norm = {l: 0.0 for l in layers}
    for part in probe.split(steps):
        g = batch_gradients(model, part, [m.name for m in cands], microbatch=settings.option("microbatch", None))
        step_sq = {n: float(t.square().sum()) for n, t in g.items()}
        del g
        for m in cands:
            sq[m.name] += step_sq[m.name] / steps
        for l in layers:
            layer_norm[l] += math.sqrt(sum(step_sq[m.name] for m in cands if m.layer == l)) / steps
    total = sum(layer_norm.values())
    importance = [layer_norm[l] / total for l in layers]
    costs = [sum(budget.unit_cost(m) for m in cands if m.layer == l) for l in layers]
    ranks = dict(zip(layers, allocate_ranks(importance, costs, budget.limit(cands, settings.rank))))
    specs = [AdapterSpec(m.name, ranks[m.layer], settings.alpha_for(ranks[m.layer]), shape=(m.d_out, m.d_in))
             for m in cands]
    # Expected ||dL/dB|| per layer at initialisation under the allocated ranks and the alpha policy.
    lora_norm = [math.sqrt(sum(settings.scale_for(ranks[l]) ** 2 * ranks[l] / (3 * m.d_in) * sq[m.name]
                               for m in cands if m.layer == l)) for l in layers]
    details = {"alpha_policy": settings.alpha_policy, "steps": steps,
               "layer_importance": dict(zip(map(str, layers), importance)),
               "layer_rank": {str(l): r for l, r in ranks.items()},
               "importance_spread": spread(importance), "lora_grad_spread": spread(lora_norm)}
    scores = {m.name: sq[m.name] for m in cands}
    return new_plan("gradrank", specs, budget, settings, cands, scores=scores, details=details)
