"""Where a rollout's seconds go inside vLLM's engine, engine step by engine step.

A rollout of the GPU recipe (32 prompts x 8 samples x up to 512 tokens) is one ``generate``
call of a few hundred engine steps, one per token of its longest completion: a first phase
with the whole batch running, then a tail of a handful of sequences while the longest ones
finish (reports/gpu/README.md 19 measures both). :class:`EngineStepTimer` wraps the
in-process engine's methods for the length of one call and records, for each engine step,
its wall time, the sequences it runs (the scheduler's running list once it has scheduled the
step), and its parts:

- ``schedule``: the scheduler choosing the step's work (``Scheduler.schedule``);
- ``update``: the scheduler taking the step's sampled tokens (``Scheduler.update_from_output``);
- ``execute``: the rest of the engine core's step, the model's forward and sampling on the
  GPU and the host's work around them (input preparation, the wait for the sampled tokens);
- ``outputs``: the front end turning the core's outputs into request outputs.

:func:`step_profile` summarises the records by how many sequences ran (pure). With vLLM's
async scheduling the core overlaps one step's scheduling with the previous step's execution,
so there the parts overlap and only the step's wall time reads as before.
"""
from __future__ import annotations

import statistics
import time

from rl.rollout.gc_pauses import GcPauses

# Buckets of running sequences: the full batch's first steps down to its last few samples.
BUCKETS = ((129, None), (33, 128), (9, 32), (1, 8))


def bucket_name(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else f"{low}-{high}"


def step_profile(steps: list[dict]) -> dict:
    """Per bucket of running sequences: the number of steps, their seconds and each part's
    median in milliseconds (pure). ``steps`` are :class:`EngineStepTimer` records."""
    out = {"steps": len(steps), "seconds": round(sum(s["total"] for s in steps), 3)}
    for low, high in BUCKETS:
        chosen = [s for s in steps if s["running"] >= low and (high is None or s["running"] <= high)]
        if not chosen:
            continue
        parts = {k: round(1e3 * statistics.median(s[k] for s in chosen), 3)
                 for k in ("total", "schedule", "execute", "update", "outputs")}
        out[bucket_name(low, high)] = {"steps": len(chosen), "seconds": round(sum(s["total"] for s in chosen), 3),
                                       "median_ms": parts}
    return out


class EngineStepTimer:
    """``with EngineStepTimer(llm.llm_engine) as timer: llm.generate(...)``; afterwards
    ``timer.steps`` holds one record per engine step that ran a batch and ``timer.gc.seconds``
    the collector's seconds inside the block. Needs vLLM's engine in this process."""

    def __init__(self, llm_engine) -> None:
        self.engine = llm_engine
        self.core = llm_engine.engine_core.engine_core  # the in-process client's EngineCore
        self.steps: list[dict] = []
        self.gc = GcPauses()
        self._patched: list[tuple[object, str]] = []
        self._current: dict = {}

    def _wrap(self, owner, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._current[key] = self._current.get(key, 0.0) + time.perf_counter() - t
                if key == "schedule":  # after scheduling: the step's first holds the new requests too
                    self._current["running"] = len(self.core.scheduler.running)

        setattr(owner, name, timed)
        self._patched.append((owner, name))

    def _step(self, inner):
        def timed_step(*args, **kwargs):
            self._current = {"running": 0}
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            c = self._current
            total = time.perf_counter() - t
            if c["running"]:  # steps with nothing to run (the loop's last poll) are left out
                core = c.get("core", 0.0)
                schedule, update = c.get("schedule", 0.0), c.get("update", 0.0)
                self.steps.append({"running": c["running"], "total": total, "schedule": schedule, "update": update,
                                   "execute": max(core - schedule - update, 0.0), "outputs": total - core})
            return out
        return timed_step

    def __enter__(self) -> "EngineStepTimer":
        scheduler = self.core.scheduler
        self._wrap(scheduler, "schedule", "schedule")
        self._wrap(scheduler, "update_from_output", "update")
        self._wrap(self.engine.engine_core, "get_output", "core")
        self.engine.step = self._step(self.engine.step)
        self._patched.append((self.engine, "step"))
        self.gc.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.gc.__exit__(*exc)
        for owner, name in self._patched:  # the instance attributes go; the class's methods serve again
            delattr(owner, name)
        self._patched.clear()
