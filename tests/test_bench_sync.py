"""bench/bench_sync.py's pure parts: the order of a round's syncs and the greedy agreement per pair."""
from __future__ import annotations

import pytest

from bench.bench_sync import PATHS, STAGES, first_difference, greedy_agreement, in_turns
from rl.rollout.vllm_inplace import PARTS


@pytest.mark.parametrize("paths", [PATHS, ("new", "inplace_vllm"), ("inplace_vllm", "new"), ("new", "add_lora"),
                                   ("old", "new", "inplace_vllm")])
def test_every_timed_new_sync_follows_an_untimed_one(paths):
    # Twice over: a round's last sync is what the next round's first follows.
    order = in_turns(list(paths)) * 2
    assert sorted(p for p in in_turns(list(paths)) if p) == sorted(paths)
    for before, now in zip(order, order[1:]):
        if now == "new":
            assert before is None, order  # never right after inplace_vllm or a path that registers an id
    # A path that registers a new id comes before the in-place ones of its round.
    first = in_turns(list(paths))
    assert all(first.index(p) < first.index("inplace_vllm") for p in ("add_lora", "old")
               if p in paths and "inplace_vllm" in paths)


def test_new_alone_runs_alone():
    assert in_turns(["new"]) == ["new"]


def test_the_stage_table_lists_every_part_after_the_in_place_stages():
    assert STAGES.index("inplace") < min(STAGES.index(p) for p in PARTS)
    assert max(STAGES.index(p) for p in PARTS) < STAGES.index("write")


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # one stopped early
    assert first_difference([], []) is None


def test_greedy_agreement_per_pair_with_the_logprob_gap_before_the_first_difference():
    served = {"new": ([5, 6, 7, 8], [-0.1, -0.2, -0.7, -0.1]),
              "inplace_vllm": ([5, 6, 7, 8], [-0.1, -0.21, -0.7, -0.1]),
              "add_lora": ([5, 6, 9, 9], [-0.1, -0.2, -0.69, -3.0])}
    pairs = greedy_agreement(served)
    assert set(pairs) == {"new~inplace_vllm", "new~add_lora", "inplace_vllm~add_lora"}
    assert pairs["new~inplace_vllm"] == {"same": True, "first_difference": None, "logprob_gap_before": 0.01}
    # The gap is over the tokens before the difference only: the later tokens are other tokens.
    assert pairs["new~add_lora"] == {"same": False, "first_difference": 2, "logprob_gap_before": 0.0}
    assert pairs["inplace_vllm~add_lora"]["first_difference"] == 2
    assert pairs["inplace_vllm~add_lora"]["logprob_gap_before"] == pytest.approx(0.01)
    assert greedy_agreement({"new": ([1], [-0.5])}) == {}
