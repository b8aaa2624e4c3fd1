"""The numbers of a placement comparison: accuracy intervals, importance spreads, rank-vs-shift fits.

``placerl compare`` trains one run per (placement, seed) under one budget; this module
turns each run's records and plan into a :class:`RunResult`, pools the seeds of a
placement into a :class:`PlacementRow`, and writes the table and the sqrt(r) verdict.

The sqrt(r) question. At initialisation (B = 0, Var A_ij = 1/(3 d_in)) the LoRA
gradient is dL/dB = s G A^T with E||dL/dB||^2 = s^2 r / (3 d_in) ||G||^2. With alpha
proportional to r (s constant) a layer given more rank shows a larger LoRA gradient by
sqrt(r) whatever the data does; with fixed alpha (s = alpha / r) by 1/sqrt(r); with
rsLoRA not at all. So, per layer, ``shift_l = log(I_lora_l / I_G_l)`` (the importance
measured on LoRA gradients relative to that on the rank-free G) should rise with
``log r_l`` at slope +1/2 under proportional alpha and -1/2 under fixed alpha, early in
training. :func:`rank_shift_fit` measures that slope and the Pearson correlation.

Accuracy: pooled over seeds (the same test problems each time), with a Wilson score
interval, which stays inside [0, 1] and is sensible at 0 or n successes.

Left out: running anything, plots (rl/experiments/plots.py), and tests between placements
(intervals are shown; with a few dozen problems most differences are inside them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rl.diagnostics import records as dr
from rl.experiments.regime_report import final_metric, fmt

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (nan, nan) when n = 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN with fewer than two points or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"pearson needs equal lengths, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    if sxx <= 1e-300 or syy <= 1e-300:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def ols_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y on x; NaN when x is constant."""
    n = len(x)
    if n < 2 or len(y) != n:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx <= 1e-300:
        return float("nan")
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx


def _watched(module: str, types: list[str] | None) -> bool:
    return not types or any(module == t or module.endswith("." + t) for t in types)


def layer_ranks(plan: dict, module_types: list[str] | None = None) -> dict[str, float]:
    """Mean assigned rank per layer over the plan's adapters on the watched module types."""
    ranks: dict[str, list[int]] = {}
    for a in plan.get("adapters", []):
        if _watched(a["module"], module_types):
            ranks.setdefault(dr.layer_of(a["module"]), []).append(int(a["rank"]))
    return {layer: sum(r) / len(r) for layer, r in sorted(ranks.items(), key=lambda kv: dr.layer_index(kv[0]))}


def importance_shift(lora_shares: dict[str, float], g_shares: dict[str, float]) -> dict[str, float]:
    """log(I_lora / I_G) per layer present in both with positive shares."""
    return {layer: math.log(lora_shares[layer] / g_shares[layer]) for layer in lora_shares
            if layer in g_shares and lora_shares[layer] > 0 and g_shares[layer] > 0}


@dataclass(frozen=True)
class ShiftFit:
    n: int  # layers in the fit
    pearson: float  # corr(log r_l, shift_l); NaN when every layer has the same rank
    slope: float  # d shift / d log r; +0.5 (alpha proportional) or -0.5 (fixed alpha) at initialisation
    points: tuple[tuple[float, float], ...] = ()  # (rank, shift) per layer, for the plot


def rank_shift_fit(ranks: dict[str, float], shift: dict[str, float]) -> ShiftFit:
    layers = [layer for layer in shift if layer in ranks and ranks[layer] > 0]
    x = [math.log(ranks[layer]) for layer in layers]
    y = [shift[layer] for layer in layers]
    return ShiftFit(len(layers), pearson(x, y), ols_slope(x, y), tuple((ranks[la], shift[la]) for la in layers))


