"""Pure statistics on gradient tensors: spectra, ranks, cosines, signs, layer importance.

Everything here is a function of tensors in, numbers out, with no state and no hooks;
``rl.diagnostics.capture`` decides what to measure and when.

Spectra are computed without a full SVD of a large matrix:

- exact path (``n = min(d_out, d_in) <= max_rank_dim``, or ``n < 4 (max_rank_dim +
  oversample)`` where a sketch that wide costs more than the exact path: on an H100,
  576 x 1536 took 6 ms exact and 26 ms randomized with k = 256): the eigenvalues of the smaller
  Gram matrix ``M M^T`` or ``M^T M`` in float64 are the squared singular values. The
  Gram is formed in float64 because in float32 its rounding noise (1e-7 of the top
  eigenvalue) becomes hundreds of spurious singular values near 3e-4 of the top one,
  which inflates the effective rank of a low-rank matrix.
- randomized path (above that size): Halko-Martinsson-Tropp range finder with power
  iterations gives the top ``k = max_rank_dim`` singular values: with 4 iterations
  sigma_1 within 0.2%, the last of the k up to 5% low on a flat (Gaussian) spectrum,
  the sketch's worst case. The stable rank needs only ``||M||_F^2`` (exact) and
  ``sigma_1``, so it stays within 0.5%. The effective rank needs every
  singular value, so the spectrum is completed by spreading the residual energy
  ``||M||_F^2 - sum_{i<=k} sigma_i^2`` over the remaining ``n - k`` values as a power
  law continuing from ``sigma_k``, ``sigma_i = sigma_k (i/k)^-a``, with ``a`` chosen so
  that the tail carries exactly the residual energy (a flat tail when even ``a = 0``
  cannot hold it). It is exact when the matrix has rank <= k. On Gaussian, power-law
  and sum-of-token-outer-product matrices of 576 x 1536 with k = 256 (forced) it over-estimated
  the effective rank by 0.3-3% (a flat tail, the maximum-entropy completion: 1-6%);
  where the true spectrum stops abruptly after rank k' > k it over-estimates more
  (rank 300 of 576, k = 256: +20%). Raise ``max_rank_dim`` where that matters.
  ``Spectrum.exact`` says which path ran.

Left out on purpose: per-sample gradients, anything distributed (callers reduce
first), and the nuclear norm or other spectral summaries nobody logs yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

TOP_SHARE_FRACTION = 0.3  # "top-30% share": the importance held by the top 30% of layers


@dataclass(frozen=True)
class Spectrum:
    """Singular values of one matrix, exactly or as the top k plus the residual energy."""

    top: torch.Tensor  # float64, descending; every singular value on the exact path
    tail_energy: float  # sum of squares of the singular values not in ``top`` (0 if exact)
    tail_count: int  # how many singular values are not in ``top``
    fro_sq: float  # ||M||_F^2
    exact: bool


def frobenius_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().reshape(-1), dtype=torch.float64))


def spectrum(m: torch.Tensor, max_rank_dim: int = 256, n_iter: int = 4,
             oversample: int = 10, seed: int = 0) -> Spectrum:
    """The singular values of a 2-D ``m`` (see the module docstring for the two paths)."""
    if m.dim() != 2:
        raise ValueError(f"spectrum needs a 2-D matrix, got shape {tuple(m.shape)}")
    m = m.detach()
    if uses_exact_path(m.shape, max_rank_dim, oversample):
        return spectrum_from_gram(gram(m))
    n = min(m.shape)
    fro_sq = float(torch.linalg.vector_norm(m.reshape(-1), dtype=torch.float64) ** 2)
    top = _randomized_singular_values(m, max_rank_dim, n_iter, oversample, seed)
    tail = max(fro_sq - float((top ** 2).sum()), 0.0)
    return Spectrum(top, tail, n - top.numel(), fro_sq, False)


def uses_exact_path(shape: Sequence[int], max_rank_dim: int, oversample: int = 10) -> bool:
    """Whether ``spectrum`` takes the exact (Gram) path for a matrix of this shape."""
    n = min(shape)
    return n <= max_rank_dim or n < 4 * (max_rank_dim + oversample)


def gram(m: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of ``m`` in float64 (its eigenvalues are the squared singular values)."""
    m64 = m.detach().to(torch.float64)
    return m64 @ m64.T if m.shape[0] <= m.shape[1] else m64.T @ m64


