"""Group-relative advantages: GRPO's (and Dr. GRPO's) A_i from the rewards of one prompt's group.

Written once for the two places that need them: the trainer (rl/trainer.py, through
rl/grpo.py) and the placement probe's policy-gradient loss (placement/probe.py).
The std is unbiased (n - 1), as TRL's ``nanstd``; NaN rewards (unscorable completions)
are left out of a group's statistics.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide len(rewards)={rewards.numel()}; "
                         "pass rewards of whole groups (rollout.group_size completions per prompt)")


def _grouped_stats(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group NaN-aware mean, Bessel-corrected std and count of scored (non-NaN) rewards."""
    _check_groups(rewards, group_size)
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)
    scored = ~torch.isnan(r)
    count = scored.sum(dim=1)
    mean = torch.where(scored, r, 0.0).sum(dim=1) / count.clamp(min=1)
    sq = torch.where(scored, (r - mean[:, None]) ** 2, 0.0).sum(dim=1)
    # TRL's nanstd: unbiased (n - 1); undefined (NaN) below two scored rewards.
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.nan)
    return mean, std, count


def group_advantages(rewards: Tensor, group_size: int, std_normalize: bool = True,
                     eps: float = 1e-4) -> Tensor:
    """Group-relative advantages, groups contiguous in ``rewards`` [N].

    A_i = (r_i - mean_g) / (std_g + eps) with std_normalize (GRPO; std unbiased, as TRL's
    ``nanstd``), A_i = r_i - mean_g without (Dr. GRPO). NaN rewards (unscorable completions) are
    left out of the group statistics and get advantage 0, as do all members of a group with fewer
    than two scored rewards (no relative signal).
    """
    mean, std, _ = _grouped_stats(rewards, group_size)
    r = rewards.to(mean.dtype).view(-1, group_size)
    adv = r - mean[:, None]
    if std_normalize:
        adv = adv / (std[:, None] + eps)
    return torch.nan_to_num(adv, nan=0.0).reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """bool [N // group_size]: True where a group carries no learning signal, i.e. its scored
    rewards are all equal (std close to 0, TRL's ``is_std_zero`` test) or fewer than two are scored.
    """
    _, std, count = _grouped_stats(rewards, group_size)
    return (count < 2) | torch.isclose(std, torch.zeros_like(std))
