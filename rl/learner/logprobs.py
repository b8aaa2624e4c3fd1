"""Token logprobs straight from the final hidden states, the output projection a chunk at a time.

A causal LM's logits are ``[B, T, V]``: over SmolLM2's 49k vocabulary a micro-batch of 8 x 64
completion positions is 100 MB in float32, and autograd keeps the logits, their float copies and
their gradient alive between forward and backward (152k vocabulary on Qwen: three times that).
Here the output projection runs over the labelled positions only, ``chunk`` rows at a time; each
chunk's logits live only inside the loop, and backward recomputes them (one extra matmul of
the output layer) instead of keeping them. Rows without a label (prompt, padding) are skipped.

The result equals ``token_logprobs(lm_head(hidden), labels)`` (rl/grpo.py) up to float rounding,
and so do the gradients, for the hidden states and for the head's weight and bias when those
train: the matmuls run in the head's dtype and the softmax in float32, as on the whole-logits path.

:func:`logprob_head` runs the model's own forward with the head swapped for one that does this,
so that FSDP2 gathers the head's weight (tied to the embedding, sharded at the root) exactly as
it does for the plain head.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from rl.grpo import entropy_from_logits, token_logprobs

# Config fields of models whose forward changes the logits after the output projection
# (softcapping, scaling): those keep the whole-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _HeadLabelLogprob(torch.autograd.Function):
    """log softmax(head(h) / T)[label] and, without gradient, the entropy, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, chunk: int, with_entropy: bool,
                num_labels: int | None):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        labelled = labels.reshape(-1) >= 0
        # With the count known, the indices need no read-back from the device (nonzero's sync).
        idx = (labelled.nonzero() if num_labels is None else torch.nonzero_static(labelled, size=num_labels)).squeeze(1)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
        y = labels.reshape(-1).index_select(0, idx)
        lp = torch.zeros(labels.numel(), dtype=dtype, device=hidden.device)
        ent = torch.zeros_like(lp)
        lse = torch.empty(idx.numel(), dtype=dtype, device=hidden.device)
        for s in range(0, idx.numel(), chunk):
            z = F.linear(h[s:s + chunk], weight, bias).to(dtype) / temperature
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            lp[idx[s:s + chunk]] = z.gather(-1, y[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if with_entropy:
                # H = -sum p log p = lse - sum p z, with p = softmax(z)
                p = torch.exp(z - lse[s:s + chunk, None])
                ent[idx[s:s + chunk]] = lse[s:s + chunk] - (p * z).sum(dim=-1)
        ctx.save_for_backward(h, weight, bias, y, idx, lse)
        ctx.temperature, ctx.chunk, ctx.hidden_shape = temperature, chunk, hidden.shape
        lp, ent = lp.view(labels.shape), ent.view(labels.shape)
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        h, weight, bias, y, idx, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        g_rows = grad_lp.reshape(-1).index_select(0, idx).to(lse.dtype)
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for s in range(0, idx.numel(), chunk):
            hc, g = h[s:s + chunk], g_rows[s:s + chunk, None]
            z = F.linear(hc, weight, bias).to(lse.dtype) / t
            # d(z_y - lse(z))/dz = onehot(y) - softmax(z); z = logits / T
            dz = -torch.exp(z - lse[s:s + chunk, None]) * g
            dz.scatter_add_(-1, y[s:s + chunk, None], g)
            dlogits = (dz / t).to(hc.dtype)
            grad_h[s:s + chunk] = dlogits @ weight
            if need_w:
                grad_w += dlogits.T @ hc
            if need_b:
                grad_b += dlogits.sum(dim=0)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            n, width = ctx.hidden_shape[:-1].numel(), ctx.hidden_shape[-1]
            grad_hidden = h.new_zeros(n, width).index_copy_(0, idx, grad_h).view(ctx.hidden_shape)
        return grad_hidden, grad_w, grad_b, None, None, None, None, None


def head_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                        chunk: int = 1024, bias: Tensor | None = None,
                        with_entropy: bool = False, num_labels: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-token logprobs ``[B, T]`` of ``labels`` under ``softmax((hidden @ weight.T + bias) / T)``,
    and per-token entropies (zeros unless ``with_entropy``; no gradient).

    ``hidden`` [B, T, H], ``weight`` [V, H], ``labels`` [B, T]; negative labels give 0 and no
    gradient. Float32 results (float64 for float64 inputs). ``num_labels``: how many labels are
    not negative, where the caller knows it (it must be exact).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0; use rollout.temperature > 0")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1 (learner.logprob_chunk)")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and labels [B, T]; got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    return _HeadLabelLogprob.apply(hidden, weight, bias, labels, float(temperature), int(chunk), with_entropy,
                                   num_labels)


def logits_token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                          entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """The whole-logits path: ``token_logprobs`` of ``logits`` [B, T, V] and, if asked, the entropy
    summed over labelled positions (without gradient, 2048 rows of the logits at a time)."""
    lp = token_logprobs(logits, labels, temperature)
    if not entropy:
        return lp, None
    with torch.no_grad():
        rows, cols = (labels != -100).nonzero(as_tuple=True)
        total = logits.new_zeros((), dtype=torch.float32)
        for s in range(0, rows.numel(), 2048):
            total = total + entropy_from_logits(logits.detach()[rows[s:s + 2048], cols[s:s + 2048]][None],
                                                temperature).sum()
    return lp, total


def chunkable(model) -> bool:
    """Whether ``model``'s logits are its output layer applied to the last hidden states, and nothing more."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return False
    cfg = model.config
    return not any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS)


class _LogprobHead(torch.nn.Module):
    """Stands in for the output layer during one forward: returns ``[B, T, 2]`` (logprob, entropy)."""

    def __init__(self, head: torch.nn.Linear, labels: Tensor, temperature: float, chunk: int, entropy: bool,
                 num_labels: int | None):
        super().__init__()
        self.head = head
        self.labels, self.temperature, self.chunk, self.entropy = labels, temperature, chunk, entropy
        self.num_labels = num_labels

    def forward(self, hidden: Tensor) -> Tensor:
        # Read the weight here, inside the root's forward, where FSDP2 has gathered it.
        lp, ent = head_token_logprobs(hidden, self.head.weight, self.labels, self.temperature, self.chunk,
                                      self.head.bias, self.entropy, self.num_labels)
        return torch.stack([lp, ent], dim=-1)


@contextmanager
def logprob_head(model, labels: Tensor, temperature: float, chunk: int, entropy: bool = False,
                 num_labels: int | None = None):
    """Within this block ``model``'s forward returns, in place of logits, ``[B, t, 2]``: each kept
    position's logprob of its label and its entropy (``labels`` [B, t] aligned with the kept
    positions; ``num_labels`` as in :func:`head_token_logprobs`)."""
    head = model.get_output_embeddings()
    owner, name = next((m, n) for m in model.modules() for n, c in m.named_children() if c is head)
    setattr(owner, name, _LogprobHead(head, labels, temperature, chunk, entropy, num_labels))
    try:
        yield
    finally:
        setattr(owner, name, head)
