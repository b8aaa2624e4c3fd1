"""RewardRunner: loading rewards by name/module/file, weights, failures, timeouts, TRL rewards, both pools."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytest

from rewards import RewardError, RewardRunner, registry_names
from rewards.runner import _slices

FNS = str(Path(__file__).parent / "data" / "reward_fns.py")


def fn(name: str, weight: float = 1.0, **kwargs) -> dict:
    spec = {"name": f"{FNS}:{name}" if "." not in name and name not in registry_names() else name,
            "weight": weight}
    if kwargs:
        spec["kwargs"] = kwargs
    return spec


@pytest.fixture
def thread_runner():
    runners = []

    def make(functions, **kw):
        kw.setdefault("workers", 2)
        kw.setdefault("timeout_s", 5.0)
        runners.append(RewardRunner(functions, executor="thread", **kw))
        return runners[-1]

    yield make
    for r in runners:
        r.close()


def test_user_function_from_file_path_and_weights(thread_runner):
    runner = thread_runner([fn("gsm8k_flexible", 1.0), fn("says_eighteen", 0.5), fn("format_hash", 0.25)])
    comps = ["#### 18", "It is 18.", "#### 17", "no idea"]
    res = runner.score(["q"] * 4, comps, {"gold": ["18"] * 4, "question": ["q"] * 4})
    assert res.per_function == {"gsm8k_flexible": [1.0, 1.0, 0.0, 0.0], "says_eighteen": [1.0, 1.0, 0.0, 0.0],
                                "format_hash": [1.0, 0.0, 1.0, 0.0]}
    assert res.total == [1.75, 1.5, 0.25, 0.0]
    m = res.metrics()
    assert m["reward/gsm8k_flexible/mean"] == 0.5 and m["reward/format_hash/mean"] == 0.5
    assert m["reward/total/mean"] == pytest.approx((1.75 + 1.5 + 0.25) / 4)
    assert m["reward/says_eighteen/errors"] == 0.0 and m["reward/says_eighteen/timeouts"] == 0.0


def test_kwargs_columns_and_none_adds_zero(thread_runner):
    runner = thread_runner([fn("with_bonus", 2.0, bonus=10.0), fn("per_gold", 1.0)])
    res = runner.score(["p", "p"], ["ab", "18x"], {"gold": ["18", None], "question": ["a", "b"]})
    assert res.per_function["with_bonus"] == [10.0, 11.0]
    assert res.per_function["per_gold"] == [0.0, None]
    assert res.total == [20.0, 22.0]  # the None from per_gold adds nothing
    assert res.metrics()["reward/per_gold/none_frac"] == 0.5


def test_same_function_twice_gets_distinct_labels(thread_runner):
    runner = thread_runner([fn("length_penalty", 1.0, unit="chars", max_len=10),
                            fn("length_penalty", 1.0, unit="words", max_len=10)])
    res = runner.score(["p"], ["ab cd"], {})
    assert res.per_function == {"length_penalty": [-0.5], "length_penalty_2": [-0.2]}


def test_raising_function_gives_none_and_logs_one_traceback(thread_runner, caplog):
    runner = thread_runner([fn("raises_on_marker"), fn("says_eighteen")])
    with caplog.at_level(logging.WARNING, logger="rewards"):
        res = runner.score(["p"] * 4, ["boom", "18", "x", "18"], {})
        res2 = runner.score(["p"] * 4, ["boom", "x", "boom", "18"], {})
    assert res.per_function["raises_on_marker"] == [None, None, 0.5, 0.5]  # only the slice with 'boom'
    assert res.per_function["says_eighteen"] == [0.0, 1.0, 0.0, 1.0]
    assert res.errors["raises_on_marker"] == 2 and res2.errors["raises_on_marker"] == 4
    assert all(math.isnan(t) for t in res2.total) and res2.failed == 4  # never graded: missing, not 0
    logged = [r for r in caplog.records if "raises_on_marker" in r.getMessage()]
    assert len(logged) == 1 and "RuntimeError: boom in the batch" in logged[0].getMessage()
    assert "Traceback" in logged[0].getMessage()
    assert runner.error_counts["raises_on_marker"] == 6


def test_sleeping_function_times_out_without_blocking(thread_runner, caplog):
    runner = thread_runner([fn("sleeps_on_marker"), fn("says_eighteen")], timeout_s=0.5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rewards"):
        res = runner.score(["p"] * 4, ["slow", "18", "a", "b"], {})
    assert time.monotonic() - start < 3.0
    assert res.per_function["sleeps_on_marker"] == [None, None, 0.25, 0.25]
    assert res.per_function["says_eighteen"] == [0.0, 1.0, 0.0, 0.0]
    assert res.timeouts["sleeps_on_marker"] == 2 and res.leaked_threads == 1
    assert any("timeout_s=0.5" in r.getMessage() for r in caplog.records)
    # The hung thread was replaced: a second batch runs at full strength and is not stuck behind it.
    start = time.monotonic()
    res = runner.score(["p"] * 4, ["a", "18", "c", "d"], {})
    assert time.monotonic() - start < 1.0 and res.per_function["sleeps_on_marker"] == [0.25] * 4


def test_wrong_length_and_non_number_fail_naming_the_function(thread_runner):
    with pytest.raises(RewardError, match=r"'wrong_length' returned 2 scores for 1 completions"):
        thread_runner([fn("wrong_length")]).score(["p"], ["a"], {})
    with pytest.raises(RewardError, match=r"'not_a_number' returned str 'yes' at index 0"):
        thread_runner([fn("not_a_number")]).score(["p"], ["a"], {})


def test_async_function(thread_runner):
    res = thread_runner([fn("async_length")]).score(["p", "p"], ["abc", "hello"], {})
    assert res.per_function["async_length"] == [3.0, 5.0]


def test_trl_rewards_unchanged(thread_runner):
    from trl.rewards import accuracy_reward, get_soft_overlong_punishment, think_format_reward

    comps = ["<think>\nadd them\n</think>\nThe answer is $\\frac{1}{3}$", "no tags, \\boxed{\\frac{1}{2}}"]
    ids = [[1] * 90, [1] * 50]
    runner = thread_runner([{"name": "trl.rewards:think_format_reward"},
                            {"name": "trl.rewards:accuracy_reward"},
                            {"name": "trl.rewards:get_soft_overlong_punishment",
                             "kwargs": {"max_completion_len": 100, "soft_punish_cache": 20}}])
    res = runner.score(["q", "q"], comps, {"solution": ["\\frac{1}{3}", "\\frac{1}{3}"]}, completion_ids=ids)
    as_msgs = [[{"role": "assistant", "content": c}] for c in comps]
    assert res.per_function["think_format_reward"] == think_format_reward(as_msgs) == [1.0, 0.0]
    assert res.per_function["accuracy_reward"] == accuracy_reward(as_msgs, ["\\frac{1}{3}"] * 2) == [1.0, 0.0]
    assert res.per_function["get_soft_overlong_punishment"] == get_soft_overlong_punishment(100, 20)(ids)
    assert res.per_function["get_soft_overlong_punishment"] == [-0.5, 0.0]


def test_length_rewards_need_ids_for_tokens(thread_runner):
    runner = thread_runner([fn("overlong_penalty", max_len=10, cache=4)])
    ids = [[0] * 5, [0] * 8, [0] * 12]
    assert runner.score(["p"] * 3, ["a", "b", "c"], {"completion_ids": ids}).per_function == {
        "overlong_penalty": [0.0, -0.5, -1.0]}
    res = runner.score(["p"], ["a"], {})  # tokens asked, none given: an error, counted, not a crash
    assert res.per_function["overlong_penalty"] == [None] and res.errors["overlong_penalty"] == 1


def test_bad_names_and_kwargs_fail_at_construction():
    with pytest.raises(RewardError) as e:
        RewardRunner([{"name": "gsm8k_strict"}, {"name": "gsm8k_strcit"}])
    assert str(e.value).startswith("reward.functions[1].name='gsm8k_strcit' is not a registered reward; "
                                   "close names: gsm8k_strict")
    with pytest.raises(RewardError, match=r"reward.functions\[0\].name='nosuch.module:f': cannot load"):
        RewardRunner([{"name": "nosuch.module:f"}])
    with pytest.raises(RewardError, match="file missing.py not found"):
        RewardRunner([{"name": "missing.py:f"}])
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        RewardRunner([{"name": f"{FNS}:nope"}])
    with pytest.raises(ValueError, match="kwargs.max_len=0 must be > 0"):
        RewardRunner([fn("length_penalty", max_len=0)])
    with pytest.raises(RewardError, match="'with_bonus' takes no parameter 'bonsu'"):
        RewardRunner([fn("with_bonus", bonsu=1)])
    with pytest.raises(RewardError, match="weight='x' is not a finite number"):
        RewardRunner([{"name": "format_hash", "weight": "x"}])


def test_misaligned_columns_fail(thread_runner):
    with pytest.raises(RewardError, match=r"columns\['gold'\] has 1 entries for 2 completions"):
        thread_runner([fn("gsm8k_strict")]).score(["p", "p"], ["a", "b"], {"gold": ["1"]})


def test_from_config_and_group_aligned_slices():
    from rl.config import RewardConfig

    cfg = RewardConfig(functions=[{"name": "gsm8k_strict", "weight": 2.0}], timeout_s=3.0, workers=3)
    with RewardRunner.from_config(cfg, group_size=4) as runner:
        assert runner.weights == {"gsm8k_strict": 2.0} and runner.timeout_s == 3.0
        res = runner.score(["p"] * 10, ["#### 1"] * 10, {"gold": ["1"] * 10})
        assert res.total == [2.0] * 10
    assert _slices(10, 3, 4) == [(0, 4), (4, 8), (8, 10)]
    assert _slices(8, 3, 4) == [(0, 4), (4, 8)]
    assert _slices(5, 4, 1) == [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert _slices(1, 4, 1) == [(0, 1)]


def test_empty_batch(thread_runner):
    res = thread_runner([fn("format_hash")]).score([], [], {})
    assert res.total == [] and math.isnan(res.metrics()["reward/total/mean"])


def test_process_pool_isolates_hangs_and_errors():
    functions = [fn("gsm8k_flexible"), fn("sleeps_on_marker"), fn("raises_on_marker"), fn("says_eighteen", 0.5)]
    with RewardRunner(functions, executor="process", workers=2, timeout_s=1.5) as runner:
        res = runner.score(["p"] * 4, ["slow 18", "#### 18", "boom", "The answer is 18"], {"gold": ["18"] * 4})
        assert res.per_function["gsm8k_flexible"] == [1.0, 1.0, 0.0, 1.0]
        assert res.per_function["sleeps_on_marker"] == [None, None, 0.25, 0.25]
        assert res.per_function["raises_on_marker"] == [0.5, 0.5, None, None]
        assert res.timeouts["sleeps_on_marker"] == 2 and res.errors["raises_on_marker"] == 2
        assert all(math.isnan(t) for t in res.total) and res.failed == 4  # each lost a weighted score
        # The hung worker was killed and replaced; the pool still answers.
        res = runner.score(["p"] * 2, ["#### 18", "x"], {"gold": ["18", "18"]})
        assert res.per_function["sleeps_on_marker"] == [0.25, 0.25] and res.leaked_threads == 0
    with RewardRunner([fn("exits_on_marker"), fn("says_eighteen")], executor="process", workers=2) as runner:
        res = runner.score(["p"] * 4, ["die", "18", "x", "18"], {})
        assert res.per_function == {"exits_on_marker": [None, None, 0.0, 0.0],
                                    "says_eighteen": [0.0, 1.0, 0.0, 1.0]}
        assert res.errors["exits_on_marker"] == 2
    with RewardRunner([fn("wrong_length")], executor="process", workers=1) as bad:
        with pytest.raises(RewardError, match="'wrong_length' returned 2 scores for 1 completions"):
            bad.score(["p"], ["a"], {})
