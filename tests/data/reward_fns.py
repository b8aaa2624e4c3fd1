"""Reward functions the reward tests load by file path, as a user's own file would be loaded."""
import asyncio
import time


def says_eighteen(prompts, completions, **kwargs):
    """A user's reward: 1.0 when the completion mentions 18."""
    return [1.0 if "18" in c else 0.0 for c in completions]


def with_bonus(prompts, completions, bonus=0.0):
    """No **kwargs: the runner must pass only what it names (and the config's ``bonus``)."""
    return [len(c) % 2 + bonus for c in completions]


def raises_on_marker(prompts, completions, **kwargs):
    """Fails only on slices holding the word 'boom', so other slices still score."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom in the batch")
    return [0.5] * len(completions)


def sleeps_on_marker(prompts, completions, **kwargs):
    """Hangs (practically forever) on slices holding 'slow'."""
    if any("slow" in c for c in completions):
        time.sleep(3600)
    return [0.25] * len(completions)


def wrong_length(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def not_a_number(prompts, completions, **kwargs):
    return ["yes"] * len(completions)


async def async_length(prompts, completions, **kwargs):
    await asyncio.sleep(0.01)
    return [float(len(c)) for c in completions]


def per_gold(prompts, completions, gold, **kwargs):
    """Uses a dataset column by name; None where the gold is missing."""
    return [None if g is None else float(g in c) for c, g in zip(completions, gold)]


def exits_on_marker(prompts, completions, **kwargs):
    """Kills its own process on slices holding 'die' (a segfaulting extension, say)."""
    import os

    if any("die" in c for c in completions):
        os._exit(3)
    return [0.0] * len(completions)


def reads_messages(prompts, completions, **kwargs):
    """1.0 when handed TRL's conversational format, 0.0 for plain text."""
    return [float(isinstance(c, list) and c[-1]["role"] == "assistant") for c in completions]


def segfaults_on_marker(prompts, completions, **kwargs):
    """Crashes its process with a real SIGSEGV (a broken C extension) on slices holding 'segv'."""
    import ctypes

    if any("segv" in c for c in completions):
        ctypes.string_at(0)  # reads address 0
    return [1.0] * len(completions)


def spins_holding_gil_on_marker(prompts, completions, **kwargs):
    """Hangs inside the regex engine, which never releases the GIL, on slices holding 'spin'."""
    import re

    if any("spin" in c for c in completions):
        re.match(r"(a+)+$", "a" * 64 + "b")  # catastrophic backtracking: 2**64 steps
    return [1.0] * len(completions)


def segfaults_once(prompts, completions, marker, **kwargs):
    """Segfaults on its first call of a run (``marker`` records that it did), then scores 0.5."""
    import ctypes
    import os

    if not os.path.exists(marker):
        open(marker, "w").close()
        ctypes.string_at(0)
    return [0.5] * len(completions)
