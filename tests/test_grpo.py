"""rl.grpo against hand-computed values, masking, and micro-batch / rank decomposition."""

import math

import pytest
import torch

from rl import grpo

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------- logprobs, entropy
def test_token_logprobs_by_hand():
    # softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]; at T=2 exp(z/2) = [1, 1, sqrt 2]
    logits = t([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]]])
    labels = torch.tensor([[2, 0]])
    torch.testing.assert_close(grpo.token_logprobs(logits, labels), t([[-0.6931472, -1.3862944]]),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(grpo.token_logprobs(logits, labels, temperature=2.0),
                               t([[-0.8813736, -1.2279472]]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.3)])
def test_token_logprobs_matches_log_softmax_gather(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype)
    labels = torch.randint(0, 50, (3, 6), generator=g)
    x1 = full.clone().requires_grad_()
    x2 = full.clone().requires_grad_()
    mine = grpo.token_logprobs(x1[:, :-1], labels, temperature)  # a non-contiguous slice, as in training
    ref = torch.log_softmax(x2[:, :-1].float() / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(3, 6, generator=g)
    (mine * w).sum().backward()
    (ref * w).sum().backward()
    assert x1.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), atol=tol, rtol=tol)
    assert torch.all(x1.grad[:, -1] == 0)


def test_token_logprobs_gradcheck_and_ignored_labels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    labels = torch.tensor([[1, 4, -100], [0, -100, 2]])
    assert torch.autograd.gradcheck(lambda z: grpo.token_logprobs(z, labels, 0.9), (logits,))
    out = grpo.token_logprobs(logits, labels)
    assert out[0, 2].item() == 0.0 and out[1, 1].item() == 0.0
    out.sum().backward()
    assert torch.all(logits.grad[0, 2] == 0) and torch.all(logits.grad[1, 1] == 0)
    with pytest.raises(ValueError, match="temperature=0"):
        grpo.token_logprobs(logits, labels, 0.0)


def test_entropy_by_hand_and_vs_direct():
    # H([1/4, 1/4, 1/2]) = 0.5 ln 4 + 0.5 ln 2 = 1.0397208; uniform over 3 = ln 3 = 1.0986123
    logits = t([[[0.0, 0.0, math.log(2.0)], [5.0, 5.0, 5.0]]])
    torch.testing.assert_close(grpo.entropy_from_logits(logits), t([[1.0397208, 1.0986123]]), atol=1e-7, rtol=0)
    g = torch.Generator().manual_seed(2)
    z = 4 * torch.randn(2, 5, 30, generator=g)
    for temp in (1.0, 0.6):
        direct = torch.distributions.Categorical(logits=z / temp).entropy()
        torch.testing.assert_close(grpo.entropy_from_logits(z, temp), direct, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- KL
def test_kl_estimators_by_hand():
    lp, ref = t([-1.0, -2.0]), t([-2.0, -1.0])  # log r = ref - lp = [-1, 1]
    torch.testing.assert_close(grpo.kl_penalty(lp, ref, "k1"), t([1.0, -1.0]))
    torch.testing.assert_close(grpo.kl_penalty(lp, ref, "k2"), t([0.5, 0.5]))
    # k3 = e^{log r} - 1 - log r: e^-1 = 0.3678794, e - 2 = 0.7182818
    torch.testing.assert_close(grpo.kl_penalty(lp, ref, "k3"), t([0.3678794, 0.7182818]), atol=1e-7, rtol=0)
    assert torch.all(grpo.kl_penalty(lp, lp, "k3") == 0)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        grpo.kl_penalty(lp, ref, "k4")


# ---------------------------------------------------------------- aggregation
def test_aggregate_modes_by_hand():
    v = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert grpo.aggregate(v, m, "token-mean").item() == pytest.approx(7 / 3)
    assert grpo.aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4.0) / 2)
    assert grpo.aggregate(v, m, "seq-mean-token-sum-norm", max_tokens=4).item() == pytest.approx((3 / 4 + 4 / 4) / 2)
    # global counts: 10 tokens / 5 sequences in the whole batch
    assert grpo.aggregate(v, m.float(), "token-mean", num_tokens=10).item() == pytest.approx(0.7)
    assert grpo.aggregate(v, m, "seq-mean-token-mean", num_sequences=5).item() == pytest.approx(5.5 / 5)
    with pytest.raises(ValueError, match="needs max_tokens"):
        grpo.aggregate(v, m, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="loss_agg='sum'"):
        grpo.aggregate(v, m, "sum")


