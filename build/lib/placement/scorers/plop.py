"""plop: PLoP's neural-feature-norm alignment per module type, from forward hooks only.

For a module with weight W and input z (one vector per token), W_bar = W / RMS(W),
z_hat = z / ||z|| and xi random unit vectors:
NFN = mean_tokens ||W_bar z_hat|| / mean_xi ||W_bar xi||.
A low NFN means the pretrained weight is poorly aligned with the task's features, so an
adapter there has the most to add. Type NFN is the mean over layers; plop places
adapters on the lowest-NFN types on all layers (top_k types, or as many as an explicit
budget pays for).
"""
from __future__ import annotations

import torch

from placement.assemble import dense_spec, new_plan, select_units
from placement.modules import candidate_modules, kinds_in_order
from placement.probe import real_tokens, run_hooks
from placement.scorers import register_scorer

NUM_XI = 256


def random_unit_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7919 + dim)
    xi = torch.randn(count, dim, generator=gen)
    return xi / xi.norm(dim=1, keepdim=True)


def nfn_from_sums(weight: torch.Tensor, ratio_sum: float, tokens: int, xi: torch.Tensor) -> float:
    """NFN given sum_t ||W z_t|| / ||z_t|| over ``tokens`` tokens (W un-normalised)."""
    w = weight.detach().float()
    rms = w.square().mean().sqrt()
    num = ratio_sum / tokens / float(rms)
    den = float((xi.to(w.device) @ (w / rms).T).norm(dim=1).mean())
    return num / den


def module_nfn(model, probe, cands, seed: int, microbatch: int | None = None) -> dict[str, float]:
    mods = dict(model.named_modules())
    sums: dict[str, float] = {}
    count: dict[str, int] = {}

    def on_forward(name, x, y, mb):
        z, wz = real_tokens(x, y, mb)
        bias = mods[name].bias
        if bias is not None:
            wz = wz - bias.float()
        zn = z.norm(dim=1)
        ok = zn > 0  # z_hat is undefined for a zero input (e.g. a zeroed padding embedding)
        ratio = wz[ok].norm(dim=1) / zn[ok]
        sums[name] = sums.get(name, 0.0) + float(ratio.sum())
        count[name] = count.get(name, 0) + int(ok.sum())

    run_hooks(model, probe, [m.name for m in cands], on_forward=on_forward, microbatch=microbatch)
    return {m.name: nfn_from_sums(mods[m.name].weight, sums[m.name], count[m.name],
                                  random_unit_vectors(NUM_XI, m.d_in, seed)) for m in cands}


@register_scorer("plop")
def score(model, probe, budget, settings):
    cands = candidate_modules(model, settings.target_modules)
    scores = module_nfn(model, probe, cands, settings.seed, settings.option("microbatch", None))
    kinds = kinds_in_order(cands)
    type_nfn = {k: sum(scores[m.name] for m in cands if m.kind == k) / sum(1 for m in cands if m.kind == k)
                for k in kinds}
    ranking = sorted(kinds, key=type_nfn.get)
    chosen = select_units([[m for m in cands if m.kind == k] for k in ranking], budget, cands, settings)
    chosen_types = [k for k in ranking if any(m.kind == k for m in chosen)]
    return new_plan("plop", [dense_spec(m, settings.rank, settings) for m in chosen], budget, settings, cands,
                    scores=scores, details={"type_nfn": type_nfn, "ranking": ranking, "chosen_types": chosen_types})