def spectrum_from_gram(g: torch.Tensor) -> Spectrum:
    """The exact spectrum from a precomputed ``gram(m)`` (which may come from another device)."""
    eig = gram_eigenvalues(g.to(torch.float64))  # ascending; tiny negatives are rounding
    return Spectrum(eig.clamp_min(0).sqrt().flip(0), 0.0, 0, float(torch.diagonal(g).sum()), True)


def gram_eigenvalues(g: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of a symmetric positive semi-definite ``g``, ascending.

    cuSOLVER's eigensolver can fail to converge on an ill-conditioned Gram matrix (a nearly
    rank-deficient gradient), which would stop the training step that captured it; LAPACK on
    the CPU is tried next, then an SVD (a PSD matrix's singular values are its eigenvalues).
    """
    try:
        return torch.linalg.eigvalsh(g)
    except torch.linalg.LinAlgError:
        pass
    cpu = g.cpu()
    try:
        return torch.linalg.eigvalsh(cpu)
    except torch.linalg.LinAlgError:
        return torch.linalg.svdvals(cpu).flip(0)


def _randomized_singular_values(m: torch.Tensor, k: int, n_iter: int, oversample: int,
                                seed: int) -> torch.Tensor:
    work = m.float()
    if work.shape[0] < work.shape[1]:  # singular values are those of the transpose
        work = work.T
    rows, cols = work.shape
    width = min(k + oversample, cols)
    gen = torch.Generator(device=work.device).manual_seed(seed)
    omega = torch.randn(cols, width, device=work.device, dtype=work.dtype, generator=gen)
    y = work @ omega
    for _ in range(n_iter):  # power iterations sharpen the subspace where the spectrum decays slowly
        q, _ = torch.linalg.qr(y)
        z, _ = torch.linalg.qr(work.T @ q)
        y = work @ z
    # The final basis and projection are in float64 so that the residual energy of an
    # exactly low-rank matrix comes out as ~0 rather than float32 noise.
    q, _ = torch.linalg.qr(y.to(torch.float64))
    b = q.T @ work.to(torch.float64)
    return torch.linalg.svdvals(b)[:k]


def effective_rank(s: Spectrum | torch.Tensor) -> float:
    """Roy & Vetterli: exp(-sum p_k log p_k) with p_k = sigma_k / sum sigma; 0 for a zero matrix."""
    sigma = completed_singular_values(s) if isinstance(s, Spectrum) else s.detach().to(torch.float64).cpu()
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def completed_singular_values(sp: Spectrum) -> torch.Tensor:
    """All singular values: ``top`` plus, on the randomized path, the modelled tail (float64, CPU)."""
    top = sp.top.detach().to(torch.float64).cpu()
    if sp.tail_count == 0 or sp.tail_energy <= 0 or top.numel() == 0:
        return top
    s_k, k, m = float(top[-1]), top.numel(), sp.tail_count
    if s_k <= 0 or sp.tail_energy >= m * s_k ** 2:  # even a flat tail at sigma_k cannot hold it
        return torch.cat([top, torch.full((m,), min(math.sqrt(sp.tail_energy / m), s_k), dtype=torch.float64)])
    ratio = torch.arange(k + 1, k + m + 1, dtype=torch.float64) / k
    lo, hi = 0.0, 64.0  # tail energy falls monotonically with the exponent: bisect
    for _ in range(60):
        a = (lo + hi) / 2
        if float(((s_k * ratio ** -a) ** 2).sum()) > sp.tail_energy:
            lo = a
        else:
            hi = a
    return torch.cat([top, s_k * ratio ** -((lo + hi) / 2)])


def stable_rank(s: Spectrum | torch.Tensor) -> float:
    """sum sigma^2 / sigma_1^2 (= ||M||_F^2 / ||M||_2^2); 0 for a zero matrix."""
    if isinstance(s, Spectrum):
        top, fro_sq = s.top, s.fro_sq
    else:
        top = s.to(torch.float64)
        fro_sq = float((top ** 2).sum())
    if top.numel() == 0 or float(top[0]) <= 0:
        return 0.0
    return fro_sq / float(top[0]) ** 2


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two gradients, flattened; NaN when either is zero."""
    a64 = a.detach().reshape(-1).to(torch.float64)
    b64 = b.detach().reshape(-1).to(torch.float64)
    if a64.numel() != b64.numel():
        raise ValueError(f"cosine needs tensors of equal size, got {a64.numel()} and {b64.numel()}")
    na, nb = float(a64.norm()), float(b64.norm())
    if na == 0 or nb == 0:
        return float("nan")
    return float(a64 @ b64) / (na * nb)


def sign_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of entries where a and b have the same sign, among entries nonzero in both; NaN if none."""
    sa, sb = torch.sign(a.detach().reshape(-1)), torch.sign(b.detach().reshape(-1))
    both = (sa != 0) & (sb != 0)
    n = int(both.sum())
    if n == 0:
        return float("nan")
    return int(((sa == sb) & both).sum()) / n


def sign_consistency(grads: Sequence[torch.Tensor]) -> float:
    """Mean over entries of |sum_t sign g_t| / T over the T gradients of one parameter that are
    not all zero (a zero entry inside a non-zero gradient counts 0); NaN when every one is zero.

    An all-zero gradient (a GRPO batch whose groups all had equal rewards) says nothing
    about signs: counted in T it would pull the statistic toward 0 while its chance level
    stays that of a full window. With 3 or 4 random non-zero signs in a window of 5 the
    old count gave exactly 0.300 whatever the data, against 0.375 for 5 random signs.
    """
    if len(grads) == 0:
        raise ValueError("sign_consistency needs at least one gradient")
    total = torch.zeros(grads[0].numel(), dtype=torch.int32, device=grads[0].device)
    count = 0
    for g in grads:
        sign = torch.sign(g.detach().reshape(-1)).to(torch.int32)
        if bool(sign.any()):
            total += sign
            count += 1
    return sign_consistency_from_sum(total, count) if count else float("nan")


def sign_consistency_from_sum(sign_sum: torch.Tensor, count: int) -> float:
    """The same statistic from a running sum of signs over ``count`` non-zero gradients."""
    return int(sign_sum.abs().sum(dtype=torch.int64)) / (sign_sum.numel() * count)


def sign_consistency_chance(count: int) -> float:
    """E|S| / T for S the sum of T independent fair random signs: sign consistency's chance level.

    1 for T = 1, 0.5 for T = 2 and 3, 0.375 for T = 4 and 5; it falls like sqrt(2 / (pi T)).
    """
    if count < 1:
        raise ValueError(f"sign_consistency_chance needs at least one sign, got {count}")
    return sum(math.comb(count, k) * abs(2 * k - count) for k in range(count + 1)) / (2 ** count * count)


def gini(values: Sequence[float]) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (n - 1) / n when one holds all."""
    v = sorted(float(x) for x in values)
    if not v or any(x < 0 or math.isnan(x) for x in v):
        raise ValueError(f"gini needs non-negative values, got {list(values)[:5]}")
    total = sum(v)
    if total == 0:
        return float("nan")
    n = len(v)
    return sum((2 * (i + 1) - n - 1) * x for i, x in enumerate(v)) / (n * total)


def top_k_share(values: Sequence[float], k: int) -> float:
    """The share of the total held by the ``k`` largest values."""
    v = sorted((float(x) for x in values), reverse=True)
    total = sum(v)
    return sum(v[:k]) / total if total > 0 else float("nan")


@dataclass(frozen=True)
class Importance:
    """Layer importance I_l = N_l / sum N, and how unevenly it is spread."""

    shares: dict[str, float]
    spread: float  # max I / min I (inf when some layer has zero gradient)
    top_share: float  # the share held by the top ceil(30%) of layers
    gini: float  # 0 when every layer has the same share

    @property
    def top_count(self) -> int:
        """How many layers ``top_share`` covers."""
        return top_count(len(self.shares))


def top_count(n: int, top_fraction: float = TOP_SHARE_FRACTION) -> int:
    return max(1, math.ceil(top_fraction * n - 1e-9))


def importance(norms: dict[str, float], top_fraction: float = TOP_SHARE_FRACTION) -> Importance:
    """Shares of the total gradient norm per layer, the max/min spread, the top-30% share and the Gini."""
    if not norms:
        raise ValueError("importance needs the gradient norm of at least one layer")
    if any(v < 0 or math.isnan(v) for v in norms.values()):
        raise ValueError(f"importance needs non-negative norms, got {norms}")
    total = sum(norms.values())
    if total == 0:
        return Importance({k: float("nan") for k in norms}, float("nan"), float("nan"), float("nan"))
    shares = {k: v / total for k, v in norms.items()}
    lo, hi = min(shares.values()), max(shares.values())
    spread = hi / lo if lo > 0 else float("inf")
    top = top_k_share(list(shares.values()), top_count(len(shares), top_fraction))
    return Importance(shares, spread, top, gini(list(shares.values())))