def test_sft_loss_by_hand():
    lp = t([[-1.0, -2.0, -9.0], [-0.5, -7.0, -7.0]])
    m = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert grpo.sft_loss(lp, m).item() == pytest.approx(3.5 / 3)
    assert grpo.sft_loss(lp, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 0.5) / 2)


# ---------------------------------------------------------------- policy loss
def _ratios_case(adv):
    ratios = t([[0.5, 1.0, 1.2, 1.5]])
    old = t([[-1.0, -2.0, -0.5, -3.0]])
    lp = (old + ratios.log()).requires_grad_()
    return lp, old, t([adv]), torch.ones(1, 4, dtype=torch.bool)


def test_clip_high_with_positive_advantage():
    lp, old, adv, m = _ratios_case(1.0)
    # eps_high 0.28: -min(r, clip(r)) = [-0.5, -1, -1.2, -1.28]; the 1.5 token is clipped (no gradient)
    loss, met = grpo.policy_loss(lp, old, adv, m, epsilon_low=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-3.98 / 4)
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[-0.5, -1.0, -1.2, 0.0]]) / 4)
    assert met["clip_high_fraction"].item() == pytest.approx(0.25)
    assert met["clip_low_fraction"].item() == 0.0 and met["clip_fraction"].item() == pytest.approx(0.25)
    assert met["ratio_mean"].item() == pytest.approx(4.2 / 4)
    assert "kl" not in met and not met["pg_loss"].requires_grad
    # a wider upper epsilon lets the 1.5 token through
    loss, met = grpo.policy_loss(lp, old, adv, m, epsilon_high=0.6)
    assert loss.item() == pytest.approx(-4.2 / 4) and met["clip_fraction"].item() == 0.0


def test_clip_low_with_negative_advantage():
    lp, old, adv, m = _ratios_case(-1.0)
    # eps_low 0.2: max(r, clip(r)) = [0.8, 1, 1.2, 1.5]; the 0.5 token is clipped, 1.5 is not (pessimistic)
    loss, met = grpo.policy_loss(lp, old, adv, m, epsilon_low=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(4.5 / 4)
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[0.0, 1.0, 1.2, 1.5]]) / 4)
    assert met["clip_low_fraction"].item() == pytest.approx(0.25)
    assert met["clip_high_fraction"].item() == 0.0
    loss, met = grpo.policy_loss(lp, old, adv, m, epsilon_low=0.6)
    assert loss.item() == pytest.approx(4.2 / 4) and met["clip_fraction"].item() == 0.0


