"""Format and length rewards, and registry odds and ends (register, completions_as)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rewards import RewardRunner, answer_tag, format_hash, length_penalty, overlong_penalty, register, think_format

FNS = str(Path(__file__).parent / "data" / "reward_fns.py")


@pytest.mark.parametrize("text,default,opened_by_prompt,no_answer_needed", [
    ("<think>add 9 and 9</think>#### 18", 1.0, 0.0, 1.0),
    ("  <think>\nadd\n</think>\nThe answer is 18.", 1.0, 0.0, 1.0),
    ("<think>add</think>", 0.0, 0.0, 1.0),
    ("<think></think>18", 0.0, 0.0, 0.0),
    ("<think>a</think><think>b</think>18", 0.0, 0.0, 0.0),
    ("<think>a</think>18</think>", 0.0, 0.0, 0.0),
    ("The answer is 18.", 0.0, 0.0, 0.0),
    ("<think>never closed, 18", 0.0, 0.0, 0.0),
    ("add 9 and 9</think>18", 0.0, 1.0, 0.0),
])
def test_think_format(text, default, opened_by_prompt, no_answer_needed):
    assert think_format(None, [text]) == [default]
    assert think_format(None, [text], prompt_opens_think=True) == [opened_by_prompt]
    assert think_format(None, [text], require_answer=False) == [no_answer_needed]


def test_format_hash_and_answer_tag():
    texts = ["work\n#### 18", "#### $1,200", "#### eighteen", "18", "<answer> 18 </answer>", "<answer></answer>"]
    assert format_hash(None, texts) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert answer_tag(None, texts) == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_length_penalty_and_overlong_penalty():
    ids = [[0] * n for n in (0, 50, 100, 400)]
    assert length_penalty(max_len=100)(completions=["x"] * 4, completion_ids=ids) == [0.0, -0.5, -1.0, -1.0]
    assert length_penalty(max_len=4, unit="words")(completions=["a b", "a b c d e"]) == [-0.5, -1.0]
    ids = [[0] * n for n in (60, 80, 90, 100, 101)]
    assert overlong_penalty(max_len=100, cache=20)(completions=["x"] * 5, completion_ids=ids) == [
        0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="counts tokens but got no completion_ids"):
        overlong_penalty()(completions=["x"])
    with pytest.raises(ValueError, match="kwargs.unit='bytes' is not allowed"):
        length_penalty(unit="bytes")
    with pytest.raises(ValueError, match="need max_len > 0 and 0 < cache <= max_len"):
        overlong_penalty(max_len=10, cache=20)


@register("shout_length_test")
def shout_length(prompts, completions, **kwargs):
    return [float(c.isupper()) for c in completions]


def test_register_and_completions_as():
    with RewardRunner([{"name": "shout_length_test"},
                       {"name": f"{FNS}:says_eighteen", "kwargs": {"completions_as": "text"}}], workers=1) as r:
        res = r.score(["p", "p"], ["LOUD 18", "quiet"], {})
    assert res.per_function == {"shout_length_test": [1.0, 0.0], "says_eighteen": [1.0, 0.0]}
    # completions_as=messages hands a plain function TRL's conversational format instead.
    for fmt, expected in (("messages", 1.0), ("text", 0.0)):
        spec = {"name": f"{FNS}:reads_messages", "kwargs": {"completions_as": fmt}}
        with RewardRunner([spec], workers=1) as r:
            assert r.score(["p"], ["18"], {}).per_function["reads_messages"] == [expected]
