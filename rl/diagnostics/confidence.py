"""Confidence intervals and chance levels for the experiments' statistics (pure functions).

- ``bootstrap_ci``: percentile bootstrap of a statistic of one sample (captures of one run).
- ``seed_capture_ci``: two-level bootstrap of the mean over seeds of each seed's mean over
  captures: seeds are resampled, then captures within each drawn seed. Captures of one run
  are not independent draws (they share a trajectory), so the seed level carries the
  between-run variation that a pooled bootstrap over captures would hide.
- ``seed_capture_difference_ci``: the same for arm minus base, seeds paired by position.
- ``paired_difference_ci``: accuracy of arm B minus arm A on the same test problems,
  resampling problems (the same indices for both arms, which is what pairs them) and,
  with several seeds, seeds of each arm.
- ``chance_level``: what a statistic would read if gradients were noise, where that is
  defined: 0 for cosines, 0.5 for sign agreement, E|S_T|/T for sign consistency over T
  captures, and the values of a perfectly even spread for the importance summaries.

Percentile intervals are used throughout: with 3 seeds they are wide and somewhat too
narrow (a bootstrap of 3 values can reach only 10 distinct means); the reports say n.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from rl.diagnostics.tensor_stats import TOP_SHARE_FRACTION, sign_consistency_chance, top_count

DEFAULT_RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int  # independent units at the top level (captures, seeds or problems)

    def excludes(self, value: float) -> bool:
        return not (self.low <= value <= self.high)

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.estimate):
            return "n/a"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v)


def _percentiles(draws: list[float], level: float) -> tuple[float, float]:
    draws = sorted(draws)
    lo_i = int(math.floor((1 - level) / 2 * (len(draws) - 1)))
    hi_i = int(math.ceil((1 + level) / 2 * (len(draws) - 1)))
    return draws[lo_i], draws[hi_i]


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def bootstrap_ci(values: Sequence[float], stat: Callable[[Sequence[float]], float] = _mean,
                 resamples: int = DEFAULT_RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``stat`` over ``values`` (NaNs left out)."""
    v = _finite(values)
    if not v:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    rng = random.Random(seed)
    draws = [stat([v[rng.randrange(len(v))] for _ in v]) for _ in range(resamples)]
    lo, hi = _percentiles(draws, level)
    return Interval(stat(v), lo, hi, len(v))


def seed_capture_ci(per_seed: Sequence[Sequence[float]], resamples: int = DEFAULT_RESAMPLES,
                    level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean over seeds of each seed's capture mean, with a seeds-then-captures bootstrap."""
    runs = [v for v in (_finite(s) for s in per_seed) if v]
    if not runs:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        picked = [runs[rng.randrange(len(runs))] for _ in runs]
        draws.append(_mean([_mean([r[rng.randrange(len(r))] for _ in r]) for r in picked]))
    lo, hi = _percentiles(draws, level)
    return Interval(_mean([_mean(r) for r in runs]), lo, hi, len(runs))


def seed_capture_difference_ci(base: Sequence[Sequence[float]], arm: Sequence[Sequence[float]],
                               resamples: int = DEFAULT_RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """``seed_capture_ci`` of ``arm`` minus that of ``base``, seeds paired by position (seed k of
    both arms shares the data order and initialisation): seed indices are drawn once for both,
    then captures within each run."""
    pairs = [(a, b) for a, b in ((_finite(x), _finite(y)) for x, y in zip(arm, base)) if a and b]
    if not pairs:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    rng = random.Random(seed)

    def draw_mean(r: list[float]) -> float:
        return _mean([r[rng.randrange(len(r))] for _ in r])

    draws = []
    for _ in range(resamples):
        picked = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        draws.append(_mean([draw_mean(a) - draw_mean(b) for a, b in picked]))
    lo, hi = _percentiles(draws, level)
    return Interval(_mean([_mean(a) - _mean(b) for a, b in pairs]), lo, hi, len(pairs))


def paired_difference_ci(base: Sequence[Sequence[float]], arm: Sequence[Sequence[float]],
                         resamples: int = DEFAULT_RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean accuracy of ``arm`` minus that of ``base``, each given as per-seed lists of per-problem
    scores (0/1) on the same problems in the same order. Problems are resampled jointly (one
    index set for every run of both arms); seeds of each arm are resampled independently."""
    if not base or not arm:
        raise ValueError("paired_difference_ci needs at least one seed of each arm")
    n = len(base[0])
    if n == 0 or any(len(r) != n for r in [*base, *arm]):
        raise ValueError(f"paired_difference_ci needs every run scored on the same {n} problems; "
                         f"got lengths {sorted({len(r) for r in [*base, *arm]})}")
    b, a = np.asarray(base, dtype=np.float64), np.asarray(arm, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        # Per problem: the mean over drawn seeds of the arm minus that of the base.
        diff = a[rng.integers(len(a), size=len(a))].mean(0) - b[rng.integers(len(b), size=len(b))].mean(0)
        draws.append(float(diff[rng.integers(n, size=n)].mean()))
    lo, hi = _percentiles(draws, level)
    return Interval(float(a.mean() - b.mean()), lo, hi, n)


def chance_level(stat: str, *, window: int | None = None, layers: int | None = None) -> float | None:
    """The value ``stat`` (a diagnostics metric name, or its ending) would take under noise, or
    None where no such level exists (norms, ranks). ``window``: captures in the sign-consistency
    window; ``layers``: layers in the importance summaries."""
    name = stat.rsplit("/", 1)[-1].removesuffix("_mean")
    if name.startswith("cos_lag"):
        return 0.0
    if name == "sign_agree":
        return 0.5
    if name == "sign_consistency":
        return sign_consistency_chance(window) if window else None
    if name == "importance_spread":
        return 1.0  # every layer the same share
    if name == "importance_gini":
        return 0.0
    if name == "importance_top30_share":
        return top_count(layers, TOP_SHARE_FRACTION) / layers if layers else None
    return None
