"""The learner's optimizer and learning-rate schedule.

AdamW over the trainable (LoRA) parameters only, and a LambdaLR whose factor is a pure
function of the optimizer step: linear warmup, then cosine decay to ``min_lr_ratio``
(or constant). One scheduler step is one optimizer step, so ``total_steps`` counts
``trainer.steps * learner.updates_per_batch`` updates; a skipped (non-finite) update
steps neither.

Left out: parameter groups with different learning rates for A and B (LoRA+), and
schedules other than cosine/constant; both are one function away if needed.
"""
from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str,
              min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        # (step + 1) so that the first update already moves: a zero-lr step wastes a batch.
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params, *, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check placement.target_modules "
                         "(the LoRA config matched no module)")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def build_scheduler(optimizer, *, warmup_steps: int, total_steps: int, schedule: str,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                 schedule=schedule, min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
