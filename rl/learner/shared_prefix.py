"""One forward over a prompt that several rows of a micro-batch share (a GRPO group's completions).

A GRPO batch holds ``group_size`` completions of each prompt, and the learner's forward over
``[prompt + completion]`` rows computes every prompt ``group_size`` times: on GSM8K (150-token
prompts, 64-token completions, groups of 4) that is 70% of the tokens, of the compute and of
the activations. Here the rows are split where their loss begins: the part before (the
prompt, which gets no loss) runs once per distinct prompt with the KV cache on, the cache is
repeated for the rows that share it, and the rest of each row runs on top of it. Gradients
flow through the cached keys and values into the prompt's forward, so the result is the same
function of the weights as the whole-row forward (equal up to float rounding).

Used where a micro-batch has rows with the same prompt, on one learner rank (FSDP2 with
several ranks is left on whole rows: two forwards per micro-batch there would gather and
reduce each layer twice) and without activation checkpointing (transformers turns the cache
off under it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PrefixSplit:
    rows: Tensor  # [n] micro-batch rows that have labels (the others score 0)
    group: Tensor  # [n] each row's distinct prefix
    prefix_ids: Tensor  # [U, L] the distinct prefixes, right-padded
    prefix_mask: Tensor  # [U, L]
    start: Tensor  # [n] where each row's rest starts (its prefix's length)
    suffix_ids: Tensor  # [n, S] each row from ``start`` on, right-padded
    suffix_mask: Tensor  # [n, S]
    suffix_labels: Tensor  # [n, S] the label of each suffix position (-100: none)


def split_shared_prefixes(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> PrefixSplit | None:
    """Rows cut at their first labelled position, prefixes deduplicated; None when no two rows share one.

    ``input_ids``/``attention_mask`` [b, T] right-padded; ``labels`` [b, T - 1], the label of
    position t (the token at t + 1) or -100.
    """
    labelled = labels != -100
    rows = labelled.any(dim=1).nonzero().squeeze(1)
    if rows.numel() < 2:
        return None
    starts = labelled[rows].int().argmax(dim=1)
    if int(starts.min()) < 1:
        return None  # an empty prefix: nothing to share, and an all-masked row in the prefix pass
    distinct: dict[tuple, int] = {}
    group = [distinct.setdefault(tuple(input_ids[r, :s].tolist()), len(distinct))
             for r, s in zip(rows.tolist(), starts.tolist())]
    if len(distinct) == rows.numel():
        return None
    group = torch.tensor(group, device=input_ids.device)
    firsts = [group.tolist().index(u) for u in range(len(distinct))]
    prefix_len = starts[firsts]
    L = int(prefix_len.max())
    cols = torch.arange(L, device=input_ids.device)
    prefix_mask = (cols[None] < prefix_len[:, None]).long()
    prefix_ids = input_ids[rows[firsts], :L] * prefix_mask

    lengths = attention_mask[rows].sum(dim=1)
    S = int((lengths - starts).max())
    pos = starts[:, None] + torch.arange(S, device=input_ids.device)[None]  # [n, S]
    suffix_mask = (pos < lengths[:, None]).long()
    T = input_ids.shape[1]
    suffix_ids = input_ids[rows].gather(1, pos.clamp(max=T - 1)) * suffix_mask
    padded_labels = F.pad(labels[rows], (0, 1), value=-100)  # the last position predicts nothing
    suffix_labels = torch.where(suffix_mask.bool(), padded_labels.gather(1, pos.clamp(max=T - 1)), -100)
    return PrefixSplit(rows, group, prefix_ids, prefix_mask, starts, suffix_ids, suffix_mask, suffix_labels)


def shared_prefix_logprobs(model, split: PrefixSplit, batch_shape: torch.Size, score):
    """Per-token logprobs [b, T] (0 where no label; position t scores token t) and the summed entropy.

    ``score(labels, **forward_inputs) -> (logprobs aligned with labels, entropy sum or None)``
    runs the model's forward over the suffixes (the learner's whole-logits or chunked-head path).
    """
    prefix = model(input_ids=split.prefix_ids, attention_mask=split.prefix_mask, use_cache=True, logits_to_keep=1)
    cache = prefix.past_key_values
    for layer in cache.layers:
        # Each row gets its prefix's keys and values (index_select keeps the gradient path).
        layer.keys, layer.values = layer.keys.index_select(0, split.group), layer.values.index_select(0, split.group)
    S = split.suffix_ids.shape[1]
    lp, ent = score(split.suffix_labels, input_ids=split.suffix_ids,
                    attention_mask=torch.cat([split.prefix_mask[split.group], split.suffix_mask], dim=1),
                    position_ids=split.start[:, None] + torch.arange(S, device=split.start.device)[None],
                    past_key_values=cache, use_cache=True)
    B, T = batch_shape
    # Suffix position j is row position start + j; its logprob scores the token at start + j + 1.
    # Positions past T carry no label (logprob 0): a buffer of T + S columns, cut to T.
    index = split.start[:, None] + 1 + torch.arange(S, device=lp.device)[None]
    rows = lp.new_zeros(lp.shape[0], T + S).scatter(1, index, lp)[:, :T]
    return lp.new_zeros(B, T).index_copy(0, split.rows, rows), ent
