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

``gradrank_shuffled`` is the control that says whether the scores matter: the same
ranks over the same modules, dealt to the layers in a seeded random order.
"""
from __future__ import annotations

import math

import torch

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


def layer_gradient_norms(model, probe, cands, settings) -> tuple[dict[str, float], dict[int, float], int]:
    """Mean over probe steps of ||G_t,m||^2 per module and of the layer norm N_l, and the step count."""
    layers = sorted({m.layer for m in cands})
    steps = min(int(settings.option("steps", 4)), probe.num_samples)
    sq = {m.name: 0.0 for m in cands}
    layer_norm = {l: 0.0 for l in layers}
    for part in probe.split(steps):
        g = batch_gradients(model, part, [m.name for m in cands], microbatch=settings.option("microbatch", None))
        step_sq = {n: float(t.square().sum()) for n, t in g.items()}
        del g
        for m in cands:
            sq[m.name] += step_sq[m.name] / steps
        for l in layers:
            layer_norm[l] += math.sqrt(sum(step_sq[m.name] for m in cands if m.layer == l)) / steps
    return sq, layer_norm, steps


def ranks_plan(name, cands, ranks, sq, budget, settings, details):
    """Every candidate at its layer's rank, with the expected LoRA-gradient spread in the details."""
    layers = sorted(ranks)
    specs = [AdapterSpec(m.name, ranks[m.layer], settings.alpha_for(ranks[m.layer]), shape=(m.d_out, m.d_in))
             for m in cands]
    # Expected ||dL/dB|| per layer at initialisation under the allocated ranks and the alpha policy.
    lora_norm = [math.sqrt(sum(settings.scale_for(ranks[l]) ** 2 * ranks[l] / (3 * m.d_in) * sq[m.name]
                               for m in cands if m.layer == l)) for l in layers]
    details = dict(details, alpha_policy=settings.alpha_policy, layer_rank={str(l): r for l, r in ranks.items()},
                   lora_grad_spread=spread(lora_norm))
    return new_plan(name, specs, budget, settings, cands, scores={m.name: sq[m.name] for m in cands}, details=details)


def gradrank_ranks(model, probe, budget, settings):
    cands = candidate_modules(model, settings.target_modules)
    sq, layer_norm, steps = layer_gradient_norms(model, probe, cands, settings)
    layers = sorted(layer_norm)
    total = sum(layer_norm.values())
    importance = [layer_norm[l] / total for l in layers]
    costs = [sum(budget.unit_cost(m) for m in cands if m.layer == l) for l in layers]
    ranks = dict(zip(layers, allocate_ranks(importance, costs, budget.limit(cands, settings.rank))))
    details = {"steps": steps, "layer_importance": dict(zip(map(str, layers), importance)),
               "importance_spread": spread(importance)}
    return cands, ranks, sq, details


def shuffled_ranks(ranks: dict[int, int], seed: int) -> dict[int, int]:
    """The same ranks dealt to the same layers by a seeded random permutation."""
    layers = sorted(ranks)
    perm = torch.randperm(len(layers), generator=torch.Generator().manual_seed(seed)).tolist()
    return {layers[i]: ranks[layers[p]] for i, p in enumerate(perm)}


@register_scorer("gradrank", probe_source="grpo")
def score(model, probe, budget, settings):
    cands, ranks, sq, details = gradrank_ranks(model, probe, budget, settings)
    return ranks_plan("gradrank", cands, ranks, sq, budget, settings, details)


@register_scorer("gradrank_shuffled", probe_source="grpo")
def score_shuffled(model, probe, budget, settings):
    """The control: gradrank's layer ranks dealt to the layers in a seeded random order.

    Same modules, same multiset of ranks, same alpha policy; only the link between a
    layer's gradient norm and its rank is cut. Layers of one model cost the same per
    rank, so the budget is spent exactly as gradrank spends it.
    """
    cands, ranks, sq, details = gradrank_ranks(model, probe, budget, settings)
    layers = sorted(ranks)
    shuffled = shuffled_ranks(ranks, settings.seed)
    costs = {l: sum(budget.unit_cost(m) for m in cands if m.layer == l) for l in layers}
    if sum(shuffled[l] * costs[l] for l in layers) > budget.limit(cands, settings.rank) + 1e-9:
        raise ValueError(f"placement.scorer=gradrank_shuffled: layers of unequal cost put the shuffled ranks over "
                         f"placement.budget={budget}; use a rank budget")
    details["gradrank_layer_rank"] = {str(l): r for l, r in ranks.items()}
    details["shuffle_seed"] = settings.seed
    return ranks_plan("gradrank_shuffled", cands, shuffled, sq, budget, settings, details)
