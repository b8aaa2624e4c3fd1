"""Greedy GSM8K-style accuracy through the rollout workers (base model or current adapter)."""
from __future__ import annotations

from rl.config import RewardConfig

EVAL_REWARDS = [{"name": "gsm8k_strict", "weight": 0.0}, {"name": "gsm8k_flexible", "weight": 1.0}]


def eval_runner(timeout_s: float = 10.0):
    from rewards import RewardRunner

    return RewardRunner.from_config(RewardConfig(functions=EVAL_REWARDS, timeout_s=timeout_s))


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous chunks whose sizes differ by at most one (order kept)."""
    k, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + k + (i < r)
        out.append(items[start:end])
        start = end
    return out


def graded(rows: list[dict], completions: list[str], runner) -> dict[str, list[float]]:
    """Per problem, in row order: 1.0 or 0.0 under ``strict`` and ``flexible`` grading (what paired
    comparisons between runs on the same problems need)."""
    result = runner.score([r["prompt"] for r in rows], completions,
                          {k: [r[k] for r in rows] for k in ("question", "answer", "gold")})
    return {name.split("_")[1]: [float(s or 0.0) for s in result.per_function[name]]
            for name in ("gsm8k_strict", "gsm8k_flexible")}


def accuracy(rows: list[dict], completions: list[str], runner,
             per_problem: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Strict and flexible accuracy of one completion per row (pure scoring, no generation);
    ``per_problem``: the ``graded`` lists, when the caller has them already."""
    marks = per_problem if per_problem is not None else graded(rows, completions, runner)
    out = {"n": float(len(rows))}
    for which, scores in marks.items():
        out[f"accuracy_{which}"] = sum(scores) / max(1, len(scores))
    out["response_chars"] = sum(len(c) for c in completions) / max(1, len(completions))
    return out
