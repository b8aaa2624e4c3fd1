"""page and page_topk: Projected Adapter Gradient Energy per module, and where adapters go by it.

S_m = mean over probe samples of ||G_m,n||_F^2 (per-sample gradients of the frozen
weight, mean cross-entropy over response tokens). With A ~ Kaiming-uniform,
Var(A_ij) = 1/(3 d_in) and B = 0, dL/dB = s G A^T and
PAGE_m = E_A ||s G A^T||_F^2 = s^2 r / (3 d_in) S_m.

Two placements read the same scores:
- ``page`` is DomLoRA (paper 003, section 3.3): one adapter at the dominant FFN
  down-projection, the down_proj with the highest PAGE, whatever other module type
  may hold the global maximum (on SmolLM2 that is a v_proj). top_k (or an explicit
  budget) keeps more down projections in PAGE order, never another type.
- ``page_topk`` keeps the global top modules by PAGE, of any type (top_k of them, or
  as many as an explicit budget pays for).

Details record the top modules' shares of total PAGE, each type's share, and each
type's top module with its share among the modules of its own type (the paper reports
74.7-79.0% for its dominant down projection among down projections).
"""
from __future__ import annotations

from placement.assemble import dense_spec, new_plan, select_units
from placement.modules import ModuleInfo, candidate_modules
from placement.probe import per_sample_sq_norms
from placement.scorers import register_scorer

DOMINANT_TYPE = "down_proj"


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


def page_scores(model, probe, settings) -> tuple[list[ModuleInfo], dict[str, float], dict]:
    """Candidates, PAGE per candidate, and the details both placements record."""
    cands = candidate_modules(model, settings.target_modules)
    sq = per_sample_sq_norms(model, probe, [m.name for m in cands], microbatch=settings.option("microbatch", None))
    scale = settings.scale_for(settings.rank)
    scores = {m.name: page_closed_form(float(sq[m.name].mean()), m.d_in, settings.rank, scale) for m in cands}
    details = page_shares(scores, {m.name: m.kind for m in cands})
    details["sensitivity"] = {m.name: float(sq[m.name].mean()) for m in cands}
    details["probe_samples"] = probe.num_samples
    return cands, scores, details


def dominant_down_projections(cands: list[ModuleInfo], scores: dict[str, float]) -> list[ModuleInfo]:
    """The down projections among ``cands``, highest PAGE first (DomLoRA's candidates)."""
    downs = [m for m in cands if m.kind == DOMINANT_TYPE]
    if not downs:
        raise ValueError(f"placement.scorer=page (DomLoRA) places its adapter at the dominant {DOMINANT_TYPE}; "
                         f"add {DOMINANT_TYPE} to placement.target_modules, or use placement.scorer=page_topk "
                         "for the global top modules by PAGE")
    return sorted(downs, key=lambda m: scores[m.name], reverse=True)


def _plan(name, chosen, budget, settings, cands, scores, details):
    return new_plan(name, [dense_spec(m, settings.rank, settings) for m in chosen], budget, settings, cands,
                    scores=scores, details=details)


@register_scorer("page")
def score(model, probe, budget, settings):
    cands, scores, details = page_scores(model, probe, settings)
    order = dominant_down_projections(cands, scores)
    chosen = select_units([[m] for m in order], budget, cands, settings)
    details["selection"] = f"dominant {DOMINANT_TYPE} (DomLoRA)"
    details["dominant_module"] = order[0].name
    details["dominant_is_global_top"] = order[0].name == details["top_module"]
    return _plan("page", chosen, budget, settings, cands, scores, details)


@register_scorer("page_topk")
def score_topk(model, probe, budget, settings):
    cands, scores, details = page_scores(model, probe, settings)
    order = sorted(cands, key=lambda m: scores[m.name], reverse=True)
    chosen = select_units([[m] for m in order], budget, cands, settings)
    details["selection"] = "global top modules by PAGE, any type"
    return _plan("page_topk", chosen, budget, settings, cands, scores, details)
