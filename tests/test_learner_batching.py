"""Micro-batch planning (rl/learner/batching.py): pure functions over row lengths."""
import torch

from rl.learner.batching import (fixed_micro_batches, in_row_order, plan_micro_batches, prompt_groups,
                                 split_to_count, token_budget_micro_batches, with_padding_column)


def padded(plan, lengths):
    return sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)


def test_fixed_plan_is_batch_order():
    assert fixed_micro_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_token_budget_sorts_packs_and_covers_every_row_once():
    lengths = [12, 500, 40, 480, 9, 300, 310, 11]
    plan = token_budget_micro_batches(lengths, max_tokens=1000, max_rows=8)
    assert sorted(i for mb in plan for i in mb) == list(range(8))
    assert plan == [[1, 3], [6, 5, 2], [0, 7, 4]]  # longest first; ties would keep batch order
    assert all(len(mb) * max(lengths[i] for i in mb) <= 1000 for mb in plan)
    assert padded(plan, lengths) < padded(fixed_micro_batches(8, 2), lengths)  # 1966 vs 3180


def test_row_cap_and_a_row_over_budget():
    lengths = [5] * 6 + [2000]
    plan = token_budget_micro_batches(lengths, max_tokens=100, max_rows=4)
    assert plan[0] == [6]  # over the budget: alone
    assert plan[1:] == [[0, 1, 2, 3], [4, 5]]  # 6 x 5 tokens fit the budget, the cap is 4 rows


def test_groups_stay_whole_and_contiguous():
    lengths = [10, 90, 20, 30, 5, 6, 300, 7, 8]
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # unit lengths 90, 30, 300
    plan = token_budget_micro_batches(lengths, max_tokens=600, max_rows=8, groups=groups)
    assert plan == [[6, 7, 8], [0, 1, 2, 3, 4, 5]]
    # A group that alone exceeds the row cap still goes whole.
    assert token_budget_micro_batches(lengths, 10_000, 2, groups) == [[6, 7, 8], [0, 1, 2], [3, 4, 5]]


def test_prompt_groups_follow_shared_prompts():
    ids = torch.tensor([[1, 2, 7, 0], [1, 2, 8, 9], [1, 3, 5, 0], [1, 3, 6, 0], [1, 3, 0, 0]])
    resp = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    # Row 4 has no response tokens (no loss): it joins the run before it.
    assert prompt_groups(ids, resp) == [[0, 1], [2, 3, 4]]
    shard = {"input_ids": ids, "attention_mask": (ids != 0).long(), "response_mask": resp}
    assert plan_micro_batches(shard, 8, 6, keep_groups=True) == [[0, 1], [2, 3, 4]]
    assert plan_micro_batches(shard, 2, 0) == [[0, 1], [2, 3], [4]]


def test_split_to_count_halves_the_costliest():
    lengths = [100, 100, 10, 10, 10, 10]
    plan = token_budget_micro_batches(lengths, max_tokens=200, max_rows=8)
    assert plan == [[0, 1], [2, 3, 4, 5]]
    assert split_to_count(plan, lengths, 3) == [[0], [1], [2, 3, 4, 5]]
    assert split_to_count(plan, lengths, 4) == [[0], [1], [2, 3], [4, 5]]
    try:
        split_to_count(plan, lengths, 7)
    except ValueError as e:
        assert "6 rows into 7" in str(e)
    else:
        raise AssertionError("7 micro-batches of 6 rows were accepted")


def test_results_come_back_in_row_order():
    plan = [[2, 0], [1]]
    pieces = [torch.tensor([[2.0, 2.0], [5.0, 5.0]]), torch.tensor([[1.0]])]  # rows 2, 0, then 1
    out = in_row_order(pieces, plan, 2)
    assert out.tolist() == [[5.0, 5.0], [1.0, 0.0], [2.0, 2.0]]


def test_a_micro_batch_without_padding_gets_an_empty_column():
    mask = torch.ones(2, 4, dtype=torch.long)
    mb = {"input_ids": torch.arange(8).view(2, 4), "attention_mask": mask, "response_mask": mask.clone(),
          "advantages": torch.tensor([1.0, -1.0])}
    out = with_padding_column(mb)
    assert out["input_ids"].shape == out["attention_mask"].shape == out["response_mask"].shape == (2, 5)
    assert out["attention_mask"][:, -1].tolist() == [0, 0] and out["response_mask"][:, -1].tolist() == [0, 0]
    assert torch.equal(out["input_ids"][:, :4], mb["input_ids"]) and torch.equal(out["advantages"], mb["advantages"])
    # Results over the wider micro-batch come back at the shard's width.
    assert in_row_order([out["input_ids"].float()], [[1, 0]], 4).tolist() == [[4, 5, 6, 7], [0, 1, 2, 3]]
    mb["attention_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert with_padding_column(mb) is mb  # already padded: as it was
