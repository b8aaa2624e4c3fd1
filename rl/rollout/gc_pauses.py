"""Time this process spent in Python's garbage collector while a block of code ran.

A rollout worker's process holds vLLM's engine, and a collection of the oldest generation walks
every tracked object of the heap that vLLM did not freeze at start-up, in whichever call happens
to trigger it (in a CPU worker serving SmolLM2, about 16,000 objects and 5 ms). The adapter sync
is timed stage by stage; this meter reports how much of a stage was the collector's, so that a
slow sync caused by a collection is told apart from a slow copy.
"""
from __future__ import annotations

import gc
import time


class GcPauses:
    """``with GcPauses() as pauses: ...``; afterwards ``pauses.seconds`` is the time spent in
    the collections that started inside the block and ``pauses.count`` their number."""

    def __init__(self) -> None:
        self.seconds, self.count = 0.0, 0
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:  # "stop" of a collection that started inside the block
            self.seconds += time.perf_counter() - self._started
            self.count += 1
            self._started = None

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)
