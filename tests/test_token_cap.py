"""The per-step loss-token cap (rl/learner/token_cap.py): the allocation against a brute-force
search, its effect on a real learner batch's mask, and the GRPO and SFT losses it gives."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from rl import grpo
from rl.learner.batch import grpo_batch, sft_batch
from rl.learner.token_cap import cap_batch_loss_tokens, cap_response_mask, kept_loss_tokens
from rl.rollout.engine import Completion


def brute_force_kept(counts: list[int], cap: int) -> list[int]:
    """Over every allocation 0 <= k_i <= n_i with the largest total the cap allows: the one whose
    kept lengths, sorted from the largest, are smallest (the longest rows lose first); among
    those, the one that favours rows ordered longest first, then by index."""
    total = sum(counts)
    target = total if cap == 0 or cap >= total else cap
    allocations = [k for k in itertools.product(*(range(n + 1) for n in counts)) if sum(k) == target]
    fairest = min(sorted(k, reverse=True) for k in allocations)
    fair = [k for k in allocations if sorted(k, reverse=True) == fairest]
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    return list(max(fair, key=lambda k: [k[i] for i in order]))


def test_kept_tokens_match_brute_force_exhaustively_on_small_batches():
    checked = 0
    for rows in (1, 2, 3):
        for counts in itertools.product(range(5), repeat=rows):
            for cap in range(sum(counts) + 2):
                assert kept_loss_tokens(list(counts), cap) == brute_force_kept(list(counts), cap), (counts, cap)
                checked += 1
    assert checked > 500


def test_kept_tokens_match_brute_force_on_random_batches():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(0, 7) for _ in range(rng.randint(1, 5))]
        cap = rng.randint(0, sum(counts) + 3)
        kept = kept_loss_tokens(counts, cap)
        assert kept == brute_force_kept(counts, cap), (counts, cap)
        assert all(0 <= k <= n for k, n in zip(kept, counts))
        assert sum(kept) == (sum(counts) if cap == 0 else min(cap, sum(counts)))


def test_kept_tokens_by_hand_and_edge_cases():
    # L = 4 keeps 4 + 3 + 4 = 11 <= 12 (L = 5 would keep 13); the one token left goes to the longest row.
    assert kept_loss_tokens([10, 3, 7], 12) == [5, 3, 4]
    # Equal lengths: the spare tokens go in row order.
    assert kept_loss_tokens([6, 6, 6], 8) == [3, 3, 2]
    assert kept_loss_tokens([10, 3, 7], 20) == [10, 3, 7]  # the cap is the total: nothing removed
    assert kept_loss_tokens([10, 3, 7], 10_000) == [10, 3, 7]
    assert kept_loss_tokens([10, 3, 7], 0) == [10, 3, 7]  # 0 means no cap, never "no tokens"
    assert kept_loss_tokens([0, 0], 5) == [0, 0] and kept_loss_tokens([], 5) == []
    assert kept_loss_tokens([9, 1], 1) == [1, 0]
    with pytest.raises(ValueError, match="must be >= 0"):
        kept_loss_tokens([3], -1)


def real_batch():
    """A GRPO batch as the trainer builds it: prompts of different lengths, right padding, and
    a completion masked out whole (overlong)."""
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2]]
    lengths = [9, 2, 6, 5]
    completions = [Completion(token_ids=list(range(10, 10 + n)), logprobs=[-0.1 * (j + 1) for j in range(n)],
                              text="", finish_reason="length" if i == 3 else "stop")
                   for i, n in enumerate(lengths)]
    batch = grpo_batch(prompts, completions, torch.tensor([1.0, -0.5, 0.7, 2.0]), pad_id=0, max_tokens=12,
                       overlong_mask=True)
    return prompts, lengths, batch


def hand_capped_mask(prompts, kept_per_row, batch) -> torch.Tensor:
    """The response mask with each row's completion tokens from ``kept`` on removed, by hand."""
    mask = batch.response_mask.clone()
    for i, (p, kept) in enumerate(zip(prompts, kept_per_row)):
        mask[i, len(p) + kept:] = 0
    return mask


def test_capping_a_real_batch_masks_the_longest_rows_tails():
    prompts, lengths, batch = real_batch()
    assert float(batch.response_mask.sum()) == 9 + 2 + 6  # the overlong row has no loss tokens
    capped, removed = cap_batch_loss_tokens(batch, 11)
    # Counts [9, 2, 6, 0] under 11: L = 4 keeps 4 + 2 + 4 = 10; the spare token goes to the 9-token row.
    expected = hand_capped_mask(prompts, [5, 2, 4, 0], batch)
    assert torch.equal(capped.response_mask, expected) and removed == 17 - 11
    assert float(capped.response_mask.sum()) == 11
    capped.validate()
    for name in ("input_ids", "attention_mask", "advantages", "rollout_logprobs"):
        assert torch.equal(getattr(capped, name), getattr(batch, name))  # only the loss mask changes
    same, none_removed = cap_batch_loss_tokens(batch, 17)
    assert same is batch and none_removed == 0
    assert cap_response_mask(batch.response_mask, 0)[1] == 0


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_with_the_cap_equals_the_loss_without_those_tokens(loss_agg):
    prompts, _, batch = real_batch()
    capped, _ = cap_batch_loss_tokens(batch, 11)
    by_hand = hand_capped_mask(prompts, [5, 2, 4, 0], batch)
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(batch.input_ids.shape, generator=g, dtype=torch.float64)
    new = old + 0.3 * torch.randn(batch.input_ids.shape, generator=g, dtype=torch.float64)

    def loss(mask):
        # As the learner group does: the global token count comes from the (capped) mask.
        agg = dict(loss_agg=loss_agg, max_tokens=batch.max_tokens, num_sequences=batch.input_ids.shape[0],
                   num_tokens=float(mask.sum()))
        pg, metrics = grpo.policy_loss(new, old, batch.advantages, mask, **agg)
        return pg, metrics["ratio_mean"], grpo.sft_loss(new, mask, **agg)

    for got, want in zip(loss(capped.response_mask), loss(by_hand)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The cap changes the loss (the removed tail tokens carried loss of their own).
    assert not torch.allclose(loss(capped.response_mask)[0], loss(batch.response_mask)[0])


def test_sft_batch_is_capped_the_same_way():
    prompts, answers = [[1, 2], [3, 4, 5]], [list(range(20, 32)), list(range(40, 43))]
    batch = sft_batch(prompts, answers, pad_id=0, max_tokens=16)
    capped, removed = cap_batch_loss_tokens(batch, 8)  # counts [12, 3]: L = 5 keeps 5 + 3 = 8
    assert removed == 7 and torch.equal(capped.response_mask, hand_capped_mask(prompts, [5, 3], batch))