@dataclass
class RunResult:
    placement: str
    seed: int
    error: str = ""  # one line; empty when the run finished
    accuracy_strict: float = float("nan")
    accuracy_flexible: float = float("nan")
    eval_n: int = 0
    reward_last: float = float("nan")  # mean reward over the last steps
    params: int = 0
    wall_s: float = float("nan")
    spread_lora: float = float("nan")  # run-level max/min layer importance on LoRA gradients
    top30_lora: float = float("nan")
    spread_G: float = float("nan")
    top30_G: float = float("nan")
    fit: ShiftFit | None = None
    rank_min: float = float("nan")
    rank_max: float = float("nan")
    predicted_lora_spread: float = float("nan")  # the scorer's expectation at initialisation, if any
    run_dir: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def mean_last(records: list[dict], key: str, last: int) -> float:
    vals = [v for r in records if key in r for v in [dr._number(r[key])] if v is not None and math.isfinite(v)]
    tail = vals[-last:] if last > 0 else vals
    return sum(tail) / len(tail) if tail else float("nan")


def run_result(placement: str, seed: int, records: list[dict], plan: dict, *, params: int, wall_s: float,
               module_types: list[str] | None = None, last: int = 3, run_dir: str = "") -> RunResult:
    """Everything the table needs from one finished run (pure: records and plan in, numbers out)."""
    res = RunResult(placement, seed, params=params, wall_s=wall_s, run_dir=run_dir)
    res.accuracy_strict = final_metric(records, "eval/accuracy_strict")
    res.accuracy_flexible = final_metric(records, "eval/accuracy_flexible")
    n = final_metric(records, "eval/n")
    res.eval_n = int(n) if math.isfinite(n) else 0
    res.reward_last = mean_last(records, "reward/mean", last)
    imp = {kind: dr.run_importance(records, kind) for kind in dr.KINDS}
    if imp["lora"] is not None:
        res.spread_lora, res.top30_lora = imp["lora"].spread, imp["lora"].top_share
    if imp["G"] is not None:
        res.spread_G, res.top30_G = imp["G"].spread, imp["G"].top_share
    ranks = layer_ranks(plan, module_types)
    if ranks:
        res.rank_min, res.rank_max = min(ranks.values()), max(ranks.values())
    if imp["lora"] is not None and imp["G"] is not None:
        res.fit = rank_shift_fit(ranks, importance_shift(imp["lora"].shares, imp["G"].shares))
    predicted = plan.get("details", {}).get("lora_grad_spread", {})
    if isinstance(predicted, dict) and "max_over_min" in predicted:
        res.predicted_lora_spread = float(predicted["max_over_min"])
    return res


@dataclass
class PlacementRow:
    placement: str
    runs: int
    failed: int
    correct_strict: int = 0
    correct_flexible: int = 0
    n: int = 0
    reward_last: float = float("nan")
    params: float = float("nan")
    wall_s: float = float("nan")
    spread_lora: float = float("nan")
    spread_G: float = float("nan")
    top30_lora: float = float("nan")
    top30_G: float = float("nan")
    pearson: float = float("nan")
    slope: float = float("nan")
    errors: list[str] = field(default_factory=list)

    def accuracy(self, which: str = "flexible") -> float:
        c = self.correct_flexible if which == "flexible" else self.correct_strict
        return c / self.n if self.n else float("nan")

    def interval(self, which: str = "flexible") -> tuple[float, float]:
        return wilson_interval(self.correct_flexible if which == "flexible" else self.correct_strict, self.n)

    @property
    def amplification(self) -> float:
        """LoRA-gradient importance spread over the G spread: > 1 when the adapters widen it."""
        return self.spread_lora / self.spread_G if self.spread_G > 0 else float("nan")


def pool(results: list[RunResult]) -> list[PlacementRow]:
    """One row per placement, in first-seen order: counts summed over seeds, other numbers averaged."""
    rows: dict[str, PlacementRow] = {}
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.placement, []).append(r)
    for name, runs in groups.items():
        ok = [r for r in runs if r.ok]
        row = PlacementRow(name, len(runs), len(runs) - len(ok), errors=[f"seed {r.seed}: {r.error}" for r in runs if not r.ok])
        for r in ok:
            if r.eval_n:
                row.n += r.eval_n
                row.correct_strict += round(r.accuracy_strict * r.eval_n)
                row.correct_flexible += round(r.accuracy_flexible * r.eval_n)
        avg = lambda attr: dr.finite_mean([getattr(r, attr) for r in ok])  # noqa: E731
        row.reward_last, row.params, row.wall_s = avg("reward_last"), avg("params"), avg("wall_s")
        row.spread_lora, row.spread_G = avg("spread_lora"), avg("spread_G")
        row.top30_lora, row.top30_G = avg("top30_lora"), avg("top30_G")
        row.pearson = dr.finite_mean([r.fit.pearson for r in ok if r.fit])
        row.slope = dr.finite_mean([r.fit.slope for r in ok if r.fit])
        rows[name] = row
    return list(rows.values())


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"


