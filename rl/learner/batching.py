"""Which rows of a learner shard go into which micro-batch.

A micro-batch is right-padded to its longest row, so its forward and backward cost
about ``rows x longest row`` positions. GRPO completions range from a few tokens to the
generation limit: micro-batches of consecutive rows are each padded to nearly the limit
while the mean row is half of it or less. Sorting rows by length and packing them under a
token budget (``learner.micro_batch_tokens``) puts long rows with long rows and short with
short, so far fewer padded positions are computed.

The loss of every micro-batch is divided by the GLOBAL token and sequence counts
(rl/grpo.py ``aggregate``), so any grouping of rows gives the same gradient, up to the
order of float summation; the learner puts per-row results back in the original row order.

Pure functions over row lengths; rl/learner/rank.py applies the plan to the tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def plan_micro_batches(shard: dict[str, Tensor], micro_batch_size: int, micro_batch_tokens: int,
                       keep_groups: bool = False) -> list[list[int]]:
    """The learner's plan for one shard: ``micro_batch_size`` rows in batch order when
    ``micro_batch_tokens`` is 0, else rows packed by length under that token budget with at
    most ``micro_batch_size`` rows each; ``keep_groups``: GRPO groups (``prompt_groups``) whole."""
    if not micro_batch_tokens:
        return fixed_micro_batches(shard["input_ids"].shape[0], micro_batch_size)
    lengths = shard["attention_mask"].sum(dim=1).tolist()
    groups = prompt_groups(shard["input_ids"], shard["response_mask"]) if keep_groups else None
    return token_budget_micro_batches(lengths, micro_batch_tokens, micro_batch_size, groups)


def fixed_micro_batches(num_rows: int, rows_per_micro_batch: int) -> list[list[int]]:
    """Consecutive chunks of ``rows_per_micro_batch`` rows, in batch order."""
    return [list(range(s, min(s + rows_per_micro_batch, num_rows))) for s in range(0, num_rows, rows_per_micro_batch)]


def token_budget_micro_batches(lengths: list[int], max_tokens: int, max_rows: int,
                               groups: list[list[int]] | None = None) -> list[list[int]]:
    """Row indices of each micro-batch: longest rows first, each micro-batch at most
    ``max_rows`` rows with ``rows x its longest row <= max_tokens``.

    ``groups``: lists of row indices that must share a micro-batch, contiguously and in
    their order (a GRPO group's completions for the learner's shared-prefix forward); each
    is packed as a unit as long as its longest row. A unit that alone breaks the budget
    or the row cap goes into a micro-batch of its own. Without ``groups`` every row is a unit.

    Units are taken longest first (ties in batch order) and a micro-batch is closed when the
    next unit does not fit: the first unit sets the padded length, so the next one could only
    fit an earlier, already full micro-batch if it had fewer rows (it never does without groups).
    """
    units = groups if groups is not None else [[i] for i in range(len(lengths))]
    longest = [max(lengths[i] for i in unit) for unit in units]
    order = sorted(range(len(units)), key=lambda u: -longest[u])  # stable: ties stay in batch order
    plan: list[list[int]] = []
    width = 0  # the padded length of the micro-batch being filled (its first unit's)
    for u in order:
        rows = len(plan[-1]) + len(units[u]) if plan else 0
        if plan and rows <= max_rows and rows * width <= max_tokens:
            plan[-1].extend(units[u])
        else:
            plan.append(list(units[u]))
            width = longest[u]
    return plan


def split_to_count(plan: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """``plan`` with its costliest micro-batches halved until it has ``count`` of them.

    FSDP2 ranks gather and reduce in step, so every rank must run the same number of
    micro-batches; each rank plans its own shard and then splits up to the largest count
    among the ranks. Rows within a micro-batch are longest first, so each half stays
    tightly padded (and groups are not kept: for plans without ``groups``). Needs ``count``
    <= the number of rows.
    """
    plan = [sorted(mb, key=lambda i: -lengths[i]) for mb in plan]
    if count > sum(len(mb) for mb in plan):
        raise ValueError(f"cannot split {sum(len(mb) for mb in plan)} rows into {count} micro-batches")
    while len(plan) < count:
        k = max((k for k in range(len(plan)) if len(plan[k]) > 1),
                key=lambda k: len(plan[k]) * lengths[plan[k][0]])
        mb = plan.pop(k)
        half = (len(mb) + 1) // 2
        plan[k:k] = [mb[:half], mb[half:]]
    return plan


def right_padded(attention_mask: Tensor) -> bool:
    """Whether each row of ``attention_mask`` [b, t] is its tokens, then only padding (pure)."""
    lengths = attention_mask.sum(dim=1, keepdim=True)
    return torch.equal(attention_mask.bool(), torch.arange(attention_mask.shape[1], device=lengths.device) < lengths)


def takes_padding_mask(padding_mask: str, compiled: bool, attention_mask: Tensor) -> bool:
    """Whether a micro-batch's forward takes its padding mask (``learner.padding_mask``; pure).
    Rows that are not right-padded always do. Right-padded rows need none under causal attention
    (no token that gets a label sees the padding after it): ``never`` and, for eager layers,
    ``auto`` leave it out. Compiled layers under ``auto`` take it, so that the graph the warm-up
    builds serves every micro-batch: unmasked, on one H200, the first real step compiled more
    graphs than the warm-up had (reports/gpu/README.md 23)."""
    if padding_mask == "always" or (padding_mask == "auto" and compiled):
        return True
    return not right_padded(attention_mask)


def with_padding_column(mb: dict[str, Tensor]) -> dict[str, Tensor]:
    """``mb`` (a micro-batch of right-padded rows) with one more padding column where none of its
    rows is padded (pure). transformers drops an all-ones attention mask, so the decoder layers
    would run such a micro-batch without one: compiled, that is a graph of its own, built the
    first time one occurs (tens of seconds). With the column every micro-batch is padded, and
    the graph that the start-up warm-up builds (rl/learner/warm_up.py) serves them all. The
    column is no token of any row: it gets no label and no loss, and results drop it."""
    if not bool(mb["attention_mask"].all()):
        return mb
    return {k: F.pad(v, (0, 1)) if v.dim() == 2 else v for k, v in mb.items()}


def in_row_order(pieces: list[Tensor], plan: list[list[int]], T: int) -> Tensor:
    """Per-micro-batch results ([rows, t] each, in ``plan``'s order) padded (or cut) to ``T``
    columns and put back in the shard's row order."""
    planned = torch.cat([F.pad(p, (0, T - p.shape[1])) for p in pieces])
    out = torch.empty_like(planned)
    out[torch.tensor([i for rows in plan for i in rows], device=planned.device)] = planned
    return out


def prompt_groups(input_ids: Tensor, response_mask: Tensor) -> list[list[int]]:
    """Runs of consecutive rows with the same prompt (the tokens before the first response
    token): GRPO's groups as the shared-prefix forward finds them. A row without response
    tokens (no loss, e.g. an overlong-masked completion) joins the run before it."""
    runs: list[list[int]] = []
    last = None
    for r in range(input_ids.shape[0]):
        labelled = response_mask[r].nonzero()
        if not labelled.numel():
            if runs:
                runs[-1].append(r)
            else:
                runs.append([r])
            continue
        prompt = tuple(input_ids[r, :int(labelled[0])].tolist())
        if runs and prompt == last:
            runs[-1].append(r)
        else:
            runs.append([r])
        last = prompt
    return runs
