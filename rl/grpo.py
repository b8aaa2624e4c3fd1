"""GRPO math as pure functions on torch tensors: advantages (written in core/advantages.py, which
the placement probe shares), per-token log-probabilities,
entropy, KL estimators, loss aggregation, the clipped policy loss, the importance corrections for
the gap between the policy that sampled and the one that learns (TIS, MIS, IcePop), and the SFT
loss that shares the same aggregation.

Conventions: responses are padded to ``[B, T]``; ``mask`` is the response-token mask (bool or
0/1 float) and every reduction is over masked-in tokens only. Values at masked-out positions are
replaced by 0 before any arithmetic, so NaN or inf there cannot leak into a loss or a gradient.

Gradient accumulation and data parallelism: every loss here is a sum of per-token (or
per-sequence) terms divided by a normaliser. When a batch is split into micro-batches and ranks,
pass the GLOBAL normaliser (``num_tokens`` = masked tokens of the whole batch, ``num_sequences``
= sequences of the whole batch) to each piece; then the piece losses SUM to the full-batch loss
and their gradients sum to the full-batch gradient. Without them each piece is normalised by its
own counts (a mean over the piece), which is what a single-piece batch wants.

Deliberately left out: sequence-level ratios inside the clipped objective (GSPO), two-sided ratio caps (TRL's
``delta``), CISPO/SAPO/VESPO losses, entropy bonuses and entropy masks, batch-level reward
scaling, and multi-reward normalise-then-sum. Nothing here touches a model or a process group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.advantages import group_advantages, zero_variance_groups  # noqa: F401 - part of the GRPO math

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


class _LabelLogprob(torch.autograd.Function):
    """log softmax(logits / T)[label], one sequence at a time.

    Only the input logits and a [B, T] logsumexp are kept for backward; the softmax is recomputed
    per sequence there, so no float32 [B, T, V] copy lives between forward and backward even when
    the logits are bf16 or a temperature applies.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        valid = labels >= 0
        safe = torch.where(valid, labels, 0)
        out = torch.empty(labels.shape, dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for b in range(logits.shape[0]):
            row = logits[b].to(dtype) / temperature
            lse[b] = torch.logsumexp(row, dim=-1)
            out[b] = row.gather(-1, safe[b, :, None]).squeeze(-1) - lse[b]
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.temperature = temperature
        return torch.where(valid, out, 0.0)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        t = ctx.temperature
        g_out = torch.where(valid, grad_out, 0.0)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b in range(logits.shape[0]):
            # d(x_y - lse(x))/dx = onehot(y) - softmax(x), with x = logits / T
            p = torch.exp(logits[b].to(lse.dtype) / t - lse[b, :, None])
            g = -p * g_out[b, :, None]
            g.scatter_add_(-1, safe[b, :, None], g_out[b, :, None])
            grad[b] = (g / t).to(logits.dtype)
        return grad, None, None


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(label) = z_label / T - logsumexp(z / T) for logits z [B, T, V], labels [B, T].

    Result in float32 (float64 for float64 logits). Works one sequence at a time so the float
    copy is one [T, V] row, in forward and backward alike. Negative labels (e.g. -100 padding)
    give 0 and no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0; use rollout.temperature > 0")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return _LabelLogprob.apply(logits, labels, float(temperature))


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H = -sum_v p_v log p_v with p = softmax(z / T), per position: [B, T, V] -> [B, T].

    One sequence at a time; differentiable, but under autograd each row's float copy is kept for
    backward, so call it under ``torch.no_grad()`` when it is only logged.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0; use rollout.temperature > 0")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for b in range(logits.shape[0]):
        logp = torch.log_softmax(logits[b].to(dtype) / temperature, dim=-1)
        rows.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.stack(rows)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled by pi_theta (Schulman 2020).

    With log r = ref_logprobs - logprobs:
      k1 = -log r                  (unbiased, can be negative)
      k2 = (log r)^2 / 2           (biased, low variance)
      k3 = (r - 1) - log r         (unbiased, >= 0; TRL's ``beta`` term)
    No clamping, so values match TRL's k3 exactly.
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_estimator={estimator!r} is not one of {KL_ESTIMATORS}; "
                     "set algorithm.kl_estimator to k1, k2 or k3")


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def aggregate(values: Tensor, mask: Tensor, mode: str, max_tokens: int | None = None,
              num_sequences: int | None = None, num_tokens: float | None = None) -> Tensor:
    """Reduce per-token ``values`` [B, T] under ``mask`` [B, T] to a scalar.

    token-mean:              sum_{i,t} m v / N_tok                  (TRL "dapo"; "bnpo" per piece)
    seq-mean-token-mean:     sum_i (sum_t m v / sum_t m) / N_seq    (TRL "grpo")
    seq-mean-token-sum-norm: sum_i (sum_t m v / max_tokens) / N_seq (Dr. GRPO, TRL "dr_grpo")

    N_tok = ``num_tokens`` and N_seq = ``num_sequences`` when given: the GLOBAL counts over all
    micro-batches and ranks of one optimiser step, so the losses of the pieces sum to the
    full-batch loss (and so do their gradients). When omitted they are this call's own counts
    (sum of mask, B). A sequence with no masked-in tokens contributes 0 but still counts in N_seq.
    ``max_tokens`` is the generation budget (rollout.max_new_tokens), a constant, not the padded
    length, so that pieces padded differently agree.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same [B, T] shape")
    weight = mask.to(values.dtype)
    token_sum = (_masked(values, mask) * weight).sum(dim=-1)
    n_seq = values.shape[0] if num_sequences is None else num_sequences
    if mode == "token-mean":
        n_tok = weight.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return token_sum.sum() / n_tok
    if mode == "seq-mean-token-mean":
        return (token_sum / weight.sum(dim=-1).clamp(min=1.0)).sum() / max(n_seq, 1)
    if mode == "seq-mean-token-sum-norm":
        if max_tokens is None or max_tokens < 1:
            raise ValueError("loss_agg='seq-mean-token-sum-norm' needs max_tokens >= 1; "
                             "pass the generation budget rollout.max_new_tokens")
        return (token_sum / max_tokens).sum() / max(n_seq, 1)
    raise ValueError(f"loss_agg={mode!r} is not one of {LOSS_AGG_MODES}; set algorithm.loss_agg to one of them")


def batch_normaliser(mode: str, num_tokens: float, num_sequences: int) -> float:
    """What :func:`aggregate` divides a whole batch's summed loss by under ``mode``.

    A batch learned in parts whose sizes are not known in advance (``trainer.stream_groups``)
    sums its pieces with ``num_tokens=1, num_sequences=1`` and divides the summed gradient by
    this once the batch is complete: the same gradient as the whole batch at once.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg={mode!r} is not one of {LOSS_AGG_MODES}; set algorithm.loss_agg to one of them")
    return max(float(num_tokens), 1.0) if mode == "token-mean" else float(max(num_sequences, 1))


def _token_mean(values: Tensor, mask: Tensor) -> Tensor:
    weight = mask.to(values.dtype)
    return ((_masked(values, mask) * weight).sum() / weight.sum().clamp(min=1.0)).detach()


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_agg: str = "token-mean",
                max_tokens: int | None = None, num_sequences: int | None = None,
                num_tokens: float | None = None, ref_logprobs: Tensor | None = None,
                kl_coef: float = 0.0, kl_estimator: str = "k3", is_weights: Tensor | None = None,
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (PPO/GRPO, DAPO clip-higher) plus an optional KL-to-reference term.

    rho = exp(logprobs - old_logprobs), A = advantages [B] broadcast over tokens,
      l_t = -min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A) * w_t + kl_coef * kl_t
    where w_t = ``is_weights`` (truncated IS on the rollout/learner mismatch; 1 when None; it
    weights the policy-gradient term only, as TRL's ``importance_sampling_ratio`` does) and kl_t =
    kl_penalty(logprobs, ref_logprobs, kl_estimator). The loss is aggregate(l, mask, loss_agg, ...).

    Metrics (detached, token means over this call's mask): clip_low_fraction (rho < 1-eps_low
    with A < 0, where the clip removes the gradient), clip_high_fraction (rho > 1+eps_high with
    A > 0), clip_fraction (either), ratio_mean, kl (when ref_logprobs is given); pg_loss is the
    policy-gradient part aggregated exactly like the loss (so it sums over pieces like the loss).
    """
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"advantages must be [B]={logprobs.shape[0]}, got shape {tuple(advantages.shape)}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs; pass them or set algorithm.kl_coef=0")
    logprobs = _masked(logprobs, mask)
    old_logprobs = _masked(old_logprobs, mask)
    adv = advantages.to(logprobs.dtype)[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        pg = pg * _masked(is_weights, mask).detach()
    agg = dict(mode=loss_agg, max_tokens=max_tokens, num_sequences=num_sequences, num_tokens=num_tokens)
    pg_loss = aggregate(pg, mask, **agg)
    loss = pg_loss
    with torch.no_grad():
        low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(logprobs.dtype)
        high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(logprobs.dtype)
        metrics = {
            "clip_fraction": _token_mean(torch.maximum(low, high), mask),
            "clip_low_fraction": _token_mean(low, mask),
            "clip_high_fraction": _token_mean(high, mask),
            "ratio_mean": _token_mean(ratio, mask),
            "pg_loss": pg_loss.detach(),
        }
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, _masked(ref_logprobs, mask), kl_estimator)
        metrics["kl"] = _token_mean(kl, mask)
        if kl_coef != 0.0:
            loss = loss + kl_coef * aggregate(kl, mask, **agg)
    return loss, metrics


def truncated_is_weights(learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                         cap: float) -> Tensor:
    """w_t = min(exp(learner_t - rollout_t), cap), detached; 0 at masked-out tokens.

    Corrects for sampling from the rollout engine's policy while the learner computes the
    gradient (truncated importance sampling; TRL's vllm_importance_sampling_mode="token_truncate"
    with clip_max=cap). A NaN rollout logprob (the engine could not score the token) gives w = 1.
    """
    if cap <= 0:
        raise ValueError(f"cap={cap} must be > 0; set algorithm.tis_cap >= 1 with algorithm.is_correction=tis")
    with torch.no_grad():
        diff = torch.nan_to_num(learner_logprobs.detach() - rollout_logprobs, nan=0.0)
        w = torch.exp(_masked(diff, mask)).clamp(max=cap)
        return _masked(w, mask)


def _log_ratio(learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log(pi_learner / pi_rollout) per token, detached; 0 at masked-out tokens and where the
    rollout logprob is NaN (the engine could not score the token: taken as no mismatch)."""
    diff = torch.nan_to_num(learner_logprobs.detach() - rollout_logprobs, nan=0.0)
    return _masked(diff, mask)


def _check_band(low: float, high: float, field: str) -> None:
    if not 0 < low < 1 < high:
        raise ValueError(f"band [{low}, {high}] must satisfy 0 < low < 1 < high; "
                         f"set algorithm.{field}_low and algorithm.{field}_high around 1")


def sequence_is_mask(learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                     low: float, high: float) -> Tensor:
    """MIS: weight 1 on every token of a sequence whose ratio lies in [low, high], 0 on the
    whole sequence otherwise (and 0 at masked-out tokens); detached.

    The sequence ratio is the GEOMETRIC MEAN of the token ratios, exp(mean_t log(learner_t /
    rollout_t)), not their product: the product's log is a sum over tokens, so one band would
    drop long completions for the same per-token drift that it lets through in short ones (a
    drift of 0.01 nats a token is a product of e^5 = 148 over 500 tokens). verl's rollout_is
    calls the product level "sequence" and this one "geometric". A sequence with no masked-in
    tokens has ratio 1.
    """
    _check_band(low, high, "mis")
    with torch.no_grad():
        log_r = _log_ratio(learner_logprobs, rollout_logprobs, mask)
        n = mask.to(log_r.dtype).sum(dim=-1)
        seq_ratio = torch.exp(log_r.sum(dim=-1) / n.clamp(min=1.0))
        keep = (seq_ratio >= low) & (seq_ratio <= high)
        return _masked(keep[:, None].to(log_r.dtype).expand_as(log_r), mask)


def icepop_weights(learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                   low: float = 0.5, high: float = 2.0) -> Tensor:
    """IcePop (Ring-1T): w_t = k_t if low <= k_t <= high else 0, with k_t = pi_learner / pi_rollout
    on token t; detached, 0 at masked-out tokens.

    Inside the band the token keeps its importance weight (as TIS without the cap); outside it the
    token is dropped from the policy gradient instead of being clipped, so a token the two engines
    disagree on badly contributes nothing rather than a capped, still wrong, amount.
    """
    _check_band(low, high, "icepop")
    with torch.no_grad():
        k = torch.exp(_log_ratio(learner_logprobs, rollout_logprobs, mask))
        inside = (k >= low) & (k <= high)
        return _masked(torch.where(inside, k, 0.0), mask)


IS_CORRECTIONS = ("none", "tis", "mis", "icepop")


def correction_weights(kind: str, learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *,
                       tis_cap: float = 0.0, mis_band: tuple[float, float] = (0.5, 2.0),
                       icepop_band: tuple[float, float] = (0.5, 2.0)) -> Tensor | None:
    """The policy-gradient weights [B, T] of ``algorithm.is_correction`` (None for ``none``).

    ``learner_logprobs`` are the learner's logprobs BEFORE the update (the policy that learns),
    ``rollout_logprobs`` the engine's at sampling time (the policy that sampled, possibly older
    by up to ``trainer.max_staleness`` adapter versions).
    """
    if kind == "none":
        return None
    if kind == "tis":
        return truncated_is_weights(learner_logprobs, rollout_logprobs, mask, tis_cap)
    if kind == "mis":
        return sequence_is_mask(learner_logprobs, rollout_logprobs, mask, *mis_band)
    if kind == "icepop":
        return icepop_weights(learner_logprobs, rollout_logprobs, mask, *icepop_band)
    raise ValueError(f"is_correction={kind!r} is not one of {IS_CORRECTIONS}; set algorithm.is_correction to one of them")


def configured_correction(algorithm, learner_logprobs: Tensor, rollout_logprobs: Tensor,
                          mask: Tensor) -> Tensor | None:
    """``correction_weights`` with the fields of an ``rl.config.AlgorithmConfig`` (the learner
    ranks weight the loss with it, the learner group measures what it masked with it)."""
    a = algorithm
    return correction_weights(a.is_correction, learner_logprobs, rollout_logprobs, mask, tis_cap=a.tis_cap,
                              mis_band=(a.mis_low, a.mis_high), icepop_band=(a.icepop_low, a.icepop_high))


def masked_fractions(weights: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
    """How much of a batch a correction dropped: masked_token_frac (masked-in tokens with weight
    0) and masked_seq_frac (sequences whose masked-in tokens all have weight 0); 0 without weights."""
    with torch.no_grad():
        m = mask.bool()
        if weights is None or not m.any():
            zero = torch.zeros(())
            return {"masked_token_frac": zero, "masked_seq_frac": zero}
        dropped = m & (weights == 0)
        has_tokens = m.any(dim=-1)
        seq_dropped = has_tokens & (dropped.sum(dim=-1) == m.sum(dim=-1))
        return {"masked_token_frac": dropped.sum() / m.sum(),
                "masked_seq_frac": seq_dropped.sum() / has_tokens.sum()}


def logprob_mismatch(learner_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the rollout engine's token logprobs are from the learner's, over masked-in tokens.

    abs_diff_mean / abs_diff_max: mean and max |learner - rollout|; kl_k3: token mean of
    k3 = exp(d) - 1 - d with d = learner - rollout, an estimate of KL(pi_rollout || pi_learner) from
    the rollout's own samples. Tokens with NaN rollout logprobs are left out; with no tokens, all 0.
    """
    with torch.no_grad():
        d = learner_logprobs.detach() - rollout_logprobs
        keep = mask.bool() & ~torch.isnan(d)
        d = torch.where(keep, d, 0.0)
        if not keep.any():
            zero = d.new_zeros(())
            return {"abs_diff_mean": zero, "abs_diff_max": zero, "kl_k3": zero}
        return {"abs_diff_mean": _token_mean(d.abs(), keep), "abs_diff_max": d.abs()[keep].max(),
                "kl_k3": _token_mean(torch.expm1(d) - d, keep)}


def sft_loss(logprobs: Tensor, mask: Tensor, loss_agg: str = "token-mean", max_tokens: int | None = None,
             num_sequences: int | None = None, num_tokens: float | None = None) -> Tensor:
    """Negative log-likelihood of the target tokens: aggregate(-logprobs, mask, loss_agg, ...)."""
    return aggregate(-_masked(logprobs, mask), mask, loss_agg, max_tokens=max_tokens,
                     num_sequences=num_sequences, num_tokens=num_tokens)
