"""core.advantages (GRPO's and Dr. GRPO's group-relative advantages) against hand-computed values."""

import math

import pytest
import torch

from core.advantages import group_advantages, zero_variance_groups

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def test_group_advantages_std_normalised_by_hand():
    # group 1: mean 0.5, unbiased std sqrt(1/3) = 0.57735; 0.5 / (0.57735 + 1e-4) = 0.8658754
    # group 2: all equal -> 0
    adv = group_advantages(t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    want = t([0.8658754, -0.8658754, -0.8658754, 0.8658754, 0, 0, 0, 0])
    torch.testing.assert_close(adv, want, atol=1e-7, rtol=0)
    # pairs: mean 2, std sqrt(2); 1 / (1.41421 + 1e-4) = 0.7070568
    adv = group_advantages(t([3.0, 1.0, 5.0, 5.0]), group_size=2)
    torch.testing.assert_close(adv, t([0.7070568, -0.7070568, 0, 0]), atol=1e-7, rtol=0)


def test_dr_grpo_advantages_are_mean_centred_only():
    r = t([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    adv = group_advantages(r, group_size=4, std_normalize=False)
    torch.testing.assert_close(adv, t([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]))
    normed = group_advantages(r, group_size=4)
    # same sign, different scale: group 2 has std sqrt(2/3), so it is scaled by 1/(0.8165 + 1e-4)
    assert torch.equal(torch.sign(adv), torch.sign(normed))
    assert normed[4].item() == pytest.approx(1.0 / (math.sqrt(2 / 3) + 1e-4), abs=1e-9)
    assert not torch.allclose(adv, normed)


def test_group_advantages_nan_rewards_are_left_out_and_get_zero():
    # scored {1, 0, 1}: mean 2/3, unbiased std sqrt(1/3); (1/3)/0.57745 = 0.5772503, (2/3)/0.57745 = 1.1545006
    adv = group_advantages(t([1.0, float("nan"), 0.0, 1.0]), group_size=4)
    torch.testing.assert_close(adv, t([0.5772503, 0.0, -1.1545006, 0.5772503]), atol=1e-7, rtol=0)
    # a single scored reward carries no relative signal; [1, 2]: 0.5 / (sqrt(1/2) + 1e-4) = 0.7070068
    adv = group_advantages(t([5.0, float("nan"), 1.0, 2.0]), group_size=2)
    torch.testing.assert_close(adv, t([0.0, 0.0, -0.7070068, 0.7070068]), atol=1e-7, rtol=0)


def test_group_advantages_bad_group_size_is_one_line_error():
    with pytest.raises(ValueError, match="group_size=3 does not divide") as e:
        group_advantages(t([1.0, 2.0, 3.0, 4.0]), group_size=3)
    assert "\n" not in str(e.value)


def test_zero_variance_groups():
    r = t([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, float("nan"), float("nan"), 1.0])
    assert zero_variance_groups(r, 3).tolist() == [False, True, True, True]
    assert zero_variance_groups(t([0.1 + 0.2, 0.3]), 2).tolist() == [True]
