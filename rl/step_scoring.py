"""A GRPO step's completions scored: rewards, group advantages, the rows that train, and the
step's rollout and reward metrics.

The whole-batch step scores its batch once; a streamed step (``trainer.stream_groups``) scores
each part as its groups finish and merges the parts' metrics at the end. Both go through
:func:`score_groups` and :func:`step_metrics`, so the two log the same numbers for the same
completions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.grpo import group_advantages, zero_variance_groups
from rl.learner.batch import grpo_batch


@dataclass
class ScoredGroups:
    """Whole groups of completions with their rewards, and the rows of them that train."""

    result: object  # rewards.RewardResult, one entry per completion
    rewards: torch.Tensor  # [groups x G] weighted totals (NaN where a grader failed)
    flat: torch.Tensor  # [groups] bool: every reward of the group equal (advantage 0)
    completions: list  # [groups x G] Completions, group by group
    train_batch: object | None  # rl.learner.group.TrainBatch of the kept rows; None when none is kept


def score_groups(cfg, reward_runner, pad_id: int, rows: list[dict], groups: list[list]) -> ScoredGroups:
    """Score ``groups`` (one per dataset row of ``rows``, G completions each) and build the
    TrainBatch of the rows that train (flat groups dropped with ``algorithm.filter_zero_variance``)."""
    G = cfg.rollout.group_size
    flat_rows = [r for r in rows for _ in range(G)]
    completions = [c for g in groups for c in g]
    result = reward_runner.score([r["prompt"] for r in flat_rows], [c.text for c in completions],
                                 {k: [r[k] for r in flat_rows] for k in ("question", "answer", "gold")},
                                 completion_ids=[c.token_ids for c in completions])
    rewards = torch.tensor(result.total, dtype=torch.float64)
    adv = group_advantages(rewards, G, std_normalize=cfg.algorithm.std_normalize)
    flat = zero_variance_groups(rewards, G)
    keep = torch.ones(len(completions), dtype=torch.bool)
    if cfg.algorithm.filter_zero_variance:
        keep = ~flat.repeat_interleave(G)
    train_batch = None
    if keep.any():
        idx = keep.nonzero().flatten().tolist()
        train_batch = grpo_batch([flat_rows[i]["prompt_ids"] for i in idx], [completions[i] for i in idx], adv[idx],
                                 pad_id, cfg.rollout.max_new_tokens, cfg.algorithm.overlong_mask)
    return ScoredGroups(result, rewards, flat, completions, train_batch)


def step_metrics(parts: list[ScoredGroups], rollout_s: float, call_s: dict, reward_s: float) -> dict[str, float]:
    """The rollout and reward metrics of a step scored in ``parts`` (one for a whole batch)."""
    from rewards.runner import RewardResult

    completions = [c for p in parts for c in p.completions]
    rewards = torch.cat([p.rewards for p in parts])
    new_tokens = sum(len(c.token_ids) for c in completions)
    m = RewardResult.concat([p.result for p in parts]).metrics()
    # A NaN total is a sample whose grader failed: out of the group statistics (advantage 0),
    # out of the means, counted in reward/failed_samples.
    graded = rewards[~rewards.isnan()]
    m.update({"reward/mean": graded.mean().item() if graded.numel() else float("nan"),
              "reward/std": graded.std().item() if graded.numel() > 1 else float("nan"),
              "groups/zero_variance_frac": torch.cat([p.flat for p in parts]).float().mean().item(),
              "rollout/response_tokens_mean": new_tokens / len(completions),
              "rollout/truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
              "time/rollout_s": rollout_s, "time/reward_s": reward_s,
              # The engine's own part of time/rollout_s (the slowest worker's), where it times it.
              **{f"time/rollout_{k}": v for k, v in call_s.items()},
              "throughput/rollout_tokens_per_s": new_tokens / max(rollout_s, 1e-9)})
    return m
