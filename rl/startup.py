"""What a run builds and checks before Ray or any actor starts: the adapter placement, and the
rollout settings resolved for this host (sleep mode, dtype, overlap), each failing in one line."""
from __future__ import annotations

import torch

from rl.config import Config


def make_plan(cfg: Config, model_path: str, rows: list[dict]):
    """The adapter placement: a saved plan, or the configured scorer run on a probe set."""
    from core.lora import lora_config_to_dict
    from placement import PlacementPlan
    from rl.placement_probe import plan_for_run
    from rl.rollout.sync import check_ranks

    if cfg.placement.plan:
        plan = PlacementPlan.load(cfg.placement.plan)
    else:
        # A GRPO-regime probe (placement.probe_source) rolls out the policy before any actor starts.
        plan = plan_for_run(cfg, model_path, rows)
    lora_dict = lora_config_to_dict(plan.to_peft_config())
    # Checked here, before any actor starts: vLLM hangs on an adapter above its cap.
    check_ranks(lora_dict, cfg.rollout.max_lora_rank)
    return plan, lora_dict


def rollout_settings(cfg: Config, dtype: str):
    """``cfg.rollout`` with sleep mode resolved for this placement, checked against the host:
    a setting vLLM cannot serve fails here in one line, before Ray or any actor starts."""
    import dataclasses

    from rl.rollout.overlap import check_overlap
    from rl.rollout.vllm_settings import check_vllm_dtype, resolve_sleep_mode

    r = cfg.rollout
    if r.engine != "vllm":
        return dataclasses.replace(r, sleep_mode=False)
    on_gpu = torch.cuda.is_available() and cfg.cluster.gpus_per_rollout_worker > 0
    check_vllm_dtype(dtype, on_gpu)
    colocated = cfg.cluster.colocate and cfg.cluster.gpus_per_learner_rank > 0
    # A streamed step decodes while the learner steps: nothing sleeps (Config refuses sleep_mode=true).
    sleep_mode = resolve_sleep_mode(False if cfg.trainer.stream_groups else r.sleep_mode, colocated, on_gpu)
    check_overlap(cfg.trainer.max_staleness, sleep_mode)
    return dataclasses.replace(r, sleep_mode=sleep_mode)
