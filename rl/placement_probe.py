"""GRPO probe rows: one rollout and one reward pass of the current policy over probe prompts.

The GRPO regime's gradients are those of the policy-gradient loss on the policy's own
samples, not of cross-entropy on gold answers (papers 000 and 002 are about the former).
So a GRPO probe is built the way one training step starts:

    prompts --(rollout engine, the run's sampling)--> G completions per prompt
            --(the run's reward functions)--> rewards
            --(rl.grpo.group_advantages, the run's std_normalize)--> advantages

and ``placement.probe.build_probe(source="grpo")`` turns each group into one probe sample
whose loss is -(1/G) sum_i A_i mean_t log p(token). Groups whose rewards are all equal
carry no gradient (every advantage is 0); they are left out and counted
(``flat_groups``), so that bmask's probe steps and PAGE's per-sample mean are over
samples with a signal.

The engine is ``placement.probe_engine``: ``hf`` (transformers, in this process; its
memory goes when it is dropped, before the run's own actors start) or ``vllm``. The
policy is the model at ``model_path``: the base model at step 0, or a merged checkpoint
(``placement.stability`` merges one).

Left out: several rollout passes (one pass is what the trainer would see at its first
step) and KL terms (the probe is at ratio 1, where the reference and policy agree).
"""
from __future__ import annotations

import dataclasses
import time

import torch

PROBE_SEED_OFFSET = 1_000_003  # keeps the probe's samples apart from the run's step-0 samples


def grpo_probe_rows(cfg, model_path: str, rows: list[dict], seed: int | None = None) -> tuple[list[dict], dict]:
    """Rows with ``completions``, ``completion_ids``, ``rewards`` and ``advantages`` for the
    groups that carry a signal, and a summary of the rollout.

    ``cfg`` is an ``rl.config.Config`` (rollout, reward, algorithm and placement sections);
    ``rows`` need ``prompt``, ``prompt_ids`` and the reward columns (``question``, ``answer``, ``gold``).
    """
    from rewards import RewardRunner
    from rl.grpo import group_advantages, zero_variance_groups
    from rl.rollout.engine import SamplingSpec, make_engine, rollout_dtype

    if not rows:
        raise ValueError("the GRPO probe has no prompts; raise placement.probe_samples or pass training rows")
    missing = [k for k in ("prompt", "prompt_ids") if k not in rows[0]]
    if missing:
        raise ValueError(f"GRPO probe rows need {missing}; pass rows from rl.data.attach_prompts")
    G = cfg.rollout.group_size
    seed = cfg.placement.seed if seed is None else seed
    t0 = time.perf_counter()
    engine = make_engine(dataclasses.replace(cfg.rollout, engine=cfg.placement.probe_engine), model_path,
                         rollout_dtype(cfg), seed)
    try:
        sampling = SamplingSpec(n=G, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, seed=seed * PROBE_SEED_OFFSET + 1)
        groups = engine.generate([r["prompt_ids"] for r in rows], sampling)
    finally:
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    t1 = time.perf_counter()
    flat_rows = [r for r in rows for _ in range(G)]
    comps = [c for g in groups for c in g]
    runner = RewardRunner.from_config(cfg.reward, group_size=G)
    try:
        columns = {k: [r.get(k) for r in flat_rows] for k in ("question", "answer", "gold")}
        scored = runner.score([r["prompt"] for r in flat_rows], [c.text for c in comps], columns,
                              completion_ids=[c.token_ids for c in comps])
    finally:
        runner.close()
    rewards = torch.tensor(scored.total, dtype=torch.float64)
    adv = group_advantages(rewards, G, std_normalize=cfg.algorithm.std_normalize)
    flat = zero_variance_groups(rewards, G)
    out = []
    for i, row in enumerate(rows):
        if bool(flat[i]):
            continue
        sl = slice(i * G, (i + 1) * G)
        out.append({"prompt": row["prompt"], "prompt_ids": row["prompt_ids"],
                    "completions": [c.text for c in comps[sl]], "completion_ids": [c.token_ids for c in comps[sl]],
                    "rewards": rewards[sl].tolist(), "advantages": adv[sl].tolist()})
    summary = {"prompts": len(rows), "group_size": G, "groups_with_signal": len(out),
               "flat_groups": int(flat.sum()), "reward_mean": float(rewards.mean()),
               "response_tokens_mean": sum(len(c.token_ids) for c in comps) / max(1, len(comps)),
               "engine": cfg.placement.probe_engine, "rollout_s": t1 - t0, "reward_s": time.perf_counter() - t1}
    if not out:
        raise ValueError(f"every one of the {len(rows)} GRPO probe groups had equal rewards (mean "
                         f"{summary['reward_mean']:.3f}), so the policy gradient is zero; raise "
                         "placement.probe_samples or rollout.group_size, or use placement.probe_source=sft")
    return out, summary


def probe_rows_for(cfg, model_path: str, rows: list[dict]) -> tuple[list[dict], dict]:
    """The rows a run's scorer probes: the first ``placement.probe_samples`` training rows as they
    are (sft), or their GRPO rollouts (grpo), with the rollout's summary ({} for sft)."""
    from placement.scorers import get_scorer, probe_source_for

    rows = rows[: cfg.placement.probe_samples]
    if not get_scorer(cfg.placement.scorer).needs_probe:
        return rows, {}
    if probe_source_for(cfg.placement.scorer, cfg.placement.probe_source) == "sft":
        return rows, {}
    return grpo_probe_rows(cfg, model_path, rows)


def plan_for_run(cfg, model_path: str, rows: list[dict]):
    """The placement a run's config asks for, scored on the probe its ``probe_source`` names."""
    from placement.scorers import check_budget
    from placement.scoring import plan_from_config

    if not cfg.placement.plan:  # before the probe's rollout, not after it
        check_budget(cfg.placement.scorer, cfg.placement.budget)
    probe_rows, rollout = probe_rows_for(cfg, model_path, rows)
    max_tokens = max(512, cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    plan = plan_from_config(cfg.placement, model_path, probe_rows, max_tokens=max_tokens)
    if rollout:
        plan.details["probe_rollout"] = rollout
        plan.seconds += rollout["rollout_s"] + rollout["reward_s"]  # scoring time includes the probe
    return plan
