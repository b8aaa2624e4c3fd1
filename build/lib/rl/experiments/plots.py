"""PNG plots for the regime and compare reports (matplotlib, Agg backend: no display needed).

Each function writes one small figure (low dpi, a few tens of kilobytes: the reports
are committed) and returns its file name relative to the report folder, so that the
markdown can link it.

Left out: interactive output and styling beyond legibility.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rl.diagnostics import records as dr  # noqa: E402
from rl.experiments.compare_report import PlacementRow, RunResult  # noqa: E402

DPI = 72
REGIME_STATS = (("eff_rank_mean", "effective rank"), ("stable_rank_mean", "stable rank"),
                ("cos_lag1_mean", "cosine with previous capture"), ("sign_agree_mean", "sign agreement"),
                ("importance_spread", "importance max/min"))
COLORS = {"sft": "tab:blue", "grpo": "tab:red"}


def _save(fig, out_dir: Path, name: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=DPI)
    plt.close(fig)
    return name


def regime_statistics(sft: list[dict], grpo: list[dict], out_dir: Path, name: str = "regime_statistics.png") -> str:
    """Each statistic over training steps, SFT against GRPO, for G (top row) and LoRA gradients (bottom)."""
    fig, axes = plt.subplots(2, len(REGIME_STATS), figsize=(3.2 * len(REGIME_STATS), 5.4), squeeze=False)
    for row, kind in enumerate(dr.KINDS):
        for col, (key, label) in enumerate(REGIME_STATS):
            ax = axes[row][col]
            for regime, recs in (("sft", sft), ("grpo", grpo)):
                pts = [(s, v) for s, v in dr.series(recs, kind, key) if math.isfinite(v)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=COLORS[regime], label=regime.upper())
            if key == "importance_spread":
                ax.set_yscale("log")
            ax.set_title(f"{'G' if kind == 'G' else 'LoRA'}: {label}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    return _save(fig, out_dir, name)


def regime_importance(sft: list[dict], grpo: list[dict], out_dir: Path, name: str = "regime_importance.png") -> str:
    """Per-layer share of the run-mean gradient norm, SFT against GRPO, for G and LoRA gradients."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), squeeze=False)
    for col, kind in enumerate(dr.KINDS):
        ax = axes[0][col]
        for regime, recs in (("sft", sft), ("grpo", grpo)):
            imp = dr.run_importance(recs, kind)
            if imp is None:
                continue
            layers = sorted(imp.shares, key=dr.layer_index)
            ax.plot([dr.layer_index(layer) for layer in layers], [imp.shares[layer] for layer in layers],
                    marker="o", ms=3, color=COLORS[regime],
                    label=f"{regime.upper()} (max/min {imp.spread:.2f}x)")
        ax.set_title(f"{'G' if kind == 'G' else 'LoRA gradient'}: layer importance I_l", fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, name)


def compare_accuracy(rows: list[PlacementRow], out_dir: Path, name: str = "compare_accuracy.png") -> str:
    """Flexible and strict accuracy per placement with Wilson 95% intervals, and the late-step reward."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), squeeze=False)
    ax = axes[0][0]
    xs = range(len(rows))
    for off, which, color in ((-0.2, "flexible", "tab:green"), (0.2, "strict", "tab:gray")):
        acc = [r.accuracy(which) for r in rows]
        lo = [a - r.interval(which)[0] if r.n else 0 for a, r in zip(acc, rows)]
        hi = [r.interval(which)[1] - a if r.n else 0 for a, r in zip(acc, rows)]
        ax.bar([x + off for x in xs], [0 if math.isnan(a) else a for a in acc], width=0.4, color=color,
               yerr=[lo, hi], capsize=3, label=which)
    ax.set_xticks(list(xs), [r.placement for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (95% CI)", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.bar(list(xs), [0 if math.isnan(r.reward_last) else r.reward_last for r in rows], color="tab:purple")
    ax.set_xticks(list(xs), [r.placement for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("reward, mean of last steps", fontsize=8)
    return _save(fig, out_dir, name)


def compare_spread(rows: list[PlacementRow], out_dir: Path, name: str = "compare_spread.png") -> str:
    """Layer-importance max/min per placement, measured on LoRA gradients and on G."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(rows))
    for off, attr, label, color in ((-0.2, "spread_lora", "LoRA gradients", "tab:orange"),
                                    (0.2, "spread_G", "G (rank-free)", "tab:blue")):
        vals = [getattr(r, attr) for r in rows]
        ax.bar([x + off for x in xs], [v if math.isfinite(v) else 0 for v in vals], width=0.4, color=color, label=label)
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xticks(list(xs), [r.placement for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("importance max/min", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, name)


def compare_rank_shift(results: list[RunResult], out_dir: Path, name: str = "compare_rank_shift.png") -> str | None:
    """Per layer: assigned rank against log(I_lora / I_G), one colour per run with unequal ranks."""
    runs = [r for r in results if r.ok and r.fit is not None and r.fit.points and math.isfinite(r.fit.slope)]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ranks, shifts = zip(*r.fit.points)
        ax.scatter(ranks, shifts, s=12, label=f"{r.placement} s{r.seed} (slope {r.fit.slope:+.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("assigned rank r_l (log scale)", fontsize=8)
    ax.set_ylabel("log(I_lora / I_G)", fontsize=8)
    ax.set_title("importance shift against rank (sqrt(r) theory: slope +0.5 proportional, -0.5 fixed)", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, name)
