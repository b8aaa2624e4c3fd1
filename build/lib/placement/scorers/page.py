"""page: Projected Adapter Gradient Energy per module, and DomLoRA's placement at its argmax.

S_m = mean over probe samples of ||G_m,n||_F^2 (per-sample gradients of the frozen
weight, mean cross-entropy over response tokens). With A ~ Kaiming-uniform,
Var(A_ij) = 1/(3 d_in) and B = 0, dL/dB = s G A^T and
PAGE_m = E_A ||s G A^T||_F^2 = s^2 r / (3 d_in) S_m.
DomLoRA keeps the top module (top_k modules, or as many as an explicit budget pays for).

Details record the top modules' shares of total PAGE, each type's share, and each
type's top module with its share among the modules of its own type (the paper reports
74.7-79.0% for its dominant down projection among down projections).
"""
from __future__ import annotations

from placement.assemble import dense_spec, new_plan, select_units
from placement.modules import candidate_modules
from placement.probe import per_sample_sq_norms
from placement.scorers import register_scorer


def page_closed_form(sensitivity: float, d_in: int, rank: int, scale: float) -> float:
    return scale * scale * rank / (3.0 * d_in) * sensitivity


def page_shares(scores: dict[str, float], kinds: dict[str, str]) -> dict:
    """Shares of total PAGE: per type, the top module's overall and within its type."""
    total = sum(scores.values())
    by_type: dict[str, float] = {}
    for name, v in scores.items():
        by_type[kinds[name]] = by_type.get(kinds[name], 0.0) + v
    top = max(scores, key=scores.get)
    ranked = sorted(scores, key=scores.get, reverse=True)
    top_by_type = {}
    for n in ranked:
        top_by_type.setdefault(kinds[n], [n, scores[n] / total, scores[n] / by_type[kinds[n]]])
    return {"top_module": top, "top_share_total": scores[top] / total,
            "top_share_in_type": scores[top] / by_type[kinds[top]],
            "type_share": {k: v / total for k, v in by_type.items()},
            "top_by_type": top_by_type,  # type -> [module, share of total, share within the type]
            "top10": [[n, scores[n] / total] for n in ranked[:10]]}


@register_scorer("page")
def score(model, probe, budget, settings):
    cands = candidate_modules(model, settings.target_modules)
    sq = per_sample_sq_norms(model, probe, [m.name for m in cands], microbatch=settings.option("microbatch", None))
    scale = settings.scale_for(settings.rank)
    scores = {m.name: page_closed_form(float(sq[m.name].mean()), m.d_in, settings.rank, scale) for m in cands}
    order = sorted(cands, key=lambda m: scores[m.name], reverse=True)
    chosen = select_units([[m] for m in order], budget, cands, settings)
    details = page_shares(scores, {m.name: m.kind for m in cands})
    details["sensitivity"] = {m.name: float(sq[m.name].mean()) for m in cands}
    details["probe_samples"] = probe.num_samples
    return new_plan("page", [dense_spec(m, settings.rank, settings) for m in chosen], budget, settings, cands,
                    scores=scores, details=details)
