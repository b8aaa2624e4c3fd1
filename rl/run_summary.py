"""The few lines a finished run ends with, and its reward curve, from ``metrics.jsonl`` alone.

A person who just ran a recipe wants to know: did it learn (accuracy on the fixed test
problems before and after, the training reward at the start and the end), where the
time went, and where everything was written. :func:`summarize` answers that from the
run folder, so it works for a finished run, a resumed one, or one read back later.
"""
from __future__ import annotations

import math
from pathlib import Path

from rl.metrics_log import read_metrics

CURVE = "reward_curve.png"
PHASES = (("rollout", "time/rollout_s"), ("reward", "time/reward_s"), ("learner", "time/learner_s"),
          ("sync", "time/sync_s"))


def _mean(values: list[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _evals(records: list[dict]) -> tuple[dict, dict]:
    """(first, last) records that hold an evaluation."""
    evals = [r for r in records if "eval/accuracy_flexible" in r]
    return (evals[0], evals[-1]) if len(evals) >= 2 else (evals[0] if evals else {}, {})


def step_times(records: list[dict]) -> dict[str, float]:
    """Mean seconds per phase over the training steps; the first step is left out when
    there are others (it pays one-off costs: the first adapter load, allocator warm-up)."""
    steps = [r for r in records if "time/step_s" in r]
    steps = steps[1:] if len(steps) > 1 else steps
    out = {name: _mean([r.get(key, float("nan")) for r in steps]) for name, key in PHASES}
    out["step"] = _mean([r["time/step_s"] for r in steps])
    # Overlapped rollouts (trainer.max_staleness > 0): the part of the rollout the driver waited for.
    out["rollout_wait"] = _mean([r.get("time/rollout_wait_s", float("nan")) for r in steps])
    out["overlapped"] = float(any(r.get("rollout/staleness", 0) > 0 for r in steps))
    # Streamed steps (trainer.stream_groups): their time/learner_s is only what ran after the rollout.
    out["streamed"] = float(any(r.get("rollout/stream_parts", 0) > 0 for r in steps))
    out["steps_averaged"] = float(len(steps))
    return out


def plot_reward_curve(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "reward/mean" in r]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in steps], [r["reward/mean"] for r in steps], marker="o", label="train reward")
    acc = [r for r in steps if "reward/gsm8k_flexible/mean" in r]
    if acc:
        ax.plot([r["step"] for r in acc], [r["reward/gsm8k_flexible/mean"] for r in acc], marker=".",
                linestyle="--", label="train accuracy")
    evals = [r for r in records if "eval/accuracy_flexible" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/accuracy_flexible"] for r in evals], marker="s",
                linestyle=":", label="test accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def summarize(run_dir: str | Path, title: str = "") -> str:
    """The summary text; also written to ``summary.txt`` with ``reward_curve.png`` beside it."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    first, last = _evals(records)
    train = [r for r in records if "reward/mean" in r]
    lines = [title] if title else []
    if first:
        n = int(first.get("eval/n", 0))
        lines.append(f"{'':24}{'before':>8}{'after':>8}")
        for label, key in (("test accuracy", "eval/accuracy_flexible"), ("  strict format", "eval/accuracy_strict")):
            lines.append(f"{label:24}{_fmt(first.get(key)):>8}{_fmt(last.get(key)):>8}")
        lines[-2] += f"   ({n} test problems, greedy)"
    if train:
        lines.append(f"{'train reward':24}{_fmt(train[0]['reward/mean']):>8}{_fmt(train[-1]['reward/mean']):>8}"
                     f"   (step {train[0]['step']} / step {train[-1]['step']})")
        if "reward/gsm8k_flexible/mean" in train[0]:
            lines.append(f"{'train accuracy':24}{_fmt(train[0]['reward/gsm8k_flexible/mean']):>8}"
                         f"{_fmt(train[-1]['reward/gsm8k_flexible/mean']):>8}")
    t = step_times(records)
    if math.isfinite(t["step"]):
        parts = ", ".join(f"{name} {t[name]:.1f} s" for name, _ in PHASES if math.isfinite(t[name]))
        if t["overlapped"] and math.isfinite(t["rollout_wait"]):
            parts += f" (rollout overlapped with learning: {t['rollout_wait']:.1f} s of it waited for)"
        if t["streamed"]:
            parts += " (groups streamed to the learner: its time is the learning left after the rollout)"
        lines.append(f"step time {t['step']:.1f} s: {parts} (mean of {int(t['steps_averaged'])} steps)")
    curve = plot_reward_curve(records, run_dir / CURVE) if records else None
    lines += [f"{'metrics':13}{run_dir / 'metrics.jsonl'}",
              f"{'tensorboard':13}{run_dir / 'tensorboard'}",
              f"{'checkpoints':13}{run_dir / 'checkpoints'}"]
    if curve:
        lines.append(f"{'reward curve':13}{curve}")
    text = "\n".join(lines)
    (run_dir / "summary.txt").write_text(text + "\n")
    return text