def runs_table(results: list[RunResult]) -> str:
    lines = ["| placement | seed | status | acc. flexible | acc. strict | n | reward (last steps) | trainable params | "
             "wall s | rank min-max | spread LoRA | spread G | predicted LoRA spread at init | corr(log r, shift) | "
             "slope |", "|---" * 15 + "|"]
    for r in results:
        status = "ok" if r.ok else f"FAILED: {r.error}"
        fit = r.fit or ShiftFit(0, float("nan"), float("nan"))
        lines.append(f"| {r.placement} | {r.seed} | {status} | {_pct(r.accuracy_flexible)} | {_pct(r.accuracy_strict)} | "
                     f"{r.eval_n} | {fmt(r.reward_last)} | {r.params:,} | {fmt(r.wall_s)} | "
                     f"{fmt(r.rank_min)}-{fmt(r.rank_max)} | {fmt(r.spread_lora)} | {fmt(r.spread_G)} | "
                     f"{fmt(r.predicted_lora_spread)} | {fmt(fit.pearson)} | {fmt(fit.slope)} |")
    return "\n".join(lines)


def placements_table(rows: list[PlacementRow]) -> str:
    lines = ["| placement | runs ok | accuracy flexible [95% CI] | accuracy strict [95% CI] | reward (last steps) | "
             "trainable params | wall s | spread LoRA | spread G | LoRA/G | top-30% LoRA | top-30% G |",
             "|---" * 12 + "|"]
    for r in rows:
        lo_f, hi_f = r.interval("flexible")
        lo_s, hi_s = r.interval("strict")
        params = "n/a" if math.isnan(r.params) else f"{r.params:,.0f}"
        lines.append(f"| {r.placement} | {r.runs - r.failed}/{r.runs} | "
                     f"{_pct(r.accuracy('flexible'))} [{_pct(lo_f)}, {_pct(hi_f)}] | "
                     f"{_pct(r.accuracy('strict'))} [{_pct(lo_s)}, {_pct(hi_s)}] | {fmt(r.reward_last)} | {params} | "
                     f"{fmt(r.wall_s)} | {fmt(r.spread_lora)} | {fmt(r.spread_G)} | {fmt(r.amplification)} | "
                     f"{fmt(r.top30_lora)} | {fmt(r.top30_G)} |")
    return "\n".join(lines)


def sqrt_r_verdict(rows: list[PlacementRow]) -> list[str]:
    """Sentences on whether LoRA-gradient importance moves with sqrt(r) as the alpha policy predicts."""
    by = {r.placement: r for r in rows}
    out = []
    uni = by.get("uniform")
    if uni is not None and math.isfinite(uni.amplification):
        out.append(f"uniform: LoRA-gradient spread {fmt(uni.spread_lora)} vs G spread {fmt(uni.spread_G)} "
                   f"(ratio {fmt(uni.amplification)}): the baseline ratio with equal ranks.")
    signs = {}
    for name, theory in (("gradrank:proportional", 0.5), ("gradrank:fixed", -0.5), ("gradrank:rslora", 0.0)):
        r = by.get(name)
        if r is None:
            continue
        if math.isnan(r.slope):
            out.append(f"{name}: no rank-vs-shift fit (run failed, ranks all equal, or no diagnostics).")
            continue
        signs[name] = r.slope
        base = f" (uniform: {fmt(uni.amplification)})" if uni is not None and math.isfinite(uni.amplification) else ""
        out.append(f"{name}: LoRA-gradient spread {fmt(r.spread_lora)} vs G spread {fmt(r.spread_G)}, ratio "
                   f"{fmt(r.amplification)}{base}; log(I_lora/I_G) against log r: slope {fmt(r.slope)} "
                   f"(sqrt(r) theory at initialisation: {theory:+.1f}), Pearson {fmt(r.pearson)}.")
    p, f = signs.get("gradrank:proportional"), signs.get("gradrank:fixed")
    if p is None or f is None:
        out.append("sqrt(r) effect: cannot tell; it needs both gradrank:proportional and gradrank:fixed runs "
                   "with diagnostics.")
    elif p > 0 and f < 0:
        out.append(f"sqrt(r) effect: SHOWS. Layers given more rank have a larger LoRA-gradient share relative to "
                   f"G under alpha proportional to r (slope {fmt(p)}) and a smaller one under fixed alpha "
                   f"(slope {fmt(f)}): part of the LoRA-gradient importance spread is the allocation itself.")
    elif p > 0 or f < 0:
        out.append(f"sqrt(r) effect: PARTLY. Slopes {fmt(p)} (proportional, theory +0.5) and {fmt(f)} "
                   f"(fixed, theory -0.5): only one policy moves the way the mechanism predicts.")
    else:
        out.append(f"sqrt(r) effect: DOES NOT SHOW. Slopes {fmt(p)} (proportional, theory +0.5) and {fmt(f)} "
                   f"(fixed, theory -0.5).")
    return out


