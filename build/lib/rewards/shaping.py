"""Shaping rewards: answer format, ``<think>`` structure, length and overlong penalties.

Format rewards are plain TRL-signature functions. The length rewards are factories: the
registry calls them with the config's ``kwargs`` once, so a bad ``max_len`` fails when the
run starts rather than on every batch. Lengths are token counts by default, which need the
``completion_ids`` the trainer passes to ``RewardRunner.score``; ``unit: chars`` or
``unit: words`` measure the text instead (for completions read from a file).

Overlong *masking* (no loss at all for completions cut at the length limit) is not a
reward: the learner applies it (``algorithm.overlong_mask``). ``overlong_penalty`` is DAPO's
soft punishment (eq. 13), the reward-side alternative.
"""
from __future__ import annotations

import re

from rewards.gsm8k import completion_text, strict_answer

_ANSWER_TAG = re.compile(r"<answer>\s*(\S.*?)\s*</answer>", re.DOTALL)
_UNITS = ("tokens", "chars", "words")


def format_hash(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion ends its work with a readable ``#### N`` line, else 0.0."""
    return [float(strict_answer(completion_text(c)) is not None) for c in completions]


def answer_tag(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion holds a non-empty ``<answer>...</answer>``, else 0.0."""
    return [float(_ANSWER_TAG.search(completion_text(c)) is not None) for c in completions]


def think_format(prompts, completions, prompt_opens_think: bool = False, require_answer: bool = True,
                 **kwargs) -> list[float]:
    """1.0 for ``<think>reasoning</think>answer``, else 0.0.

    ``prompt_opens_think``: the chat template already wrote ``<think>`` at the end of the
    prompt (DeepSeek-R1 and Qwen3 templates do), so the completion must not open another.
    ``require_answer``: some text must follow ``</think>``.
    """
    out = []
    for c in completions:
        text = completion_text(c)
        body = text if prompt_opens_think else text.lstrip()
        if not prompt_opens_think:
            if not body.startswith("<think>"):
                out.append(0.0)
                continue
            body = body[len("<think>"):]
        ok = "<think>" not in body and body.count("</think>") == 1
        if ok:
            reasoning, after = body.split("</think>")
            ok = bool(reasoning.strip()) and (bool(after.strip()) or not require_answer)
        out.append(float(ok))
    return out


def _check_unit(who: str, unit: str) -> None:
    if unit not in _UNITS:
        raise ValueError(f"{who}: kwargs.unit={unit!r} is not allowed; choose one of {', '.join(_UNITS)}")


def _lengths(who: str, unit: str, completions, completion_ids) -> list[int]:
    if unit == "tokens":
        if completion_ids is None:
            raise ValueError(f"{who} counts tokens but got no completion_ids; pass completion_ids to "
                             "RewardRunner.score or set kwargs unit: chars")
        return [len(ids) for ids in completion_ids]
    texts = [completion_text(c) for c in completions]
    return [len(t) for t in texts] if unit == "chars" else [len(t.split()) for t in texts]


def length_penalty(max_len: int = 512, unit: str = "tokens"):
    """A reward of ``-min(1, length / max_len)``: linear in length, in [-1, 0]; the weight scales it."""
    _check_unit("length_penalty", unit)
    if max_len <= 0:
        raise ValueError(f"length_penalty: kwargs.max_len={max_len} must be > 0")

    def length_penalty(prompts=None, completions=(), completion_ids=None, **kwargs) -> list[float]:
        return [0.0 - min(1.0, n / max_len) for n in _lengths("length_penalty", unit, completions, completion_ids)]

    return length_penalty


def overlong_penalty(max_len: int = 512, cache: int = 128, unit: str = "tokens"):
    """DAPO's soft overlong punishment: 0 up to ``max_len - cache``, then linear down to -1 at ``max_len``."""
    _check_unit("overlong_penalty", unit)
    if max_len <= 0 or not 0 < cache <= max_len:
        raise ValueError(f"overlong_penalty: kwargs max_len={max_len}, cache={cache} need max_len > 0 "
                         "and 0 < cache <= max_len")
    start = max_len - cache

    def overlong_penalty(prompts=None, completions=(), completion_ids=None, **kwargs) -> list[float]:
        out = []
        for n in _lengths("overlong_penalty", unit, completions, completion_ids):
            out.append(0.0 if n <= start else (-1.0 if n > max_len else (start - n) / cache))
        return out

    return overlong_penalty
