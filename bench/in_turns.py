"""Timing a benchmark's parts in turns, round after round, so that all see the same noisy machine."""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable


def wall_seconds(name: str, fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_in_turns(parts: dict[str, Callable[[], object]], rounds: int,
                  timer: Callable[[str, Callable], float] = wall_seconds) -> dict[str, list[float]]:
    """Each part once as a warm-up, then ``rounds`` rounds of every part in turn; the seconds
    ``timer(name, fn)`` gave each part in each round."""
    for fn in parts.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            seconds[name].append(timer(name, fn))
    return seconds


def medians_ms(seconds: dict[str, list[float]], digits: int = 3) -> dict[str, float]:
    return {f"{name}_ms": round(1e3 * statistics.median(s), digits) for name, s in seconds.items()}


def report(result: dict, out: str = "") -> None:
    """Print ``result`` as JSON, and write it to ``out`` when given."""
    print(json.dumps(result, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