def test_kl_term_and_is_weights_by_hand():
    lp = t([[-1.0]]).requires_grad_()
    m = torch.ones(1, 1)
    # ratio 1, A = 2: pg = -2; ref = lp - 1 -> k3 = e^-1 = 0.3678794; loss = -2 + 0.1 * 0.3678794
    loss, met = grpo.policy_loss(lp, lp.detach(), t([2.0]), m, ref_logprobs=t([[-2.0]]), kl_coef=0.1)
    assert loss.item() == pytest.approx(-1.9632121, abs=1e-7)
    assert met["kl"].item() == pytest.approx(0.3678794, abs=1e-7) and met["pg_loss"].item() == pytest.approx(-2.0)
    loss, _ = grpo.policy_loss(lp, lp.detach(), t([2.0]), m, ref_logprobs=t([[-2.0]]), kl_coef=0.1,
                               kl_estimator="k2")
    assert loss.item() == pytest.approx(-2.0 + 0.1 * 0.5)
    # IS weights scale the policy-gradient term per token: -(0.5 + 2) / 2
    lp2 = t([[-1.0, -1.0]])
    loss, _ = grpo.policy_loss(lp2, lp2, t([1.0]), torch.ones(1, 2), is_weights=t([[0.5, 2.0]]))
    assert loss.item() == pytest.approx(-1.25)
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        grpo.policy_loss(lp2, lp2, t([1.0]), torch.ones(1, 2), kl_coef=0.1)


def _batch(seed=0, b=6, tlen=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 2, 5, 1, 6, 3])[:b]
    mask = torch.arange(tlen)[None, :] < lengths[:, None]
    old = -torch.rand(b, tlen, generator=g, dtype=F64) * 3
    lp = old + 0.4 * torch.randn(b, tlen, generator=g, dtype=F64)  # ratios spread across both clip edges
    ref = old + 0.3 * torch.randn(b, tlen, generator=g, dtype=F64)
    isw = torch.rand(b, tlen, generator=g, dtype=F64) * 2
    adv = torch.randn(b, generator=g, dtype=F64)
    return lp, old, ref, isw, adv, mask


LOSS_KW = dict(epsilon_low=0.2, epsilon_high=0.28, kl_coef=0.05, max_tokens=8)


def test_masked_tokens_are_ignored():
    lp, old, ref, isw, adv, mask = _batch()
    garbage = torch.where(mask, 0.0, torch.tensor(float("nan"), dtype=F64))
    huge = torch.where(mask, 0.0, torch.tensor(1e4, dtype=F64))
    for mode in grpo.LOSS_AGG_MODES:
        a = lp.clone().requires_grad_()
        b = (lp + garbage).requires_grad_()
        kw = dict(LOSS_KW, loss_agg=mode)
        la, ma = grpo.policy_loss(a, old, adv, mask, ref_logprobs=ref, is_weights=isw, **kw)
        lb, mb = grpo.policy_loss(b, old - huge, adv, mask.float(), ref_logprobs=ref + garbage,
                                  is_weights=isw + huge, **kw)
        la.backward()
        lb.backward()
        assert torch.isfinite(lb) and lb.item() == pytest.approx(la.item(), abs=1e-12)
        torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=0)
        assert torch.all(b.grad[~mask] == 0)
        for k in ma:
            assert mb[k].item() == pytest.approx(ma[k].item(), abs=1e-12), k
    assert grpo.sft_loss(lp + garbage, mask).item() == pytest.approx(grpo.sft_loss(lp, mask).item())
    mean = grpo.aggregate(lp + huge, mask, "token-mean")
    assert mean.item() == pytest.approx(grpo.aggregate(lp, mask, "token-mean").item())


