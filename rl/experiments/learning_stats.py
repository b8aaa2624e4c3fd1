"""The statistics of a learning run: paired accuracy differences and the arm choice.

Every evaluation grades the same problems, so the change an arm makes over the base
model is measured per problem: ``d_i = arm_i - base_i`` in {-1, 0, 1}. Its mean is the
accuracy difference, and the normal interval on it (the paired, McNemar-style interval:
only the problems where the two disagree add variance) is much narrower than the
unpaired one from two independent proportions.

The arm is chosen on the validation split only (the last ``data.val_size`` train
problems, never trained on); test accuracy is reported for every arm but never used
to choose.
"""
from __future__ import annotations

import math

from rl.experiments.compare_report import Z95, wilson_interval

SELECTION_RULE = ("the arm with the highest validation flexible accuracy (mean over its seeds; "
                  "ties: higher validation strict accuracy, then the name); the test set is not "
                  "used to choose")


def paired_difference(base: list[int], arm: list[int], z: float = Z95) -> dict:
    """Mean of ``arm - base`` over the same problems (0/1 correctness each), with a normal CI.

    ``gained``: problems the arm solves and the base does not; ``lost``: the reverse.
    """
    if len(base) != len(arm):
        raise ValueError(f"paired_difference needs the same problems on both sides, got {len(base)} and {len(arm)}")
    n = len(base)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "diff": nan, "lo": nan, "hi": nan, "se": nan, "gained": 0, "lost": 0}
    gained = sum(1 for b, a in zip(base, arm) if a and not b)
    lost = sum(1 for b, a in zip(base, arm) if b and not a)
    diff = (gained - lost) / n
    # Sample variance of d: sum(d^2) = gained + lost.
    var = ((gained + lost) - n * diff * diff) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(max(var, 0.0) / n)
    return {"n": n, "diff": diff, "lo": diff - z * se, "hi": diff + z * se, "se": se,
            "gained": gained, "lost": lost}


def paired_records(base: list[dict], arm: list[dict], key: str) -> tuple[list[int], list[int]]:
    """The ``key`` correctness of two per-problem evaluations, matched by problem index."""
    by_index = {r["index"]: r for r in arm}
    if len(by_index) != len(base) or any(r["index"] not in by_index for r in base):
        raise ValueError("the two evaluations graded different problems; evaluate both on the same split and config")
    for r in base:
        if r["gold"] != by_index[r["index"]]["gold"]:
            raise ValueError(f"problem {r['index']} has gold {r['gold']!r} in one evaluation and "
                             f"{by_index[r['index']]['gold']!r} in the other; they are not the same problems")
    return [r[key] for r in base], [by_index[r["index"]][key] for r in base]


def accuracy_with_ci(records: list[dict], key: str) -> dict:
    """Accuracy of per-problem records and its Wilson 95% interval."""
    k, n = sum(r[key] for r in records), len(records)
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "correct": k, "n": n, "ci95": [lo, hi]}


def choose_arm(val_scores: dict[str, list[tuple[float, float]]]) -> str:
    """The arm by :data:`SELECTION_RULE`; ``val_scores[arm]`` = [(flexible, strict) per seed]."""
    scored = {a: v for a, v in val_scores.items() if v}
    if not scored:
        raise ValueError("no arm has a validation accuracy yet; evaluate at least one arm")

    def key(arm: str):
        v = scored[arm]
        return (-sum(f for f, _ in v) / len(v), -sum(s for _, s in v) / len(v), arm)

    return min(scored, key=key)
