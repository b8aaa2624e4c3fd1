"""One call of one reward function on one slice of a batch, as a worker thread or process runs it.

Everything that happens inside the worker lives here: building the keyword arguments TRL's
way (``prompts``, ``completions``, ``completion_ids`` and every dataset column, all by
keyword), adapting completions to TRL's conversational format when asked, dropping columns
a function without ``**kwargs`` does not name, awaiting async functions, checking the
return value and catching whatever the function raises. The outcome is a plain tuple so
that it pickles back from a process worker:

* ``("ok", scores, seconds)`` with ``scores`` a list of float or None,
* ``("bad", message)``: the function returned something that is not one score per completion,
* ``("error", exc_type, message, traceback_text, site)``: it raised (site = file:line it raised at).

The parent adds ``("timeout",)`` itself. Left out: retrying a failed call (a reward that
fails once usually fails again, and a retry doubles the time lost).
"""
from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import time
import traceback

from rewards.registry import PreparedReward

TIMEOUT = ("timeout",)


async def _await(aw):
    return await aw


def invoke(prep: PreparedReward, prompts: list, completions: list, columns: dict, completion_ids=None):
    """Call the reward TRL's way and return its raw result (awaited if it was async)."""
    if prep.as_messages:
        prompts = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        completions = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]
    kw = {"prompts": prompts, "completions": completions, **columns}
    if completion_ids is not None:
        kw["completion_ids"] = completion_ids
    kw.update(prep.call_kwargs)
    if prep.accepts is not None:
        kw = {k: v for k, v in kw.items() if k in prep.accepts}
    out = prep.fn(**kw)
    if inspect.isawaitable(out):
        # Worker threads and processes have no running loop, so each async call gets its own.
        out = asyncio.run(_await(out))
    return out


class RewardReturnError(ValueError):
    """Raised inside the worker when a return value is malformed; travels back as a "bad" outcome."""


def check_scores(label: str, out, n: int) -> list[float | None]:
    """One float (or None) per completion, or a RewardReturnError naming the function."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
        raise RewardReturnError(f"reward function {label!r} returned a {type(out).__name__}; "
                                f"return a list of {n} floats (or None)")
    values = list(out.tolist() if hasattr(out, "tolist") else out)
    if len(values) != n:
        raise RewardReturnError(f"reward function {label!r} returned {len(values)} scores for {n} completions; "
                                "return one score (float or None) per completion")
    scores: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            scores.append(None)
            continue
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()  # numpy / torch scalars
        if not isinstance(v, numbers.Real):
            raise RewardReturnError(f"reward function {label!r} returned {type(v).__name__} {v!r:.40} at index {i}; "
                                    "scores must be numbers or None")
        v = float(v)
        if math.isinf(v):
            raise RewardReturnError(f"reward function {label!r} returned {v} at index {i}; scores must be finite")
        scores.append(None if math.isnan(v) else v)  # NaN means "not applicable", as in TRL
    return scores


def execute(prep: PreparedReward, prompts: list, completions: list, columns: dict, completion_ids=None) -> tuple:
    """Run one call and describe what happened; never raises."""
    start = time.perf_counter()
    try:
        out = invoke(prep, prompts, completions, columns, completion_ids)
        return ("ok", check_scores(prep.label, out, len(completions)), time.perf_counter() - start)
    except RewardReturnError as e:
        return ("bad", str(e))
    except BaseException as e:  # noqa: BLE001 - a reward must not take the run down, whatever it raises
        if isinstance(e, KeyboardInterrupt):
            raise
        frames = traceback.extract_tb(e.__traceback__)
        site = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return ("error", type(e).__name__, str(e).split("\n", 1)[0][:300], text, site)
