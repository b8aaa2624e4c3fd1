"""The fixed-policy control of the regime contrast: how alike are two batches' gradients when
the policy does not move?

A cross-step cosine during training mixes two things: the sampling noise of one batch
against another, and the drift of the policy between steps. At step 0, with the policy
held fixed, the cosine between the gradients of independent batches (disjoint prompts,
independent samples) measures the first alone. If training's lag-1 cosine sits at this
level, drift explains none of it; below it, the policy's motion is decorrelating steps.

Each batch is the size of one training step of its regime: GRPO, prompts_per_step
prompts with group_size completions each (one rollout and reward pass,
``rl.placement_probe``; groups with equal rewards have no gradient and are left
out); SFT, as many gold solutions as the regime's own step trains on. The gradient is
that of the frozen weight (the rank-free G of the diagnostics) for every watched module,
from the probe's hooks; its loss weights each sequence by the mean over its tokens
(the probe's loss), where training may weight by token (``algorithm.loss_agg``).

Left out: LoRA gradients (at B = 0 they are s G A^T, a fixed projection of G) and
checkpoints other than step 0.
"""
from __future__ import annotations

import itertools
import random

import torch

from rl.diagnostics import tensor_stats


def batch_rows(rows: list[dict], batches: int, size: int, seed: int) -> list[list[dict]]:
    """``batches`` disjoint sets of ``size`` rows, drawn with ``seed``."""
    if batches * size > len(rows):
        raise ValueError(f"the fixed-policy control needs {batches} x {size} = {batches * size} distinct prompts "
                         f"and the data has {len(rows)}; lower --control-batches")
    order = random.Random(seed).sample(range(len(rows)), batches * size)
    return [[rows[i] for i in order[k * size:(k + 1) * size]] for k in range(batches)]


def watched_modules(model, patterns: list[str]) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == p or n.endswith("." + p) for p in patterns)]


def pair_statistics(grads: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """For every pair of batches: cosine and sign agreement, each the mean over modules (as the
    diagnostics' ``*_mean`` over modules)."""
    out = []
    for a, b in itertools.combinations(range(len(grads)), 2):
        names = [n for n in grads[a] if n in grads[b]]
        cos = [tensor_stats.cosine(grads[a][n], grads[b][n]) for n in names]
        agree = [tensor_stats.sign_agreement(grads[a][n], grads[b][n]) for n in names]
        out.append({"pair": [a, b], "cos_mean": _nanmean(cos), "sign_agree_mean": _nanmean(agree)})
    return out


def control(cfg, loss: str, model_path: str, rows: list[dict], batches: int, seed: int) -> dict:
    """Pairwise cosines and sign agreements between ``batches`` independent step-0 batches of ``loss``."""
    from placement.probe import batch_gradients, build_probe
    from rl.placement_probe import grpo_probe_rows
    from placement.scoring import load_scoring_model
    from core.models import load_tokenizer

    if batches < 2:
        raise ValueError(f"the fixed-policy control needs at least 2 batches, got {batches}")
    tok = load_tokenizer(model_path)
    size = cfg.rollout.prompts_per_step
    max_tokens = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    probes, rollouts = [], []
    for part in batch_rows(rows, batches, size, seed):
        if loss == "grpo":
            part, summary = grpo_probe_rows(cfg, model_path, part, seed=seed)
            rollouts.append(summary)
        probes.append(build_probe(tok, part, loss, max_tokens))
    model = load_scoring_model(model_path, cfg.placement.probe_dtype)
    names = watched_modules(model, list(cfg.diagnostics.modules))
    grads = [{n: g.float().cpu() for n, g in batch_gradients(model, p, names).items()} for p in probes]
    del model
    pairs = pair_statistics(grads)
    return {"loss": loss, "batches": batches, "sequences_per_batch": [len(p.sequences) for p in probes],
            "tokens_per_batch": [p.num_tokens for p in probes], "modules": len(names), "pairs": pairs,
            "cos_mean": [p["cos_mean"] for p in pairs], "sign_agree_mean": [p["sign_agree_mean"] for p in pairs],
            "rollouts": rollouts}


def _nanmean(v: list[float]) -> float:
    ok = [x for x in v if x == x]
    return sum(ok) / len(ok) if ok else float("nan")
