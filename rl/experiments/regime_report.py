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

With several seeds (``seeded_contrasts``) each regime's value is the mean over seeds of
each seed's mean over captures, with a 95% bootstrap CI (seeds, then captures within a
seed), printed beside the statistic's chance level (rl/diagnostics/confidence.py); a
direction is called only when the CI of GRPO minus SFT (seeds paired) excludes 0, else
the contrast is inconclusive. ``regime_contrasts`` (one pair, no CI) calls a difference
within ``tolerance`` (relative) a tie.

Left out: running anything (rl/experiments/regime.py does) and plots (rl/experiments/plots.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rl.diagnostics import records as dr
from rl.diagnostics.confidence import Interval, chance_level, seed_capture_ci, seed_capture_difference_ci

KIND_LABEL = {"G": "G", "lora": "LoRA gradient"}
REGIME_LABEL = {"sft": "SFT", "grpo": "GRPO"}


@dataclass(frozen=True)
class Statistic:
    key: str  # the metric under diag/<kind>/
    label: str
    papers_higher: str  # the regime the papers find higher: "sft" | "grpo"
    claim: str


# The papers' claims, each shared by the statistics that test it.
HIGH_RANK = "GRPO gradients are high-rank, SFT gradients low-rank"
STABLE = "SFT gradients are directionally stable, GRPO's near-orthogonal across steps"
SPREAD = "layer importance is spread wide under SFT and flat under GRPO"
SPREAD_MEASURED = "layer importance is spread wide under SFT (>10x) and flat under GRPO (2.17x)"

STATISTICS = (
    Statistic("eff_rank_mean", "effective rank", "grpo", HIGH_RANK),
    Statistic("stable_rank_mean", "stable rank", "grpo", HIGH_RANK),
    Statistic("cos_lag1_mean", "cross-step cosine (lag 1)", "sft", STABLE),
    Statistic("sign_agree_mean", "sign agreement with the previous step", "sft", STABLE),
    Statistic("sign_consistency_mean", "sign consistency over the window", "sft", STABLE),
    Statistic("importance_spread", "importance spread (max/min, mean over captures)", "sft", SPREAD_MEASURED),
    Statistic("importance_top30_share", "top-30% importance share (mean over captures)", "sft", SPREAD),
    Statistic("importance_gini", "importance Gini (mean over captures)", "sft", SPREAD),
)
RUN_SPREAD = Statistic("run_importance_spread", "importance spread (max/min of run-mean layer norms)", "sft",
                       SPREAD_MEASURED)
RUN_TOP30 = Statistic("run_importance_top30_share", "top-30% share of run-mean layer norms", "sft", SPREAD)
RUN_GINI = Statistic("run_importance_gini", "Gini of run-mean layer norms", "sft",
                     SPREAD)


@dataclass(frozen=True)
class Contrast:
    statistic: Statistic
    kind: str  # "G" | "lora"
    sft: float
    grpo: float
    n_sft: int  # captures behind each value (1 for run-level quantities)
    n_grpo: int
    went: str  # "grpo" | "sft" (the higher one) | "tie" | "inconclusive" | "missing"
    agrees: bool | None  # with the papers; None for a tie, an inconclusive or a missing value
    sft_ci: Interval | None = None  # seed-level mean and 95% CI (seeded_contrasts only)
    grpo_ci: Interval | None = None
    diff_ci: Interval | None = None  # GRPO minus SFT, seeds paired
    chance: float | None = None  # the statistic's value under noise, where one exists

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


def seeded_contrast(stat: Statistic, kind: str, sft: list[list[float]], grpo: list[list[float]],
                    chance: float | None = None) -> Contrast:
    """A contrast from per-seed lists of capture values (seed k of both regimes paired); the
    direction is the sign of the difference's CI, inconclusive when it includes 0."""
    s_ci, g_ci = seed_capture_ci(sft), seed_capture_ci(grpo)
    d_ci = seed_capture_difference_ci(sft, grpo)
    if math.isnan(d_ci.estimate) or not math.isfinite(d_ci.low) or not math.isfinite(d_ci.high):
        went = "missing"
    elif d_ci.low > 0:
        went = "grpo"
    elif d_ci.high < 0:
        went = "sft"
    else:
        went = "inconclusive"
    agrees = went == stat.papers_higher if went in ("sft", "grpo") else None
    return Contrast(stat, kind, s_ci.estimate, g_ci.estimate, sum(len(v) for v in sft), sum(len(v) for v in grpo),
                    went, agrees, s_ci, g_ci, d_ci, chance)


def seeded_contrasts(pairs: list[tuple[list[dict], list[dict]]], window: int) -> list[Contrast]:
    """Every statistic for both gradient kinds over seeds: ``pairs`` holds (SFT records, GRPO
    records) per seed. Run-level importance summaries have one value per seed."""
    out = []
    for kind in dr.KINDS:
        layers = len(dr.mean_layer_norms(pairs[0][0], kind) or dr.mean_layer_norms(pairs[0][1], kind)) or None
        for stat in STATISTICS:
            vals = [[[v for _, v in dr.series(recs, kind, stat.key) if math.isfinite(v)] for recs in regime]
                    for regime in zip(*pairs)]
            if not any(vals[0]) and not any(vals[1]):
                continue  # not logged by either run (e.g. sign consistency needs a full window)
            out.append(seeded_contrast(stat, kind, vals[0], vals[1],
                                       chance_level(stat.key, window=window, layers=layers)))
        imps = [[dr.run_importance(recs, kind) for recs in regime] for regime in zip(*pairs)]
        if not any(i is not None for regime in imps for i in regime):
            continue
        for stat, attr in ((RUN_SPREAD, "spread"), (RUN_TOP30, "top_share"), (RUN_GINI, "gini")):
            vals = [[[getattr(i, attr)] if i is not None and math.isfinite(getattr(i, attr)) else []
                     for i in regime] for regime in imps]
            key = {"spread": "importance_spread", "top_share": "importance_top30_share", "gini": "importance_gini"}[attr]
            out.append(seeded_contrast(stat, kind, vals[0], vals[1], chance_level(key, layers=layers)))
    return out


def contrast_record(c: Contrast) -> dict:
    """A contrast as JSON-able fields (contrasts.json)."""
    def ci(i: Interval | None):
        return None if i is None else {"mean": i.estimate, "low": i.low, "high": i.high, "n": i.n}

    return {"statistic": c.statistic.key, "gradient": c.kind, "sft": c.sft, "grpo": c.grpo,
            "captures": [c.n_sft, c.n_grpo], "sft_ci": ci(c.sft_ci), "grpo_ci": ci(c.grpo_ci),
            "grpo_minus_sft_ci": ci(c.diff_ci), "chance": c.chance, "papers_higher": c.statistic.papers_higher,
            "went": c.went, "agrees": c.agrees, "sentence": c.sentence}


def contrast_sentence(c: Contrast) -> str:
    """One line stating which way the contrast went and whether the papers agree."""
    what = f"{KIND_LABEL[c.kind]} {c.statistic.label}"
    chance = f"; chance level {fmt(c.chance)}" if c.chance is not None else ""
    if c.went == "inconclusive":
        return (f"{what}: GRPO {c.grpo_ci.text()} vs SFT {c.sft_ci.text()}{chance}; the difference's 95% CI "
                f"{c.diff_ci.text()} includes 0: inconclusive.")
    if c.went == "missing":
        which = "SFT" if math.isnan(c.sft) else "GRPO"
        return f"{what}: not measured under {which} (too few captures); no direction."
    if c.went == "tie":
        return f"{what}: GRPO and SFT are equal within 2% (GRPO {fmt(c.grpo)}, SFT {fmt(c.sft)}); the papers' contrast does not show."
    hi, lo = (REGIME_LABEL[c.went], REGIME_LABEL["sft" if c.went == "grpo" else "grpo"])
    a, b = (c.grpo, c.sft) if c.went == "grpo" else (c.sft, c.grpo)
    verdict = "as the papers report" if c.agrees else "opposite to the papers' claim"
    if c.diff_ci is not None:
        return (f"{hi}'s {what} is higher than {lo}'s: GRPO {c.grpo_ci.text()} vs SFT {c.sft_ci.text()}{chance}; "
                f"GRPO - SFT {c.diff_ci.text()}, {verdict}.")
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
    out = {"agree": 0, "opposite": 0, "tie": 0, "inconclusive": 0, "missing": 0}
    for c in contrasts:
        key = c.went if c.went in ("missing", "tie", "inconclusive") else "agree" if c.agrees else "opposite"
        out[key] += 1
    return out


def seeded_table(contrasts: list[Contrast]) -> str:
    lines = ["| statistic | gradient | SFT mean [95% CI] | GRPO mean [95% CI] | chance | GRPO - SFT [95% CI] | "
             "seeds | captures (SFT/GRPO) | papers: higher under | went | agrees |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in contrasts:
        went = {"missing": "n/a", "inconclusive": "inconclusive"}.get(c.went, REGIME_LABEL.get(c.went, c.went) + " higher")
        agree = {True: "yes", False: "**no**", None: "-"}[c.agrees]
        lines.append(f"| {c.statistic.label} | {KIND_LABEL[c.kind]} | {c.sft_ci.text()} | {c.grpo_ci.text()} | "
                     f"{fmt(c.chance) if c.chance is not None else '-'} | {c.diff_ci.text()} | {c.diff_ci.n} | "
                     f"{c.n_sft}/{c.n_grpo} | {REGIME_LABEL[c.statistic.papers_higher]} | {went} | {agree} |")
    return "\n".join(lines)


def control_lines(control: dict | None, contrasts: list[Contrast]) -> list[str]:
    """The fixed-policy control beside training's lag-1 statistics on G."""
    if not control:
        return []
    during = {(c.statistic.key, c.kind): c for c in contrasts if c.sft_ci is not None}
    out = ["## Fixed-policy control (step 0, independent batches)", "",
           "Cosine and sign agreement of G between independent batches of one step's size, the policy held "
           "at step 0: the level that sampling noise alone gives. Training's lag-1 values (G, seed-level mean) "
           "next to it: below the control, the policy's drift decorrelates steps; at it, noise explains them.", "",
           "| regime | batches | pairs | cosine, mean [min, max] | training lag-1 cosine | sign agreement, mean "
           "[min, max] | training sign agreement | chance (cosine / sign) |", "|---|---|---|---|---|---|---|---|"]
    for loss in ("sft", "grpo"):
        c = control.get(loss)
        if not c:
            continue
        cos, agree = c["cos_mean"], c["sign_agree_mean"]
        trained = [during.get((k, "G")) for k in ("cos_lag1_mean", "sign_agree_mean")]
        text = [(t.sft_ci if loss == "sft" else t.grpo_ci).text() if t is not None else "n/a" for t in trained]
        out.append(f"| {REGIME_LABEL[loss]} | {c['batches']} | {len(cos)} | {_span(cos)} | {text[0]} | "
                   f"{_span(agree)} | {text[1]} | 0 / 0.5 |")
    return out + [""]


def _span(v: list[float]) -> str:
    ok = [x for x in v if math.isfinite(x)]
    return f"{sum(ok) / len(ok):.3f} [{min(ok):.3f}, {max(ok):.3f}]" if ok else "n/a"


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


def markdown(contrasts: list[Contrast], sft_runs: list, grpo_runs: list, *,
             title: str, setup: list[str], plots: list[str], control: dict | None = None) -> str:
    """The whole report: setup, verdict sentences, the table, the control, per-layer importance,
    plots, caveats. ``sft_runs``/``grpo_runs``: one records list per seed (or one run's records)."""
    if sft_runs and isinstance(sft_runs[0], dict):
        sft_runs, grpo_runs = [sft_runs], [grpo_runs]
    seeded = any(c.diff_ci is not None for c in contrasts)
    t = tally(contrasts)
    out = [f"# {title}", "", "## Setup", "", *[f"- {s}" for s in setup], "",
           "## Which way each contrast went", "",
           f"{t['agree']} contrasts went the papers' way, {t['opposite']} the opposite way, "
           + (f"{t['inconclusive']} were inconclusive (the 95% CI of GRPO - SFT includes 0), " if seeded
              else f"{t['tie']} tied (within 2%), ") + f"{t['missing']} could not be measured.", ""]
    for regime, runs in (("SFT", sft_runs), ("GRPO", grpo_runs)):
        z = sum(dr.zero_captures(recs, "G") for recs in runs)
        if z:
            out += [f"{regime}: {z} capture(s) had an exactly zero gradient (every group's rewards equal, so "
                    "every advantage was 0) and are left out of every statistic and of the sign window.", ""]
    out += [f"- {c.sentence}" for c in contrasts]
    if seeded:
        out += ["", "## Numbers (seed-level mean of each seed's mean over captures, 95% bootstrap CI)", "",
                seeded_table(contrasts), ""]
    else:
        out += ["", "## Numbers (mean over captures)", "", contrast_table(contrasts), ""]
    out += control_lines(control, contrasts)
    out += ["## Per-layer importance (share of the run-mean gradient norm of the watched modules; first seed)", "",
            importance_table(sft_runs[0], grpo_runs[0]), ""]
    acc = []
    for regime, runs in (("SFT", sft_runs), ("GRPO", grpo_runs)):
        for i, recs in enumerate(runs):
            a = final_metric(recs, "eval/accuracy_flexible")
            if math.isfinite(a):
                n = final_metric(recs, "eval/n")
                acc.append(f"- {regime}{f' (run {i + 1})' if len(runs) > 1 else ''}: final greedy accuracy "
                           f"{100 * a:.1f}% flexible, {100 * final_metric(recs, 'eval/accuracy_strict'):.1f}% strict "
                           f"on {int(n) if math.isfinite(n) else 'n/a'} test problems.")
    if acc:
        out += ["## Accuracy after training", "", *acc, ""]
    if plots:
        out += ["## Plots (first seed)", ""] + [f"![{p}]({p})" for p in plots] + [""]
    out += ["## Reading these numbers", "",
            "- G is the gradient of the frozen weight rebuilt from hooks; its rank is bounded by the number "
            "of tokens in the batch. The runs train the same number of sequences per step unless the setup says "
            "otherwise; the loss tokens per step it lists differ (gold solutions against sampled completions) "
            "unless a loss-token cap (`--loss-tokens`) brought both to the same count.",
            "- The LoRA gradient's rank is at most r: its effective rank cannot exceed the adapter rank.",
            "- Cross-step statistics compare consecutive non-zero captures; with diagnostics.every > 1 they span "
            "several optimizer steps. Sign consistency needs a full window of non-zero captures; its chance "
            "level is E|S_T|/T for T random signs (0.375 for T = 5).",
            "- Chance levels: cosine 0, sign agreement 0.5; for the importance summaries the values of equal "
            "layers (spread 1, Gini 0, top-30% share = the top layers' count over all layers).",
            "- CIs resample seeds, then captures within a seed; with 3 seeds they are percentile intervals of "
            "few values and read as approximate."]
    return "\n".join(out) + "\n"
