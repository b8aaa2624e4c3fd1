"""A placement plan as a human-readable report: a markdown file and a heatmap PNG.

The heatmap shows the scorer's per-module score by module type (rows) and layer
(columns), like the papers' figures, with the placed adapters outlined. The markdown
holds the summary (budget, time, trainable parameters against uniform), the
scorer-specific findings recorded in ``plan.details``, the score table and the
chosen placement.

Left out: comparisons across plans and training results (the compare command's job).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from core.lora import DEFAULT_TARGET_MODULES
from placement.modules import kind_of, layer_of
from placement.plan import PlacementPlan

LOG_SCALE = {"page", "page_topk", "gradrank", "gradrank_shuffled"}  # scores spanning orders of magnitude
SCORE_NAME = {"page": "PAGE", "page_topk": "PAGE", "plop": "NFN", "gradrank": "mean ||G||_F^2 per step",
              "gradrank_shuffled": "mean ||G||_F^2 per step",
              "bmask": "entries of B selected", "bmask_random": "entries of B selected"}


def score_matrix(plan: PlacementPlan) -> tuple[list[str], list[int], np.ndarray]:
    """(types, layers, scores[type, layer]) with NaN where a module has no score."""
    names = list(plan.scores) or plan.module_names()
    kinds = sorted({kind_of(n) for n in names}, key=lambda k: (DEFAULT_TARGET_MODULES.index(k) if k in DEFAULT_TARGET_MODULES else 99, k))
    layers = sorted({layer_of(n) for n in names})
    mat = np.full((len(kinds), len(layers)), np.nan)
    for n in names:
        mat[kinds.index(kind_of(n)), layers.index(layer_of(n))] = plan.scores.get(n, np.nan)
    return kinds, layers, mat


def heatmap(plan: PlacementPlan, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds, layers, mat = score_matrix(plan)
    log = plan.scorer in LOG_SCALE and np.nanmin(mat) > 0
    shown = np.log10(mat) if log else mat
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 0.42 * len(kinds) + 1.6), dpi=100)
    im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("layer")
    label = SCORE_NAME.get(plan.scorer, "score")
    fig.colorbar(im, ax=ax, label=f"log10 {label}" if log else label, fraction=0.03, pad=0.01)
    placed = set(plan.module_names())
    for i, k in enumerate(kinds):
        for j, l in enumerate(layers):
            if any(kind_of(n) == k and layer_of(n) == l for n in placed):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    ax.set_title(title or f"{plan.scorer}: {label} by module type and layer (red: placed)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _details_lines(plan: PlacementPlan) -> list[str]:
    d = plan.details
    out: list[str] = []
    if "top_module" in d:  # page
        kind = kind_of(d["top_module"])
        out += [f"Global top module: **{d['top_module']}**, {100 * d['top_share_total']:.1f}% of the total PAGE "
                f"over {len(plan.scores)} modules, {100 * d['top_share_in_type']:.1f}% of the PAGE of all {kind} modules."]
        if "dominant_module" in d:  # DomLoRA's choice is the top down_proj, which may differ
            out += ["", f"DomLoRA's dominant down projection: **{d['dominant_module']}**"
                        f"{' (also the global top)' if d['dominant_is_global_top'] else ''}."]
        out += ["", "Share of total PAGE by module type:", ""]
        out += _table(["type", "share"], [[k, f"{100 * v:.2f}%"] for k, v in
                                          sorted(d["type_share"].items(), key=lambda kv: -kv[1])])
        if "top_by_type" in d:
            out += ["", "Top module of each type:", ""]
            out += _table(["type", "module", "share of total PAGE", "share within its type"],
                          [[k, n, f"{100 * a:.2f}%", f"{100 * b:.1f}%"] for k, (n, a, b) in d["top_by_type"].items()])
        out += ["", "Top modules:", ""] + _table(["module", "share of total PAGE"],
                                                 [[n, f"{100 * s:.2f}%"] for n, s in d["top10"]])
    if "type_nfn" in d:  # plop
        out += ["PLoP type ranking (lowest NFN first; the lowest get adapters):", ""]
        out += _table(["rank", "type", "mean NFN over layers"],
                      [[i + 1, k, _fmt(d["type_nfn"][k])] for i, k in enumerate(d["ranking"])])
        out += ["", f"Chosen types: {', '.join(d['chosen_types'])}."]
    if "residual_writer_share" in d:  # bmask
        out += [f"Entries of B that train: {d['entries']}; share on residual-stream writers (o_proj, down_proj): "
                f"{100 * d['residual_writer_share']:.1f}%.", ""]
        out += _table(["type", "share of entries"], [[k, f"{100 * v:.1f}%"] for k, v in d["type_share"].items()])
    if "layer_importance" in d:  # gradrank
        sp, lg = d["importance_spread"], d["lora_grad_spread"]
        out += [f"Alpha policy: {d['alpha_policy']}. Layer importance max/min {sp['max_over_min']:.2f}x, top-30% "
                f"share {100 * sp['top30_share']:.1f}%; expected LoRA-gradient norm after allocation max/min "
                f"{lg['max_over_min']:.2f}x.", ""]
        out += _table(["layer", "importance", "rank"], [[l, f"{100 * v:.2f}%", d["layer_rank"][l]]
                                                        for l, v in d["layer_importance"].items()])
    return out


def markdown(plan: PlacementPlan, png_name: str | None = None, title: str = "", notes: list[str] = ()) -> str:
    trainable = plan.trainable_parameters()
    ranks = Counter(a.rank for a in plan.adapters)
    lines = [f"# {title or f'Placement report: {plan.scorer}'}", ""]
    lines += _table(["", ""], [
        ["model", plan.model or "?"], ["scorer", plan.scorer],
        ["budget", plan.budget or "empty (uniform: base rank; page, page_topk, plop, random: top_k units)"],
        ["alpha policy", plan.alpha_policy], ["adapters placed", len(plan.adapters)],
        ["ranks", ", ".join(f"{r} x{c}" for r, c in sorted(ranks.items()))],
        ["trainable parameters", f"{trainable:,}"],
        ["uniform baseline (same candidates)", f"{plan.baseline_params:,}"],
        ["trainable / uniform", f"{100 * trainable / plan.baseline_params:.3f}%" if plan.baseline_params else "?"],
        ["scoring time", f"{plan.seconds:.1f} s"]])
    lines += [""] + list(notes) + ([""] if notes else [])
    if png_name:
        lines += [f"![{plan.scorer} heatmap]({png_name})", ""]
    lines += _details_lines(plan)
    if plan.scores:
        kinds, layers, mat = score_matrix(plan)
        label = SCORE_NAME.get(plan.scorer, "score")
        if plan.scorer in ("page", "page_topk"):  # shares read better than raw energies
            mat, label = 100 * mat / np.nansum(mat), "% of total PAGE"
        lines += ["", f"Scores ({label}) by layer and module type:", ""]
        lines += _table(["layer"] + kinds, [[l] + [_fmt(mat[i, j]) for i in range(len(kinds))]
                                            for j, l in enumerate(layers)])
    lines += ["", "Chosen placement:", ""]
    if len(plan.adapters) <= 12:
        lines += _table(["module", "rank", "alpha"], [[a.module_name, a.rank, _fmt(a.alpha)] for a in plan.adapters])
    else:
        per_type = Counter(kind_of(a.module_name) for a in plan.adapters)
        lines += [f"{len(plan.adapters)} adapters: " + ", ".join(f"{k} x{c}" for k, c in per_type.items()) + "."]
    return "\n".join(lines) + "\n"


def write_report(plan: PlacementPlan, out_dir: str | Path, stem: str = "placement", title: str = "",
                 notes: list[str] = ()) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = heatmap(plan, out_dir / f"{stem}.png") if plan.scores else None
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(plan, png.name if png else None, title, notes))
    return {"markdown": md, **({"heatmap": png} if png else {})}