def markdown(results: list[RunResult], *, title: str, setup: list[str], plots: list[str]) -> str:
    rows = pool(results)
    out = [f"# {title}", "", "## Setup", "", *[f"- {s}" for s in setup], "",
           "## By placement (seeds pooled)", "", placements_table(rows), "",
           "Accuracy: greedy, on the same test problems for every run; the interval is Wilson's 95% score "
           "interval on the pooled count. Spread: max/min of run-level layer importance (layer norms averaged "
           "over captures), on LoRA gradients and on the rank-free G of the same watched modules. Chance levels "
           "(every layer the same share): spread 1, LoRA/G 1, top-30% share ceil(0.3 L)/L for L layers (0.300 at "
           "L = 30, 0.333 at L = 24). Placements are compared problem by problem in the paired table below.", "",
           "## Does the sqrt(r) effect show?", "", *[f"- {s}" for s in sqrt_r_verdict(rows)], "",
           "## Every run", "", runs_table(results), "",
           "Predicted LoRA spread at init: the gradrank scorer's expectation of max/min layer LoRA-gradient norm "
           "from its probe, s^2 r / (3 d_in) ||G||^2 per module under the run's ranks and alpha policy. "
           "corr and slope: log(I_lora / I_G) per layer against log r_l (NaN when every layer has the same rank).", ""]
    failed = [e for r in rows for e in (f"{r.placement} {x}" for x in r.errors)]
    if failed:
        out += ["## Failures", "", *[f"- {e}" for e in failed], ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out) + "\n"


def paired_against(per_arm: dict[str, list[dict[str, list[float]]]], baseline: str) -> list[dict]:
    """Each arm against ``baseline`` on the same test problems: per-seed 0/1 marks in, the paired
    difference of mean accuracy with its 95% CI (problems and seeds resampled) out."""
    from rl.diagnostics.confidence import paired_difference_ci

    base = per_arm.get(baseline) or []
    out = []
    for arm, runs in per_arm.items():
        if arm == baseline or not runs or not base:
            continue
        row = {"placement": arm, "baseline": baseline, "seeds": len(runs), "baseline_seeds": len(base)}
        for which in ("flexible", "strict"):
            ci = paired_difference_ci([r[which] for r in base], [r[which] for r in runs])
            row[which] = {"difference": ci.estimate, "low": ci.low, "high": ci.high, "problems": ci.n}
        out.append(row)
    return out


def paired_table(rows: list[dict]) -> str:
    if not rows:
        return "(no placement besides the baseline finished with a per-problem evaluation)"
    lines = [f"Accuracy minus {rows[0]['baseline']}'s on the same test problems, in points (95% CI over problems "
             "and seeds); a CI that excludes 0 is marked.", "",
             "| placement | seeds | problems | flexible difference [95% CI] | strict difference [95% CI] |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for which in ("flexible", "strict"):
            d = r[which]
            mark = " **" if d["low"] > 0 or d["high"] < 0 else ""
            cells.append(f"{mark}{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                         f"{mark.strip() and '**'}")
        lines.append(f"| {r['placement']} | {r['seeds']} | {r['flexible']['problems']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
