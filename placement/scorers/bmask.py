"""bmask: a budget of k trainable entries of B with A frozen, picked by gradient sign consistency.

Every candidate gets a rank-r adapter whose A is the plan's seeded A (placement.apply.
lora_a_init) and stays frozen. At B = 0 the gradient of B on probe step t is
g_t = s G_t A^T, computed from hooks as g^T (x A^T) without forming G_t. Entries are
scored by c_ij = |sum_t sign g_t,ij| / T, ties broken by |sum_t g_t,ij|, and the global
top k become the mask: only those entries of B ever train.

``bmask_random`` is the control: k entries drawn uniformly at random (seeded).
The budget must be explicit ("params=N" or "fraction=F"): it counts entries of B.
"""
from __future__ import annotations

import torch

from placement.apply import lora_a_init
from placement.assemble import new_plan
from placement.modules import candidate_modules
from placement.plan import AdapterSpec
from placement.probe import batch_gradients
from placement.scorers import register_scorer

RESIDUAL_WRITERS = ("o_proj", "down_proj")
# A budget in entries of B: a rank budget (or the empty uniform one) says nothing about entries.
ENTRY_BUDGET_KINDS = ("params", "fraction")


def entry_budget(budget, cands, settings) -> int:
    if not budget.explicit or budget.kind == "rank":
        raise ValueError(f"placement.budget={str(budget) or 'empty'} does not say how many entries of B train; "
                         "bmask needs 'params=N' or 'fraction=F'")
    k = int(budget.limit(cands, settings.rank))
    total = settings.rank * sum(m.d_out for m in cands)
    if not 1 <= k <= total:
        raise ValueError(f"placement.budget={budget} gives {k} entries of B; it must be 1..{total} "
                         f"(rank {settings.rank} on {len(cands)} modules)")
    return k


def consistency_keys(steps: list[torch.Tensor]) -> torch.Tensor:
    """Per-entry keys that order by sign consistency first, then by |sum_t g_t|."""
    stack = torch.stack(steps)
    T = stack.shape[0]
    c = stack.sign().sum(0).abs() / T
    mag = stack.sum(0).abs()
    # c moves in steps of 1/T; a magnitude term below 1/(T+1) only breaks ties.
    return c + mag / (mag.max().clamp_min(1e-30) * (T + 1))


def masks_from_topk(keys: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    names = list(keys)
    flat = torch.cat([keys[n].reshape(-1) for n in names])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.topk(flat, k).indices] = True
    out, at = {}, 0
    for n in names:
        size = keys[n].numel()
        out[n] = chosen[at: at + size].view_as(keys[n]).cpu()
        at += size
    return out


def plan_from_masks(scorer, masks, cands, budget, settings, details):
    specs = [AdapterSpec(m.name, settings.rank, settings.alpha_for(settings.rank), mask=masks[m.name],
                         shape=(m.d_out, m.d_in)) for m in cands if masks[m.name].any()]
    counts = {m.name: int(masks[m.name].sum()) for m in cands}
    total = sum(counts.values())
    by_type: dict[str, int] = {}
    for m in cands:
        by_type[m.kind] = by_type.get(m.kind, 0) + counts[m.name]
    details = dict(details, entries=total, type_share={t: c / total for t, c in by_type.items()},
                   residual_writer_share=sum(c for t, c in by_type.items() if t in RESIDUAL_WRITERS) / total)
    return new_plan(scorer, specs, budget, settings, cands, scores={n: float(c) for n, c in counts.items()},
                    details=details)


@register_scorer("bmask", probe_source="grpo", budget_kinds=ENTRY_BUDGET_KINDS)
def score(model, probe, budget, settings):
    cands = candidate_modules(model, settings.target_modules)
    k = entry_budget(budget, cands, settings)
    steps = min(int(settings.option("steps", 4)), probe.num_samples)
    scale = settings.scale_for(settings.rank)
    a = {m.name: lora_a_init(m.name, settings.rank, m.d_in, settings.seed) for m in cands}
    grads: dict[str, list[torch.Tensor]] = {m.name: [] for m in cands}
    for part in probe.split(steps):
        g = batch_gradients(model, part, list(a), project=a, microbatch=settings.option("microbatch", None))
        for n in grads:
            grads[n].append(scale * g[n])
    keys = {n: consistency_keys(v) for n, v in grads.items()}
    masks = masks_from_topk(keys, k)
    full = sum(int((keys[n] >= 1.0).sum()) for n in keys)  # entries with the same sign on every step
    return plan_from_masks("bmask", masks, cands, budget, settings,
                           {"steps": steps, "fully_consistent_entries": full})


@register_scorer("bmask_random", needs_probe=False, budget_kinds=ENTRY_BUDGET_KINDS)
def score_random(model, probe, budget, settings):
    cands = candidate_modules(model, settings.target_modules)
    k = entry_budget(budget, cands, settings)
    gen = torch.Generator().manual_seed(settings.seed)
    keys = {m.name: torch.rand(m.d_out, settings.rank, generator=gen) for m in cands}
    return plan_from_masks("bmask_random", masks_from_topk(keys, k), cands, budget, settings, {"seed": settings.seed})
