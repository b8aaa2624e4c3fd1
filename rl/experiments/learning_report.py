"""The learning run's report: ``summary.json``, a README table and the reward curves.

``summary.json`` is machine-readable: ``model``, ``n_test``, ``n_val``, ``steps``,
``base`` (``flexible``, ``strict`` on the test set, Wilson 95% intervals, val
accuracies) and ``arms``: per arm its ``seeds`` and, per seed in the same order, the
test ``flexible`` and ``strict`` accuracies after training (fractions in [0, 1]),
their intervals, the val accuracies and the paired difference against the base model
on the same test problems (per seed: a normal interval; pooled over seeds: a
bootstrap). ``selection`` names the rule and the chosen arm (chosen on val only),
``command`` the command that wrote the report and ``commands`` those that made each
result.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from rl.experiments.learning import read_json, read_jsonl
from rl.experiments.learning_stats import (SELECTION_RULE, accuracy_with_ci, choose_arm, paired_difference,
                                           paired_records)

KINDS = ("flexible", "strict")


def _problems(folder: Path, split: str) -> list[dict]:
    path = folder / f"problems-{split}.jsonl"
    return read_jsonl(path) if path.exists() else []


def _last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last one written (a step redone after a resume replaces the first)."""
    by_step = {m["step"]: m for m in records}
    return [by_step[s] for s in sorted(by_step) if s > 0]


def arm_seed_entry(folder: Path, base_test: list[dict]) -> dict | None:
    """The figures of one evaluated (arm, seed) folder; None when it has no evaluation yet."""
    ev = read_json(folder / "eval.json")
    if ev is None:
        return None
    test, val = _problems(folder, "test"), _problems(folder, "val")
    entry = {"seed": ev["seed"], "steps": ev["steps"], "test": {}, "val": {}, "paired_vs_base": {}}
    for kind in KINDS:
        entry["test"][kind] = accuracy_with_ci(test, kind)
        if val:
            entry["val"][kind] = accuracy_with_ci(val, kind)["accuracy"]
        if base_test:
            entry["paired_vs_base"][kind] = paired_difference(*paired_records(base_test, test, kind))
    entry["command"] = (read_json(folder / "arm.json") or {}).get("command", "")
    entry["overrides"] = ev.get("overrides", [])
    return entry


def pooled_difference(ref_runs: list[list[dict]], arm_runs: list[list[dict]]) -> dict:
    """Mean test accuracy over ``arm_runs`` minus that over ``ref_runs`` (each a seed's per-problem
    records, matched to the first reference run by problem), with the bootstrap 95% CI that
    resamples problems jointly and each side's seeds (rl.diagnostics.confidence)."""
    from rl.diagnostics.confidence import paired_difference_ci

    out = {}
    for kind in KINDS:
        refs = [paired_records(ref_runs[0], r, kind)[1] for r in ref_runs]
        arms = [paired_records(ref_runs[0], r, kind)[1] for r in arm_runs]
        ci = paired_difference_ci(refs, arms)
        out[kind] = {"diff": ci.estimate, "lo": ci.low, "hi": ci.high, "n": ci.n, "seeds": len(arms),
                     "reference_seeds": len(refs)}
    return out


def pooled_vs_base(base_test: list[dict], seed_folders: list[Path]) -> dict:
    """The arm's mean test accuracy over its seeds minus the base model's."""
    return pooled_difference([base_test], [_problems(f, "test") for f in seed_folders])


def paired_vs_reference(seed_folders: dict[int, Path], ref_folders: dict[int, Path]) -> dict:
    """An arm against the reference arm on the same test problems: per shared seed a paired
    normal interval, and over all seeds :func:`pooled_difference`."""
    per_seed = {}
    for seed in sorted(set(seed_folders) & set(ref_folders)):
        ref, arm = _problems(ref_folders[seed], "test"), _problems(seed_folders[seed], "test")
        per_seed[str(seed)] = {kind: paired_difference(*paired_records(ref, arm, kind)) for kind in KINDS}
    return {"per_seed": per_seed, "pooled": pooled_difference([_problems(f, "test") for f in ref_folders.values()],
                                                              [_problems(f, "test") for f in seed_folders.values()])}


