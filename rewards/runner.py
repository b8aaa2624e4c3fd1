"""RewardRunner: score a batch with every configured reward, in parallel, isolated from failures.

The batch is cut into at most ``workers`` contiguous slices (on group boundaries when
``group_size`` is given, so a group-aware reward sees whole GRPO groups) and every
function runs on every slice as one call in the pool. A call that raises or passes
``timeout_s`` gives its samples None for that function and is counted; the first
traceback of each distinct error (function, exception type, raising line) is logged, later
ones only counted. A function that returns the wrong number of scores or a non-number
raises :class:`RewardError` naming it: that is a bug in the function, not bad luck.

The total is the weighted sum of the functions' scores. A None that a function *returns*
means "does not apply to this sample" and adds 0 (TRL's nansum). A score lost to a call
that raised, timed out or killed its worker is different: the answer was never graded, so
0 would be a made-up wrong answer that earns a negative advantage. Such a sample's total
is **NaN (missing)** whenever a function of non-zero weight failed on it; GRPO then leaves
it out of its group's statistics and gives it advantage 0 (``rl.grpo.group_advantages``),
and ``failed`` counts it. ``per_function`` keeps the Nones so that means exclude them.

Left out: caching scores across batches, and reward models (a neural reward is a function
like any other here, but batching it on a GPU is the trainer's business).
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

from rewards.pools import ProcessCalls, ThreadCalls
from rewards.registry import RewardError, RewardRef, prepare, resolve

log = logging.getLogger("rewards")


@dataclass
class RewardResult:
    """Scores of one batch: the weighted total and each function's own scores."""
    total: list[float]
    per_function: dict[str, list[float | None]]
    weights: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)  # samples that got None because a call raised
    timeouts: dict[str, int] = field(default_factory=dict)  # samples that got None because a call timed out
    seconds: dict[str, float] = field(default_factory=dict)  # summed call time per function
    leaked_threads: int = 0

    @classmethod
    def concat(cls, results: list["RewardResult"]) -> "RewardResult":
        """The results of consecutive parts of one batch as one result, samples in order."""
        def summed(name: str) -> dict:
            out: dict = {}
            for r in results:
                for k, v in getattr(r, name).items():
                    out[k] = out.get(k, 0) + v
            return out

        first = results[0]
        return cls([t for r in results for t in r.total],
                   {k: [s for r in results for s in r.per_function[k]] for k in first.per_function},
                   dict(first.weights), summed("errors"), summed("timeouts"), summed("seconds"),
                   sum(r.leaked_threads for r in results))

    @property
    def failed(self) -> int:
        """Samples whose total is missing (NaN) because a weighted reward call failed on them."""
        return sum(math.isnan(t) for t in self.total)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat metrics for the run logger: per-function mean, None share, errors, timeouts; total mean/std."""
        nan = float("nan")
        scored = [t for t in self.total if not math.isnan(t)]
        m = {f"{prefix}total/mean": statistics.fmean(scored) if scored else nan,
             f"{prefix}total/std": statistics.pstdev(scored) if scored else nan,
             f"{prefix}failed_samples": float(len(self.total) - len(scored))}
        for label, scores in self.per_function.items():
            vals = [s for s in scores if s is not None]
            m[f"{prefix}{label}/mean"] = statistics.fmean(vals) if vals else nan
            m[f"{prefix}{label}/none_frac"] = (len(scores) - len(vals)) / len(scores) if scores else nan
            m[f"{prefix}{label}/errors"] = float(self.errors.get(label, 0))
            m[f"{prefix}{label}/timeouts"] = float(self.timeouts.get(label, 0))
            m[f"{prefix}{label}/seconds"] = float(self.seconds.get(label, 0.0))
        m[f"{prefix}leaked_threads"] = float(self.leaked_threads)
        return m


def _labels(refs: list[RewardRef]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for r in refs:
        seen[r.label] = seen.get(r.label, 0) + 1
        out.append(r.label if seen[r.label] == 1 else f"{r.label}_{seen[r.label]}")
    return out


def _slices(n: int, parts: int, group_size: int) -> list[tuple[int, int]]:
    groups = -(-n // group_size)
    parts = max(1, min(parts, groups))
    bounds = [min(n, round(i * groups / parts) * group_size) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class RewardRunner:
    """Runs configured reward functions over batches; see the module docstring for the rules."""

    def __init__(self, functions: list[dict], timeout_s: float = 10.0, workers: int = 4,
                 executor: str = "thread", group_size: int = 1, where: str = "reward.functions"):
        if executor not in ("thread", "process"):
            raise RewardError(f"reward.executor={executor!r} is not allowed; choose thread or process")
        if timeout_s <= 0 or workers < 1 or group_size < 1:
            raise RewardError(f"reward.timeout_s={timeout_s}, workers={workers}, group_size={group_size}: "
                              "need timeout_s > 0, workers >= 1, group_size >= 1")
        if not functions:
            raise RewardError(f"{where} is empty; name at least one reward")
        refs, weights = [], []
        for i, spec in enumerate(functions):
            spec = spec if isinstance(spec, dict) else {"name": spec}
            weight = spec.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RewardError(f"{where}[{i}].weight={weight!r} is not a finite number")
            refs.append(resolve(spec.get("name"), spec.get("kwargs"), where=f"{where}[{i}].name"))
            weights.append(float(weight))
        labels = _labels(refs)
        self.refs = [RewardRef(lab, r.target, r.kwargs, r.factory) for lab, r in zip(labels, refs)]
        self.weights = dict(zip(labels, weights))
        self.timeout_s, self.workers, self.group_size = float(timeout_s), int(workers), int(group_size)
        self.executor = executor
        preps = [prepare(r) for r in self.refs]  # factory kwargs are checked here, in the parent
        self._pool = ThreadCalls(preps, workers) if executor == "thread" else ProcessCalls(self.refs, workers)
        self._logged: set[tuple] = set()
        self.error_counts = {lab: 0 for lab in labels}  # cumulative, over the runner's life
        self.timeout_counts = {lab: 0 for lab in labels}

    @classmethod
    def from_config(cls, cfg, group_size: int = 1) -> "RewardRunner":
        """Build from ``rl.config.RewardConfig`` (functions, timeout_s, workers, executor)."""
        return cls(cfg.functions, cfg.timeout_s, cfg.workers, cfg.executor, group_size=group_size)

    @property
    def labels(self) -> list[str]:
        return list(self.weights)

    def score(self, prompts: list, completions: list, columns: dict[str, list] | None = None,
              completion_ids: list[list[int]] | None = None) -> RewardResult:
        """Score one batch. ``columns`` are dataset columns aligned with ``completions``; token ids
        (needed by token-length rewards) come as ``completion_ids`` or a column of that name."""
        columns = dict(columns or {})
        if completion_ids is None:
            completion_ids = columns.pop("completion_ids", None)
        n = len(completions)
        lengths = {"prompts": len(prompts), **{f"columns[{k!r}]": len(v) for k, v in columns.items()}}
        if completion_ids is not None:
            lengths["completion_ids"] = len(completion_ids)
        for what, m in lengths.items():
            if m != n:
                raise RewardError(f"RewardRunner.score: {what} has {m} entries for {n} completions; "
                                  "pass one per completion")
        labels = self.labels
        per = {lab: [None] * n for lab in labels}
        failed = [False] * n  # a weighted function's call raised or timed out on this sample
        errors, timeouts, seconds = dict.fromkeys(labels, 0), dict.fromkeys(labels, 0), dict.fromkeys(labels, 0.0)
        calls, where = [], []
        for a, b in _slices(n, self.workers, self.group_size) if n else []:
            payload = (prompts[a:b], completions[a:b], {k: v[a:b] for k, v in columns.items()},
                       None if completion_ids is None else completion_ids[a:b])
            for idx in range(len(labels)):
                calls.append((idx, payload))
                where.append((idx, a, b))
        outcomes = self._pool.run(calls, self.timeout_s) if calls else []
        for (idx, a, b), out in zip(where, outcomes):
            lab = labels[idx]
            if out[0] == "ok":
                per[lab][a:b] = out[1]
                seconds[lab] += out[2]
            elif out[0] == "bad":
                raise RewardError(out[1])
            elif out[0] == "timeout":
                timeouts[lab] += b - a
                failed[a:b] = [f or self.weights[lab] != 0 for f in failed[a:b]]
                self._log_once((lab, "timeout"), f"reward function {lab!r} took longer than timeout_s="
                               f"{self.timeout_s:g} on a call of {b - a} completions; they get None "
                               "(later timeouts are counted, not logged)")
            else:
                _, etype, msg, tb, site = out
                errors[lab] += b - a
                failed[a:b] = [f or self.weights[lab] != 0 for f in failed[a:b]]
                self._log_once((lab, etype, site), f"reward function {lab!r} raised {etype}: {msg}; its "
                               f"{b - a} completions get None (this error is logged once, then counted)\n{tb}")
        for lab in labels:
            self.error_counts[lab] += errors[lab]
            self.timeout_counts[lab] += timeouts[lab]
        total = [math.nan if failed[i] else
                 sum(self.weights[lab] * per[lab][i] for lab in labels if per[lab][i] is not None)
                 for i in range(n)]
        return RewardResult([float(t) for t in total], per, dict(self.weights), errors, timeouts, seconds,
                            self._pool.leaked)

    def _log_once(self, key: tuple, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_once(functions: list[dict | str | Callable], prompts: list, completions: list,
               columns: dict | None = None, **runner_kwargs) -> RewardResult:
    """Convenience for notebooks and tests: build a runner, score one batch, close it."""
    with RewardRunner(functions, **runner_kwargs) as runner:
        return runner.score(prompts, completions, columns)