@pytest.mark.parametrize("mode", grpo.LOSS_AGG_MODES)
def test_micro_batches_and_ranks_sum_to_full_batch(mode):
    lp, old, ref, isw, adv, mask = _batch(seed=3)
    kw = dict(LOSS_KW, loss_agg=mode)
    full_lp = lp.clone().requires_grad_()
    full, _ = grpo.policy_loss(full_lp, old, adv, mask, ref_logprobs=ref, is_weights=isw, **kw)
    full.backward()
    n_seq, n_tok = mask.shape[0], mask.sum().item()
    piece_lp = lp.clone().requires_grad_()
    total, local_total = 0.0, 0.0
    # unequal pieces, as on ranks with different micro-batch counts; each cut to its own padding
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        tmax = int(mask[lo:hi].sum(-1).max())
        sl = (slice(lo, hi), slice(0, tmax))
        args = (piece_lp[sl], old[sl], adv[lo:hi], mask[sl])
        loss, _ = grpo.policy_loss(*args, ref_logprobs=ref[sl], is_weights=isw[sl], num_sequences=n_seq,
                                   num_tokens=n_tok, **kw)
        loss.backward()
        total += loss.item()
        local, _ = grpo.policy_loss(*args, ref_logprobs=ref[sl], is_weights=isw[sl], **kw)
        local_total += local.item()
    assert total == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(piece_lp.grad, full_lp.grad, atol=1e-12, rtol=0)
    # without global counts the pieces do not add up (the test would notice a missing normaliser)
    assert abs(local_total - full.item()) > 1e-3
    sft_pieces = sum(grpo.sft_loss(lp[lo:hi], mask[lo:hi], mode, 8, n_seq, n_tok).item()
                     for lo, hi in [(0, 2), (2, 6)])
    assert sft_pieces == pytest.approx(grpo.sft_loss(lp, mask, mode, 8).item(), abs=1e-12)


