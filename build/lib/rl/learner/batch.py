"""Turning rollouts (or gold solutions) into the learner's padded tensors.

Pure functions: lists of token ids in, one right-padded ``TrainBatch`` out. The
labels are the input ids shifted by one inside the learner, so ``response_mask[t]``
marks that token ``t`` is a completion token whose log-probability gets loss.
"""
from __future__ import annotations

import torch

from rl.learner.group import TrainBatch


def pad_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  response_logprobs: list[list[float]] | None = None):
    """Right-padded ids, attention mask, response mask and rollout logprobs aligned to tokens."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    B, T = len(prompts), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    resp = torch.zeros((B, T), dtype=torch.float32)
    lps = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p):n] = 1.0
        if response_logprobs is not None:
            lps[i, len(p):n] = torch.tensor(response_logprobs[i], dtype=torch.float32)
    return ids, attn, resp, lps


def grpo_batch(prompt_ids: list[list[int]], completions: list, advantages: torch.Tensor, pad_id: int,
               max_tokens: int, overlong_mask: bool = False) -> TrainBatch:
    """``completions[i]`` is the i-th sampled Completion (groups contiguous), with its prompt's ids."""
    responses = [list(c.token_ids) for c in completions]
    ids, attn, resp, lps = pad_sequences(prompt_ids, responses, pad_id, [list(c.logprobs) for c in completions])
    if overlong_mask:
        # A completion cut at the length limit has no verdict on its ending: give it no loss
        # rather than teaching the policy that its truncated reasoning was bad (DAPO).
        cut = torch.tensor([c.finish_reason == "length" for c in completions])
        resp[cut] = 0.0
    return TrainBatch(input_ids=ids, attention_mask=attn, response_mask=resp,
                      advantages=advantages.to(torch.float32), rollout_logprobs=lps, max_tokens=max_tokens)


def sft_batch(prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int, max_tokens: int) -> TrainBatch:
    """Cross-entropy on gold solutions: the same tensors as GRPO, with zero advantages."""
    ids, attn, resp, lps = pad_sequences(prompt_ids, answer_ids, pad_id)
    return TrainBatch(input_ids=ids, attention_mask=attn, response_mask=resp,
                      advantages=torch.zeros(len(prompt_ids)), rollout_logprobs=lps, max_tokens=max_tokens)
