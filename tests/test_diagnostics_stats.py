"""Gradient statistics (rl.diagnostics.tensor_stats, rl.diagnostics.capture_stats): ranks against numpy's SVD,
cosines, sign agreement and consistency, and importance spread on known inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rl.diagnostics import tensor_stats
from rl.diagnostics.capture_stats import CrossStepHistory


def _low_rank(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1, rank)  # distinct singular values, not a flat spectrum
    return (torch.randn(rows, rank, generator=g) * scales) @ torch.randn(rank, cols, generator=g)


# ----------------------------------------------------------------------------- spectra

@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (64, 64)])
def test_exact_ranks_match_numpy_on_random_matrices(shape, numpy_ranks):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    sp = tensor_stats.spectrum(m, max_rank_dim=256)
    eff, stable = numpy_ranks(m)
    assert sp.exact
    assert tensor_stats.effective_rank(sp) == pytest.approx(eff, rel=1e-9)
    assert tensor_stats.stable_rank(sp) == pytest.approx(stable, rel=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 12])
def test_exact_ranks_match_numpy_on_low_rank_matrices(rank, numpy_ranks):
    m = _low_rank(50, 90, rank, seed=rank)
    eff, stable = numpy_ranks(m)
    got = tensor_stats.effective_rank(tensor_stats.spectrum(m, max_rank_dim=256))
    # float32 storage leaves zero singular values near 1e-7 of the top one; they must not count
    assert got == pytest.approx(eff, rel=1e-4)
    assert got <= rank + 1e-3
    assert tensor_stats.stable_rank(tensor_stats.spectrum(m)) == pytest.approx(stable, rel=1e-6)


def test_randomized_path_is_exact_for_rank_below_k(numpy_ranks):
    m = _low_rank(300, 500, 10, seed=0)
    sp = tensor_stats.spectrum(m, max_rank_dim=32)
    eff, stable = numpy_ranks(m)
    assert not sp.exact and sp.top.numel() == 32 and sp.tail_count == 300 - 32
    assert tensor_stats.spectrum(m, max_rank_dim=80).exact  # a sketch of 90 of 300 would cost more
    assert sp.tail_energy == pytest.approx(0.0, abs=1e-6 * sp.fro_sq)
    assert tensor_stats.effective_rank(sp) == pytest.approx(eff, rel=1e-5)
    assert tensor_stats.stable_rank(sp) == pytest.approx(stable, rel=1e-6)


def test_randomized_path_on_a_full_rank_matrix_is_close(numpy_ranks):
    m = torch.randn(400, 700, generator=torch.Generator().manual_seed(3))
    sp = tensor_stats.spectrum(m, max_rank_dim=64)
    eff, stable = numpy_ranks(m)
    s_np = np.linalg.svd(m.double().numpy(), compute_uv=False)
    assert not sp.exact
    # a flat (Gaussian) spectrum is the sketch's worst case: the leading values stay within
    # 0.5%, the last of the k come out a few percent low (documented)
    np.testing.assert_allclose(sp.top.numpy()[:10], s_np[:10], rtol=5e-3)
    assert tensor_stats.stable_rank(sp) == pytest.approx(stable, rel=5e-3)
    assert eff <= tensor_stats.effective_rank(sp) <= 1.06 * eff


def test_randomized_path_on_a_decaying_spectrum_beats_a_flat_tail(numpy_ranks):
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(400, 400, generator=g))
    v, _ = torch.linalg.qr(torch.randn(700, 400, generator=g))
    m = (u * torch.arange(1, 401.0) ** -0.8) @ v.T  # sigma_i = i^-0.8
    eff, _ = numpy_ranks(m)
    sp = tensor_stats.spectrum(m, max_rank_dim=64)
    flat = math.sqrt(sp.tail_energy / sp.tail_count)
    flat_eff = tensor_stats.effective_rank(torch.cat([sp.top, torch.full((sp.tail_count,), flat, dtype=torch.float64)]))
    assert abs(tensor_stats.effective_rank(sp) - eff) < 0.5 * abs(flat_eff - eff)
    assert tensor_stats.effective_rank(sp) == pytest.approx(eff, rel=0.03)


def test_zero_matrix_has_rank_zero():
    sp = tensor_stats.spectrum(torch.zeros(5, 8))
    assert tensor_stats.effective_rank(sp) == 0.0 and tensor_stats.stable_rank(sp) == 0.0
    assert tensor_stats.effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)


# ----------------------------------------------------------------------------- cosines and signs

def test_cosine_and_sign_agreement_on_known_vectors():
    a = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0])
    assert tensor_stats.cosine(a, 2 * a) == pytest.approx(1.0)
    assert tensor_stats.cosine(a, -a) == pytest.approx(-1.0)
    assert tensor_stats.cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(0.0)
    assert math.isnan(tensor_stats.cosine(a, torch.zeros(5)))
    b = torch.tensor([2.0, 1.0, 2.0, 5.0, -1.0])  # both nonzero at 0,1,2,4; same sign at 0,2
    assert tensor_stats.sign_agreement(a, b) == pytest.approx(0.5)


def test_sign_consistency_on_a_known_sequence():
    seq = [torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([2.0, -1.0, 3.0, 0.0]),
           torch.tensor([0.5, 1.0, 1.0, 0.0]), torch.tensor([1.0, -2.0, -1.0, 0.0])]
    # per entry |sum sign| / 4: 1, 0, 0.5, 0 -> mean 0.375
    assert tensor_stats.sign_consistency(seq) == pytest.approx(0.375)


def test_cross_step_history_lags_and_window():
    g = torch.tensor([1.0, -2.0, 3.0, -4.0])
    hist = CrossStepHistory(lags=2, window=3)
    first = hist.update(g.clone())
    assert first == {"zero_grad": 0.0}
    second = hist.update(-g)
    assert second["cos_lag1"] == pytest.approx(-1.0) and second["sign_agree"] == 0.0
    assert "sign_consistency" not in second  # window not full yet
    third = hist.update(2 * g)
    assert third["cos_lag1"] == pytest.approx(-1.0) and third["cos_lag2"] == pytest.approx(1.0)
    assert third["sign_consistency"] == pytest.approx(1 / 3)
    fourth = hist.update(g)  # window now (-g, 2g, g): the first g left it
    assert fourth["sign_consistency"] == pytest.approx(1 / 3)
    assert "cos_lag3" not in fourth and fourth["cos_lag2"] == pytest.approx(-1.0)
    fifth = hist.update(g)  # window (2g, g, g)
    assert fifth["sign_consistency"] == pytest.approx(1.0)


def test_importance_spread_and_top_share():
    imp = tensor_stats.importance({"layers.0": 1.0, "layers.1": 2.0, "layers.2": 3.0, "layers.3": 4.0})
    assert imp.shares["layers.3"] == pytest.approx(0.4)
    assert imp.spread == pytest.approx(4.0)
    assert imp.top_share == pytest.approx(0.7)  # top ceil(0.3 * 4) = 2 layers: 0.4 + 0.3
    flat = tensor_stats.importance({str(i): 5.0 for i in range(10)})
    assert flat.spread == pytest.approx(1.0) and flat.top_share == pytest.approx(0.3)
    assert flat.gini == pytest.approx(0.0) and imp.gini == pytest.approx(0.25) and imp.top_count == 2
    assert tensor_stats.importance({"a": 0.0, "b": 1.0}).spread == math.inf


def _brute_consistency(window: list[torch.Tensor]) -> float:
    """Entry by entry, with Python ints: |number of + minus number of -| / T, averaged."""
    total = 0.0
    for i in range(window[0].numel()):
        s = sum((1 if float(g[i]) > 0 else -1 if float(g[i]) < 0 else 0) for g in window)
        total += abs(s) / len(window)
    return total / window[0].numel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_window_leaves_zero_captures_out(seed):
    gen = torch.Generator().manual_seed(seed)
    window, caps = 5, []
    for t in range(14):  # GRPO-like: some captures are all-zero (every group flat)
        zero = bool(torch.rand(1, generator=gen) < 0.35)
        g = torch.zeros(40) if zero else torch.randn(40, generator=gen) * (torch.rand(40, generator=gen) > 0.1)
        caps.append(g)
    hist = CrossStepHistory(lags=2, window=window)
    nonzero: list[torch.Tensor] = []
    for g in caps:
        out = hist.update(g.clone())
        if not g.any():
            assert out == {"zero_grad": 1.0}
            continue
        nonzero.append(g)
        if len(nonzero) >= window:
            expect = _brute_consistency(nonzero[-window:])
            assert out["sign_consistency"] == pytest.approx(expect)
            assert tensor_stats.sign_consistency(nonzero[-window:]) == pytest.approx(expect)
        else:
            assert "sign_consistency" not in out
        if len(nonzero) > 1:  # the lag is the previous non-zero capture
            assert out["cos_lag1"] == pytest.approx(tensor_stats.cosine(g, nonzero[-2]), abs=1e-6)
    assert len(nonzero) >= window  # the seeds give full windows


def test_pure_sign_consistency_skips_zero_captures_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    live = [torch.randn(30, generator=gen) for _ in range(3)]
    seq = [live[0], torch.zeros(30), live[1], torch.zeros(30), live[2]]
    assert tensor_stats.sign_consistency(seq) == pytest.approx(_brute_consistency(live))
    assert math.isnan(tensor_stats.sign_consistency([torch.zeros(3), torch.zeros(3)]))


def test_sign_consistency_chance_by_enumeration_and_the_old_bias():
    import itertools

    for T in range(1, 9):
        brute = sum(abs(sum(p)) for p in itertools.product((-1, 1), repeat=T)) / (2 ** T * T)
        assert tensor_stats.sign_consistency_chance(T) == pytest.approx(brute)
    assert tensor_stats.sign_consistency_chance(5) == pytest.approx(0.375)
    # Random signs, 3 or 4 of 5 captures non-zero: dividing by the window (the old count)
    # gives E|S_k| / 5 = 0.300 for both k; leaving the zeros out gives the chance level of k.
    for k in (3, 4):
        old = sum(abs(sum(p)) for p in itertools.product((-1, 1), repeat=k)) / (2 ** k * 5)
        assert old == pytest.approx(0.300)
        gen = torch.Generator().manual_seed(k)
        seq = [torch.randn(200_000, generator=gen) for _ in range(k)] + [torch.zeros(200_000)] * (5 - k)
        assert tensor_stats.sign_consistency(seq) == pytest.approx(tensor_stats.sign_consistency_chance(k), abs=3e-3)


def test_gini_and_top_k_share():
    assert tensor_stats.gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert tensor_stats.gini([0, 0, 0, 4]) == pytest.approx(0.75)  # (n - 1) / n
    assert tensor_stats.gini([1, 2, 3, 4]) == pytest.approx(0.25)  # mean |x_i - x_j| / (2 mean)
    assert tensor_stats.top_k_share([1, 2, 3, 4], 1) == pytest.approx(0.4)
    assert tensor_stats.top_k_share([1, 2, 3, 4], 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-negative"):
        tensor_stats.gini([1, -1])


def test_bootstrap_intervals():
    from rl.diagnostics.confidence import bootstrap_ci, seed_capture_ci

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(400, generator=gen).tolist()
    ci = bootstrap_ci(v)
    half = 1.96 / math.sqrt(400)
    assert ci.low < ci.estimate < ci.high and ci.n == 400
    assert 0.85 * half < (ci.high - ci.low) / 2 < 1.15 * half
    assert bootstrap_ci([0.3] * 5).text() == "0.300 [0.300, 0.300]"
    assert bootstrap_ci([float("nan")]).n == 0
    # Captures tight around seed-specific means far apart: the seed level must show in the interval.
    runs = [[m + 0.001 * i for i in range(30)] for m in (0.0, 1.0, 2.0)]
    two_level, pooled = seed_capture_ci(runs), bootstrap_ci([x for r in runs for x in r])
    assert two_level.n == 3 and two_level.estimate == pytest.approx(1.0145)
    assert two_level.high - two_level.low > 4 * (pooled.high - pooled.low)


def test_paired_difference_ci():
    from rl.diagnostics.confidence import paired_difference_ci

    rng = torch.Generator().manual_seed(1)
    base = [(torch.rand(1000, generator=rng) < 0.3).float().tolist() for _ in range(3)]
    same = paired_difference_ci(base, base)
    assert same.estimate == 0.0 and same.low < 0.01 and same.high > -0.01
    # The arm solves what each base seed solved plus 10% of the problems more.
    arm = [[1.0 if i % 10 == 0 else x for i, x in enumerate(r)] for r in base]
    ci = paired_difference_ci(base, arm)
    expect = sum(sum(a) - sum(b) for a, b in zip(arm, base)) / 3000
    assert ci.estimate == pytest.approx(expect) and ci.excludes(0.0) and ci.low > 0.03
    with pytest.raises(ValueError, match="same 1000 problems"):
        paired_difference_ci(base, [r[:10] for r in arm])


def test_chance_levels():
    from rl.diagnostics.confidence import chance_level

    assert chance_level("diag/lora/cos_lag2_mean") == 0.0
    assert chance_level("diag/G/down_proj/sign_agree_mean") == 0.5
    assert chance_level("sign_consistency_mean", window=5) == pytest.approx(0.375)
    assert chance_level("importance_top30_share", layers=30) == pytest.approx(0.3)
    assert chance_level("importance_top30_share", layers=24) == pytest.approx(8 / 24)
    assert chance_level("importance_gini") == 0.0 and chance_level("eff_rank_mean") is None


def test_seed_paired_difference():
    from rl.diagnostics.confidence import seed_capture_difference_ci

    base = [[0.1, 0.12, 0.11], [0.5, 0.52, 0.51], [0.9, 0.91, 0.92]]  # seeds far apart
    arm = [[x + 0.05 for x in r] for r in base]  # every seed 0.05 higher
    ci = seed_capture_difference_ci(base, arm)
    assert ci.estimate == pytest.approx(0.05) and ci.excludes(0.0) and ci.high - ci.low < 0.03 and ci.n == 3
    noise = seed_capture_difference_ci(base, [list(reversed(r)) for r in base])
    assert not noise.excludes(0.0)


def test_spectrum_survives_an_eigensolver_that_does_not_converge(monkeypatch):
    # cuSOLVER's syevd failed to converge on an ill-conditioned Gram matrix in a GRPO run on a
    # GPU and stopped training; the LAPACK and SVD fallbacks must give the same spectrum.
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(12, 40, generator=gen, dtype=torch.float64)
    m[6:] = m[:6] * 1e-9  # nearly rank 6
    want = torch.linalg.svdvals(m)
    calls = []
    real = torch.linalg.eigvalsh

    def fails_first(g, *a, **k):
        calls.append(g.device)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(g, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigvalsh", fails_first)
    got = tensor_stats.spectrum(m).top
    assert len(calls) == 2 and torch.allclose(got[:6], want[:6], rtol=1e-6)

    def never_converges(g, *a, **k):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", never_converges)
    got = tensor_stats.spectrum(m).top
    assert torch.allclose(got[:6], want[:6], rtol=1e-6)
    assert tensor_stats.effective_rank(tensor_stats.spectrum(m)) == pytest.approx(
        tensor_stats.effective_rank(want), rel=1e-6)