# ---------------------------------------------------------------- rollout / learner mismatch
def test_truncated_is_weights_by_hand():
    learner = t([[-1.0, -1.0, -1.0, -1.0, -1.0]]).requires_grad_()
    rollout = t([[-1.0, -1.0 - math.log(2), -1.0 - math.log(5), float("nan"), 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w = grpo.truncated_is_weights(learner, rollout, mask, cap=3.0)
    torch.testing.assert_close(w, t([[1.0, 2.0, 3.0, 1.0, 0.0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap=0"):
        grpo.truncated_is_weights(learner, rollout, mask, cap=0)


def test_logprob_mismatch_by_hand():
    learner = t([[-1.0, -2.0, -3.0, -1.0]])
    rollout = t([[-1.5, -2.0, -1.0, float("nan")]])
    mask = torch.tensor([[True, True, False, True]])
    out = grpo.logprob_mismatch(learner, rollout, mask)
    # d = [0.5, 0]: mean |d| 0.25, max 0.5, k3 mean (e^0.5 - 1.5 + 0) / 2 = 0.0743606
    assert out["abs_diff_mean"].item() == pytest.approx(0.25)
    assert out["abs_diff_max"].item() == pytest.approx(0.5)
    assert out["kl_k3"].item() == pytest.approx(0.0743606, abs=1e-7)
    empty = grpo.logprob_mismatch(learner, rollout, torch.zeros(1, 4, dtype=torch.bool))
    assert all(v.item() == 0.0 for v in empty.values())


# ---------------------------------------------------------------- importance corrections
def test_sequence_mask_keeps_sequences_whose_geometric_mean_ratio_is_in_the_band():
    # Rows: learner - rollout per token; position 0 is the prompt (masked out, its value ignored).
    nan = float("nan")
    learner = t([[9.0, 0.2, -0.2, 0.0],     # ratios e^.2, e^-.2: geometric mean 1 -> kept
                 [9.0, 0.3, 0.3, 0.3],      # geometric mean e^.3 = 1.35 > 1.25 -> dropped
                 [9.0, 0.1, 0.1, 0.1],      # geometric mean e^.1 = 1.105 -> kept
                 [0.1, 0.1, 0.1, 0.1],      # four tokens: the PRODUCT e^.4 = 1.49 would leave the band,
                                            # the geometric mean e^.1 does not -> kept
                 [9.0, -0.3, 0.0, 0.0],     # mean -0.1: e^-.1 = 0.905 >= 0.8 -> kept
                 [9.0, -0.9, 0.0, 0.0],     # mean -0.3: e^-.3 = 0.741 < 0.8 -> dropped
                 [9.0, 0.0, 0.0, 0.0]])     # no masked-in tokens: ratio 1, all weights 0 anyway
    rollout = torch.zeros_like(learner)
    rollout[0, 3] = nan  # masked out here; an unscored masked-in token counts as ratio 1 (below)
    rollout[4, 2] = nan
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1],
                         [0, 0, 0, 0]])
    w = grpo.sequence_is_mask(learner, rollout, mask, low=0.8, high=1.25)
    expected = mask.float() * t([1, 0, 1, 1, 1, 0, 0])[:, None]
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="algorithm.mis_low and algorithm.mis_high"):
        grpo.sequence_is_mask(learner, rollout, mask, low=1.0, high=2.0)


def test_icepop_gives_tokens_outside_the_band_zero_weight_and_keeps_k_inside():
    k = t([[2.5, 1.5, 0.4, 0.5, 2.0, 1.0]])
    learner = torch.log(k).requires_grad_()
    rollout = torch.zeros_like(k)
    rollout[0, 5] = float("nan")
    mask = torch.tensor([[1, 1, 1, 1, 1, 1]])
    w = grpo.icepop_weights(learner, rollout, mask, low=0.5, high=2.0)
    # 2.5 and 0.4 leave [0.5, 2]: 0; inside, the weight is the ratio itself (the bounds included).
    torch.testing.assert_close(w, t([[0.0, 1.5, 0.0, 0.5, 2.0, 1.0]]))
    assert not w.requires_grad
    masked_out = grpo.icepop_weights(learner, rollout, torch.tensor([[0, 1, 1, 1, 1, 1]]))
    assert masked_out[0, 0].item() == 0.0
    fr = grpo.masked_fractions(w, mask)
    assert fr["masked_token_frac"].item() == pytest.approx(2 / 6) and fr["masked_seq_frac"].item() == 0.0


def test_correction_weights_dispatch_and_masked_fractions_by_hand():
    learner = t([[0.0, math.log(3.0), 0.0], [0.0, 1.0, 1.0]])
    rollout = torch.zeros_like(learner)
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    assert grpo.correction_weights("none", learner, rollout, mask) is None
    torch.testing.assert_close(grpo.correction_weights("tis", learner, rollout, mask, tis_cap=2.0),
                               t([[0.0, 2.0, 1.0], [0.0, 2.0, 2.0]]))
    # Geometric means: row 0 sqrt(3) = 1.73 and row 1 e = 2.72, both above 1.5: both dropped.
    mis = grpo.correction_weights("mis", learner, rollout, mask, mis_band=(0.5, 1.5))
    torch.testing.assert_close(mis, torch.zeros(2, 3, dtype=mis.dtype))
    fr = grpo.masked_fractions(mis, mask)
    assert fr["masked_token_frac"].item() == 1.0 and fr["masked_seq_frac"].item() == 1.0
    ice = grpo.correction_weights("icepop", learner, rollout, mask, icepop_band=(0.5, 2.9))
    torch.testing.assert_close(ice, t([[0.0, 0.0, 1.0], [0.0, math.e, math.e]]))
    fr = grpo.masked_fractions(ice, mask)
    assert fr["masked_token_frac"].item() == pytest.approx(0.25) and fr["masked_seq_frac"].item() == 0.0
    assert all(v.item() == 0.0 for v in grpo.masked_fractions(None, mask).values())
    with pytest.raises(ValueError, match="set algorithm.is_correction"):
        grpo.correction_weights("vtrace", learner, rollout, mask)


def test_icepop_weights_the_policy_gradient_token_by_token():
    # With old = current (ratio 1, no clipping) and advantage 1, the token-mean loss is
    # -sum_t w_t / N: IcePop's weights [0, 1.5, 0] over 3 tokens give -0.5.
    lp = t([[-1.0, -1.0, -1.0]])
    k = t([[3.0, 1.5, 0.1]])
    w = grpo.icepop_weights(lp, lp - torch.log(k), torch.ones(1, 3))
    loss, _ = grpo.policy_loss(lp, lp, t([1.0]), torch.ones(1, 3), is_weights=w)
    assert loss.item() == pytest.approx(-0.5)
