"""A per-step cap on a learner batch's loss tokens (``learner.loss_token_cap``).

Why it exists: experiments that compare regimes (``placerl regime``: SFT against GRPO)
must train both on the same amount of signal per step. Matching the sequences per step is
not enough: gold solutions and sampled completions differ in length, so one regime would
train on several times the other's loss tokens, and every gradient statistic (norms, ranks,
cosines) would mix the regime with the batch size. The cap trims every step to at most the
same number of loss tokens.

Which tokens go: the longest rows lose their tail first (water-filling). Each row keeps its
first ``min(n_i, L)`` loss tokens, with ``L`` the largest length such that the kept total
fits the cap; what remains of the cap goes one token each to the rows longer than ``L``,
longest first (then in row order), so the kept total is exactly the cap whenever the batch
has that many. Short rows are never cut while a long row still exceeds them, and every row's
kept tokens are a prefix of its completion (a tail cut is what a shorter generation budget
would do to a sequence, a random subset would not be).

The cap acts on the response mask only, on the driver before the batch is split over the
learner ranks: every loss normaliser, metric and label is derived from that mask, so the
capped tokens count exactly as if they had never been loss tokens. They are still run
through the model's forward pass (the kept tokens' logprobs do not depend on them in a
causal model), so the cap saves no compute.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


def kept_loss_tokens(counts: list[int], cap: int) -> list[int]:
    """How many leading loss tokens each row keeps under ``cap`` (0: no cap, all kept).

    The largest per-row length ``L`` with ``sum(min(n_i, L)) <= cap``, then the remaining
    ``cap - sum`` tokens one each to the rows longer than ``L``, longest first, ties in row order."""
    if cap < 0:
        raise ValueError(f"loss token cap must be >= 0 (0: no cap), got {cap}")
    if any(n < 0 for n in counts):
        raise ValueError(f"loss token counts must be >= 0, got {counts}")
    if cap == 0 or sum(counts) <= cap:
        return list(counts)

    def kept_total(length: int) -> int:
        return sum(min(n, length) for n in counts)

    low, high = 0, max(counts)  # kept_total(low) <= cap < kept_total(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if kept_total(mid) <= cap else (low, mid)
    kept = [min(n, low) for n in counts]
    longer = sorted((i for i, n in enumerate(counts) if n > low), key=lambda i: (-counts[i], i))
    for i in longer[: cap - sum(kept)]:  # fewer than len(longer): L + 1 would exceed the cap
        kept[i] += 1
    return kept


def cap_response_mask(response_mask: Tensor, cap: int) -> tuple[Tensor, int]:
    """``response_mask`` [B, T] with each row's loss tokens after its first ``kept_loss_tokens``
    set to 0; and how many loss tokens were removed."""
    marked = response_mask != 0
    counts = marked.sum(dim=1).tolist()
    kept = kept_loss_tokens(counts, cap)
    removed = sum(counts) - sum(kept)
    if not removed:
        return response_mask, 0
    rank = marked.cumsum(dim=1)  # the 1-based index of each loss token within its row
    keep = marked & (rank <= torch.tensor(kept, dtype=rank.dtype)[:, None])
    return response_mask * keep.to(response_mask.dtype), removed


def cap_batch_loss_tokens(batch, cap: int):
    """A TrainBatch whose response mask holds at most ``cap`` loss tokens (0: unchanged), and
    how many it lost."""
    if cap == 0:  # off (the default): no pass over the mask on every step
        return batch, 0
    mask, removed = cap_response_mask(batch.response_mask, cap)
    return (dataclasses.replace(batch, response_mask=mask) if removed else batch), removed