def build_summary(out: Path, command: str, reference: str = "") -> dict:
    """The report's numbers from a results folder (see the module docstring for the shape)."""
    out = Path(out)
    base_ev = read_json(out / "base" / "eval.json")
    if base_ev is None:
        raise FileNotFoundError(f"{out / 'base' / 'eval.json'} is missing; run `placerl learn base` first")
    base_test, base_val = _problems(out / "base", "test"), _problems(out / "base", "val")
    summary = {"model": base_ev.get("model", ""), "n_test": len(base_test), "n_val": len(base_val), "steps": None,
               "base": {}, "arms": {}, "incomplete": [], "selection": {}, "command": command,
               "commands": {"base": base_ev.get("command", ""), "arms": {}}}
    for kind in KINDS:
        b = accuracy_with_ci(base_test, kind)
        summary["base"][kind] = b["accuracy"]
        summary["base"][f"{kind}_ci95"] = b["ci95"]
        if base_val:
            summary["base"][f"val_{kind}"] = accuracy_with_ci(base_val, kind)["accuracy"]
    for arm_folder in sorted((out / "arms").glob("*")) if (out / "arms").is_dir() else []:
        seeds = sorted(arm_folder.glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
        entries = []
        for s in seeds:
            e = arm_seed_entry(s, base_test)
            if e is None:
                summary["incomplete"].append(f"{arm_folder.name}/{s.name}")
            else:
                entries.append(e)
        if not entries:
            continue
        arm = {"seeds": [e["seed"] for e in entries], "steps": [e["steps"] for e in entries],
               "overrides": entries[0]["overrides"]}
        for kind in KINDS:
            arm[kind] = [e["test"][kind]["accuracy"] for e in entries]
            arm[f"{kind}_ci95"] = [e["test"][kind]["ci95"] for e in entries]
            arm[f"val_{kind}"] = [e["val"].get(kind) for e in entries]
            arm[f"paired_vs_base_{kind}"] = [e["paired_vs_base"].get(kind) for e in entries]
        if base_test:
            arm["paired_vs_base_pooled"] = pooled_vs_base(base_test, [s for s in seeds if (s / "eval.json").exists()])
        summary["arms"][arm_folder.name] = arm
        summary["commands"]["arms"][arm_folder.name] = [e["command"] for e in entries]
    if reference and reference in summary["arms"]:
        evaluated = {a: {int(f.parent.name.split("-")[1]): f.parent for f in (out / "arms" / a).glob("seed-*/eval.json")}
                     for a in summary["arms"]}
        summary["reference"] = reference
        ref_steps = set(summary["arms"][reference]["steps"])
        for name, arm in summary["arms"].items():
            # Only at equal steps: an arm trained longer (or on another schedule) is not a placement contrast.
            if name != reference and set(arm["steps"]) == ref_steps:
                arm[f"paired_vs_{reference}"] = paired_vs_reference(evaluated[name], evaluated[reference])
    elif reference:
        raise ValueError(f"--reference {reference!r} has no evaluated seed under {out / 'arms'}; "
                         f"evaluated arms: {', '.join(summary['arms']) or 'none'}")
    if summary["arms"]:
        val_scores = {a: [(f, s) for f, s in zip(v["val_flexible"], v["val_strict"]) if f is not None]
                      for a, v in summary["arms"].items()}
        chosen = choose_arm(val_scores) if any(val_scores.values()) else None
        summary["selection"] = {"rule": SELECTION_RULE if chosen else "no val split: nothing chosen",
                                "split": "val", "n_val": len(base_val), "chosen": chosen}
        ref = summary["arms"][chosen] if chosen else next(iter(summary["arms"].values()))
        summary["steps"] = ref["steps"][0]
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _diff(d: dict) -> str:
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def readme(summary: dict, plot: str | None) -> str:
    """A short markdown report: one table row per arm and seed, the choice, the commands."""
    b, n, nv = summary["base"], summary["n_test"], summary["n_val"]
    chosen = summary["selection"].get("chosen")
    lines = [f"# Learning GSM8K with GRPO: {Path(summary['model']).name}", "",
             f"Greedy accuracy (%) on all {n} GSM8K test problems and on {nv} validation problems (the last "
             f"{nv} of the train split, never trained on); 95% intervals: Wilson for accuracies, paired normal "
             "(per problem, against the base model) for differences. The arm is chosen on validation "
             "accuracy only; test accuracy is reported for every arm.", "",
             "| arm | seed | steps | val flexible | test flexible [95% CI] | test strict [95% CI] "
             "| flexible vs base [95% CI] | strict vs base [95% CI] |",
             "|---|---|---|---|---|---|---|---|",
             f"| base | - | 0 | {_pct(b['val_flexible']) if 'val_flexible' in b else '-'} | {_pct(b['flexible'])} "
             f"{_ci(b['flexible_ci95'])} | {_pct(b['strict'])} {_ci(b['strict_ci95'])} | - | - |"]
    for name, a in summary["arms"].items():
        for i, seed in enumerate(a["seeds"]):
            diffs = []
            for kind in KINDS:
                d = a[f"paired_vs_base_{kind}"][i]
                diffs.append(_diff(d) if d else "-")
            val = a["val_flexible"][i]
            mark = " (chosen)" if name == chosen else ""
            lines.append(f"| {name}{mark} | {seed} | {a['steps'][i]} | {_pct(val) if val is not None else '-'} | "
                         f"{_pct(a['flexible'][i])} {_ci(a['flexible_ci95'][i])} | {_pct(a['strict'][i])} "
                         f"{_ci(a['strict_ci95'][i])} | {diffs[0]} | {diffs[1]} |")
    for name, a in summary["arms"].items():
        p = a.get("paired_vs_base_pooled", {}).get("flexible")
        if p and p["seeds"] > 1:
            lines.append(f"\n{name}, mean over {p['seeds']} seeds: flexible vs base {100 * p['diff']:+.1f} "
                         f"[{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}] (bootstrap over problems and seeds)")
    ref = summary.get("reference")
    if ref:
        lines += ["", f"Against `{ref}` at equal steps ({', '.join(map(str, sorted(set(summary['arms'][ref]['steps']))))}), "
                  "test accuracy (points): per seed the paired normal 95% interval on the same problems, and the "
                  "mean over seeds with the bootstrap over problems and each arm's seeds.", "",
                  "| arm | flexible, per seed | flexible, mean over seeds | strict, mean over seeds |", "|---|---|---|---|"]
        for name, a in summary["arms"].items():
            c = a.get(f"paired_vs_{ref}")
            if not c:
                continue
            per_seed = "; ".join(f"s{s} {_diff(d['flexible'])}" for s, d in c["per_seed"].items())
            pooled = [f"{_diff(c['pooled'][k])} ({c['pooled'][k]['seeds']} vs {c['pooled'][k]['reference_seeds']} seeds)"
                      for k in KINDS]
            lines.append(f"| {name} | {per_seed or '-'} | {pooled[0]} | {pooled[1]} |")
    lines += ["", f"Selection: {summary['selection'].get('rule', 'no arm evaluated yet')}. "
              f"Chosen: {chosen or '-'}."]
    if summary["incomplete"]:
        lines.append(f"Not yet evaluated (left out above): {', '.join(summary['incomplete'])}.")
    if plot:
        lines += ["", f"![mean reward per step]({plot})"]
    lines += ["", "Commands:", "", f"- report: `{summary['command']}`",
              f"- base: `{summary['commands']['base']}`"]
    for name, cmds in summary["commands"]["arms"].items():
        for c, seed in zip(cmds, summary["arms"][name]["seeds"]):
            lines.append(f"- {name} seed {seed}: `{c}`")
    lines += ["", "Arm overrides: " + "; ".join(f"{k}: {' '.join(v['overrides']) or '(recipe)'}"
                                             for k, v in summary["arms"].items())]
    return "\n".join(lines) + "\n"


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_rewards(out: Path, path: Path, title: str, window: int = 5) -> bool:
    """Mean reward per step, smoothed over ``window`` steps (a step's batch is 16 prompts, so one
    step is noisy), one colour per arm and one line style per seed, from each run's metrics.jsonl."""
    from rl.metrics_log import read_metrics

    curves = {}
    for run in sorted(Path(out).glob("arms/*/seed-*/run")):
        if (run / "metrics.jsonl").exists():
            steps = [m for m in _last_per_step(read_metrics(run)) if isinstance(m.get("reward/mean"), (int, float))]
            if steps:
                curves[(run.parent.parent.name, run.parent.name)] = (
                    [m["step"] for m in steps], moving_mean([m["reward/mean"] for m in steps], window))
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({a for a, _ in curves})
    seeds = sorted({s for _, s in curves})
    colours = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (arm, seed), (x, y) in curves.items():
        ax.plot(x, y, color=colours(arms.index(arm)), linestyle=styles[seeds.index(seed) % len(styles)],
                label=f"{arm} {seed}", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"mean reward ({window}-step moving mean)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, report: Path, command: str, reference: str = "") -> dict:
    """summary.json, README.md, reward_curves.png and the per-problem correctness under ``report``."""
    summary = build_summary(out, command, reference)
    report = Path(report)
    report.mkdir(parents=True, exist_ok=True)
    (report / "summary.json").write_text(json.dumps(summary, indent=1))
    plot = "reward_curves.png" if plot_rewards(out, report / "reward_curves.png",
                                               f"GSM8K GRPO, {Path(summary['model']).name}") else None
    (report / "README.md").write_text(readme(summary, plot))
    problems = report / "problems"
    problems.mkdir(exist_ok=True)
    sources = [(Path(out) / "base", "base")] + [(p, f"{p.parent.name}-{p.name}")
                                                for p in sorted(Path(out).glob("arms/*/seed-*"))]
    for folder, label in sources:
        for split in ("val", "test"):
            src = folder / f"problems-{split}.jsonl"
            if src.exists():
                shutil.copyfile(src, problems / f"{label}-{split}.jsonl")
    return summary
