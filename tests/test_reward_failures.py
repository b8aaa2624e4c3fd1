"""A reward that fails is missing, not a wrong answer: its sample leaves the group statistics.

Faults are real: a function that raises, one that segfaults its worker process (SIGSEGV
from reading address 0) and one that hangs inside the regex engine holding the GIL.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from rewards import RewardRunner
from rl.grpo import group_advantages, zero_variance_groups

FNS = str(Path(__file__).parent / "data" / "reward_fns.py")


def _fn(name: str, weight: float = 1.0) -> dict:
    return {"name": f"{FNS}:{name}", "weight": weight}


def _advantages_without(totals: list[float], missing: set[int]) -> dict[int, float]:
    """GRPO advantages computed on the graded samples alone (one group)."""
    kept = [i for i in range(len(totals)) if i not in missing]
    adv = group_advantages(torch.tensor([totals[i] for i in kept], dtype=torch.float64), len(kept))
    return dict(zip(kept, adv.tolist()))


def test_a_raising_reward_leaves_its_sample_out_of_the_group():
    with RewardRunner([_fn("raises_on_marker"), _fn("says_eighteen")], executor="thread", workers=4,
                      timeout_s=5.0) as runner:
        res = runner.score(["p"] * 4, ["boom 18", "18", "x", "18"], {})
    assert math.isnan(res.total[0]) and res.total[1:] == [1.5, 0.5, 1.5]
    assert res.failed == 1 and res.metrics()["reward/failed_samples"] == 1.0
    assert res.metrics()["reward/total/mean"] == (1.5 + 0.5 + 1.5) / 3  # the missing one is not a 0
    adv = group_advantages(torch.tensor(res.total, dtype=torch.float64), 4)
    assert adv[0] == 0.0  # no signal from an ungraded answer, neither reward nor punishment
    expected = _advantages_without(res.total, {0})
    assert torch.allclose(adv[1:], torch.tensor([expected[i] for i in (1, 2, 3)], dtype=adv.dtype))


def test_a_zero_weight_reward_failing_does_not_make_the_total_missing():
    with RewardRunner([_fn("raises_on_marker", 0.0), _fn("says_eighteen")], executor="thread",
                      workers=2, timeout_s=5.0) as runner:
        res = runner.score(["p"] * 2, ["boom 18", "x"], {})
    assert res.total == [1.0, 0.0] and res.failed == 0 and res.errors["raises_on_marker"] == 1


def test_segfault_and_gil_hang_in_process_workers_are_counted_and_scoring_goes_on():
    functions = [_fn("segfaults_on_marker"), _fn("spins_holding_gil_on_marker"), _fn("says_eighteen")]
    with RewardRunner(functions, executor="process", workers=4, timeout_s=3.0) as runner:
        res = runner.score(["p"] * 4, ["segv 18", "18", "spin 18", "x"], {})
        assert res.errors["segfaults_on_marker"] == 1 and res.timeouts["spins_holding_gil_on_marker"] == 1
        assert math.isnan(res.total[0]) and math.isnan(res.total[2]) and res.total[1::2] == [3.0, 2.0]
        assert res.failed == 2 and runner.error_counts["segfaults_on_marker"] == 1
        rewards = torch.tensor(res.total, dtype=torch.float64)
        adv = group_advantages(rewards, 4)
        assert adv[0] == 0.0 and adv[2] == 0.0 and adv[1] > 0 > adv[3]
        assert not zero_variance_groups(rewards, 4).any()  # two graded samples still make a group
        # The crashed and the hung worker were replaced: the next batch is graded in full.
        res = runner.score(["p"] * 4, ["18", "x", "18", "x"], {})
        assert res.total == [3.0, 2.0, 3.0, 2.0] and res.failed == 0
