"""Turning rollouts (or gold solutions) into the learner's padded tensors.

Pure functions: lists of token ids in, one right-padded ``TrainBatch`` out. The
labels are the input ids shifted by one inside the learner, so ``response_mask[t]``
marks that token ``t`` is a completion token whose log-probability gets loss.
"""
from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from rl.learner.group import TrainBatch


def pad_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  response_logprobs: list[list[float]] | None = None):
    """Right-padded ids, attention mask, response mask and rollout logprobs aligned to tokens.

    Filled in one pass over flat arrays, not row by row: a boolean mask's positions, taken in
    row-major order, are each row's first ``len(prompt) + len(response)`` positions in turn, so
    the rows' tokens concatenated fill them exactly. For a GRPO step's 256 rows (95k tokens) on
    a 2-core host: 7-9 ms, where a tensor per row took 17-21 ms (bench/bench_step_scoring.py).
    """
    prompt_len = np.fromiter(map(len, prompts), dtype=np.int64, count=len(prompts))
    response_len = np.fromiter(map(len, responses), dtype=np.int64, count=len(responses))
    lengths = prompt_len + response_len
    B, T = len(prompts), int(lengths.max(initial=0))
    position = np.arange(T)
    real = position < lengths[:, None]
    in_response = real & (position >= prompt_len[:, None])
    ids = np.full((B, T), pad_id, dtype=np.int64)
    ids[real] = np.fromiter(chain.from_iterable(chain(p, r) for p, r in zip(prompts, responses)),
                            dtype=np.int64, count=int(lengths.sum()))
    lps = np.zeros((B, T), dtype=np.float32)
    if response_logprobs is not None:
        logprob_len = np.fromiter(map(len, response_logprobs), dtype=np.int64, count=B)
        if (wrong := np.flatnonzero(logprob_len != response_len)).size:
            i = int(wrong[0])
            raise ValueError(f"row {i}: {logprob_len[i]} rollout logprobs for {response_len[i]} response tokens; "
                             "the engine must return one logprob per sampled token")
        lps[in_response] = np.fromiter(chain.from_iterable(response_logprobs), dtype=np.float32,
                                       count=int(response_len.sum()))
    return (torch.from_numpy(ids), torch.from_numpy(real.astype(np.int64)),
            torch.from_numpy(in_response.astype(np.float32)), torch.from_numpy(lps))


def grpo_batch(prompt_ids: list[list[int]], completions: list, advantages: torch.Tensor, pad_id: int,
               max_tokens: int, overlong_mask: bool = False) -> TrainBatch:
    """``completions[i]`` is the i-th sampled Completion (groups contiguous), with its prompt's ids."""
    ids, attn, resp, lps = pad_sequences(prompt_ids, [c.token_ids for c in completions], pad_id,
                                         [c.logprobs for c in completions])
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
