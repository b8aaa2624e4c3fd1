"""The SFT-versus-GRPO regime contrast: which way each gradient statistic went, as numbers and words.

Input: the metrics records of two runs that differ only in the loss (``placerl regime``
runs them). For each statistic and each gradient kind (the rank-free G and the LoRA
gradients) the mean over captures is taken per regime and compared with what the
papers claim:

- SFT gradients are low-rank, GRPO's high-rank: GRPO has the higher effective and
  stable rank;
- SFT gradients are directionally stable across steps, GRPO's near-orthogonal: SFT has
  the higher cross-step cosine, sign agreement and sign consistency;
- layer importance is spread wide under SFT (>10x max/min) and flat under GRPO
  (2.17x): SFT has the higher max/min spread and top-30% share.

A difference within ``tolerance`` (relative) is called a tie rather than a direction.

Left out: running anything (rl/experiments/regime.py does), plots (rl/experiments/plots.py) and
significance tests: a handful of captures per run gives a direction, not a p-value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rl.diagnostics import records as dr

KIND_LABEL = {"G": "G", "lora": "LoRA gradient"}
REGIME_LABEL = {"sft": "SFT", "grpo": "GRPO"}


@dataclass(frozen=True)
class Statistic:
    key: str  # the metric under diag/<kind>/
    label: str
    papers_higher: str  # the regime the papers find higher: "sft" | "grpo"
    claim: str


STATISTICS = (
    Statistic("eff_rank_mean", "effective rank", "grpo", "GRPO gradients are high-rank, SFT gradients low-rank"),
    Statistic("stable_rank_mean", "stable rank", "grpo", "GRPO gradients are high-rank, SFT gradients low-rank"),
    Statistic("cos_lag1_mean", "cross-step cosine (lag 1)", "sft",
              "SFT gradients are directionally stable, GRPO's near-orthogonal across steps"),
    Statistic("sign_agree_mean", "sign agreement with the previous step", "sft",
              "SFT gradients are directionally stable, GRPO's near-orthogonal across steps"),
    Statistic("sign_consistency_mean", "sign consistency over the window", "sft",
              "SFT gradients are directionally stable, GRPO's near-orthogonal across steps"),
    Statistic("importance_spread", "importance spread (max/min, mean over captures)", "sft",
              "layer importance is spread wide under SFT (>10x) and flat under GRPO (2.17x)"),
    Statistic("importance_top30_share", "top-30% importance share (mean over captures)", "sft",
              "layer importance is spread wide under SFT and flat under GRPO"),
)
RUN_SPREAD = Statistic("run_importance_spread", "importance spread (max/min of run-mean layer norms)", "sft",
                       "layer importance is spread wide under SFT (>10x) and flat under GRPO (2.17x)")
RUN_TOP30 = Statistic("run_importance_top30_share", "top-30% share of run-mean layer norms", "sft",
                      "layer importance is spread wide under SFT and flat under GRPO")


@dataclass(frozen=True)
class Contrast:
    statistic: Statistic
    kind: str  # "G" | "lora"
    sft: float
    grpo: float
    n_sft: int  # captures behind each value (1 for run-level quantities)
    n_grpo: int
    went: str  # "grpo" | "sft" (the higher one) | "tie" | "missing"
    agrees: bool | None  # with the papers; None for a tie or a missing value

    @property
    def sentence(self) -> str:
        return contrast_sentence(self)


def direction(sft: float, grpo: float, tolerance: float = 0.02) -> str:
    """Which regime is higher; "tie" within ``tolerance`` of the larger magnitude; "missing" for NaN."""
    if math.isnan(sft) or math.isnan(grpo):
        return "missing"
    if sft == grpo:
        return "tie"
    if math.isinf(sft) or math.isinf(grpo):
        return "sft" if sft > grpo else "grpo"
    if abs(sft - grpo) <= tolerance * max(abs(sft), abs(grpo)):
        return "tie"
    return "sft" if sft > grpo else "grpo"


def make_contrast(stat: Statistic, kind: str, sft: float, grpo: float, n_sft: int = 1, n_grpo: int = 1,
                  tolerance: float = 0.02) -> Contrast:
    went = direction(sft, grpo, tolerance)
    agrees = None if went in ("tie", "missing") else went == stat.papers_higher
    return Contrast(stat, kind, sft, grpo, n_sft, n_grpo, went, agrees)


def fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if math.isinf(v):
        return "inf"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01 or a == 0:
        return f"{v:.3f}"
    return f"{v:.2e}"


def contrast_sentence(c: Contrast) -> str:
    """One line stating which way the contrast went and whether the papers agree."""
    what = f"{KIND_LABEL[c.kind]} {c.statistic.label}"
    if c.went == "missing":
        which = "SFT" if math.isnan(c.sft) else "GRPO"
        return f"{what}: not measured under {which} (too few captures); no direction."
    if c.went == "tie":
        return f"{what}: GRPO and SFT are equal within 2% (GRPO {fmt(c.grpo)}, SFT {fmt(c.sft)}); the papers' contrast does not show."
    hi, lo = (REGIME_LABEL[c.went], REGIME_LABEL["sft" if c.went == "grpo" else "grpo"])
    a, b = (c.grpo, c.sft) if c.went == "grpo" else (c.sft, c.grpo)
    verdict = "as the papers report" if c.agrees else "opposite to the papers' claim"
    return f"{hi}'s {what} is higher than {lo}'s: {fmt(a)} vs {fmt(b)}, {verdict}."


def regime_contrasts(sft_records: list[dict], grpo_records: list[dict],
                     tolerance: float = 0.02) -> list[Contrast]:
    """Every statistic for both gradient kinds, plus the run-level importance spread and top-30% share."""
    out = []
    for kind in dr.KINDS:
        for stat in STATISTICS:
            s, ns = dr.mean_of(sft_records, kind, stat.key)
            g, ng = dr.mean_of(grpo_records, kind, stat.key)
            if ns == 0 and ng == 0:
                continue  # not logged by either run (e.g. sign consistency needs a full window)
            out.append(make_contrast(stat, kind, s, g, ns, ng, tolerance))
        imp_s, imp_g = dr.run_importance(sft_records, kind), dr.run_importance(grpo_records, kind)
        if imp_s is not None or imp_g is not None:
            nan = float("nan")
            out.append(make_contrast(RUN_SPREAD, kind, imp_s.spread if imp_s else nan,
                                     imp_g.spread if imp_g else nan, tolerance=tolerance))
            out.append(make_contrast(RUN_TOP30, kind, imp_s.top_share if imp_s else nan,
                                     imp_g.top_share if imp_g else nan, tolerance=tolerance))
    return out


def tally(contrasts: list[Contrast]) -> dict[str, int]:
    """How many contrasts agreed with the papers, went the other way, tied or were missing."""
    out = {"agree": 0, "opposite": 0, "tie": 0, "missing": 0}
    for c in contrasts:
        key = "missing" if c.went == "missing" else "tie" if c.went == "tie" else "agree" if c.agrees else "opposite"
        out[key] += 1
    return out


def contrast_table(contrasts: list[Contrast]) -> str:
    lines = ["| statistic | gradient | SFT | GRPO | captures (SFT/GRPO) | papers: higher under | went | agrees |",
             "|---|---|---|---|---|---|---|---|"]
    for c in contrasts:
        went = {"missing": "n/a", "tie": "tie"}.get(c.went, REGIME_LABEL.get(c.went, c.went) + " higher")
        agree = {True: "yes", False: "**no**", None: "-"}[c.agrees]
        lines.append(f"| {c.statistic.label} | {KIND_LABEL[c.kind]} | {fmt(c.sft)} | {fmt(c.grpo)} | "
                     f"{c.n_sft}/{c.n_grpo} | {REGIME_LABEL[c.statistic.papers_higher]} | {went} | {agree} |")
    return "\n".join(lines)


def importance_table(sft_records: list[dict], grpo_records: list[dict]) -> str:
    """Per-layer run-level importance shares, G and LoRA, under both regimes."""
    cols = []
    for regime, recs in (("SFT", sft_records), ("GRPO", grpo_records)):
        for kind in dr.KINDS:
            imp = dr.run_importance(recs, kind)
            cols.append((f"{regime} {KIND_LABEL[kind]}", imp.shares if imp else {}))
    layers = sorted({layer for _, shares in cols for layer in shares}, key=dr.layer_index)
    if not layers:
        return "(no per-layer gradient norms were logged)"
    lines = ["| layer | " + " | ".join(name for name, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(fmt(s.get(layer, float('nan'))) for _, s in cols) + " |")
    return "\n".join(lines)


def final_metric(records: list[dict], key: str) -> float:
    """The last logged value of a metric (e.g. ``eval/accuracy_flexible``); NaN if never logged."""
    for r in reversed(records):
        if key in r:
            v = dr._number(r[key])
            if v is not None:
                return v
    return float("nan")


def markdown(contrasts: list[Contrast], sft_records: list[dict], grpo_records: list[dict], *,
             title: str, setup: list[str], plots: list[str]) -> str:
    """The whole report: setup, verdict sentences, the table, per-layer importance, plots, caveats."""
    t = tally(contrasts)
    out = [f"# {title}", "", "## Setup", "", *[f"- {s}" for s in setup], "",
           "## Which way each contrast went", "",
           f"{t['agree']} contrasts went the papers' way, {t['opposite']} the opposite way, "
           f"{t['tie']} tied (within 2%), {t['missing']} could not be measured.", ""]
    for regime, recs in (("SFT", sft_records), ("GRPO", grpo_records)):
        z = dr.zero_captures(recs, "G")
        if z:
            out += [f"{regime}: {z} capture(s) had an exactly zero gradient (every group's rewards equal, so "
                    "every advantage was 0) and are left out of every statistic.", ""]
    out += [f"- {c.sentence}" for c in contrasts]
    out += ["", "## Numbers (mean over captures)", "", contrast_table(contrasts), "",
            "## Per-layer importance (share of the run-mean gradient norm of the watched modules)", "",
            importance_table(sft_records, grpo_records), ""]
    acc = []
    for regime, recs in (("SFT", sft_records), ("GRPO", grpo_records)):
        a = final_metric(recs, "eval/accuracy_flexible")
        if math.isfinite(a):
            n = final_metric(recs, "eval/n")
            acc.append(f"- {regime}: final greedy accuracy {100 * a:.1f}% flexible, "
                       f"{100 * final_metric(recs, 'eval/accuracy_strict'):.1f}% strict "
                       f"on {int(n) if math.isfinite(n) else 'n/a'} test problems.")
    if acc:
        out += ["## Accuracy after training", "", *acc, ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    out += ["## Reading these numbers", "",
            "- G is the gradient of the frozen weight rebuilt from hooks; its rank is bounded by the number "
            "of tokens in the batch, and a GRPO batch holds group_size completions per prompt where SFT holds "
            "one gold solution, so a rank contrast partly reflects batch size as well as the loss.",
            "- The LoRA gradient's rank is at most r: its effective rank cannot exceed the adapter rank.",
            "- Cross-step statistics compare consecutive captures; with diagnostics.every > 1 they span "
            "several optimizer steps. Sign consistency needs a full window of captures.",
            "- A few captures give a direction, not a significance test; rerun with more steps or seeds to "
            "check that a direction holds."]
    return "\n".join(out) + "\n"
