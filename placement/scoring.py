"""From a placement config to a PlacementPlan: load the model, build the probe, run the scorer.

This is the one entry the trainer calls (``plan_from_config``) and the one the
``placerl score`` command calls (``score_model``). A plan file named in the config
(``placement.plan``) overrides the scorer and is returned as written.

``placement.probe_source`` (``auto`` resolves to the scorer's own regime) picks the probe's
loss. Left out: rendering prompts (the caller passes chat-rendered rows) and rollouts (a
GRPO probe takes completions and rewards that ``rl.placement_probe`` generated).
"""
from __future__ import annotations

import time

import torch

from placement.budget import Budget
from placement.plan import PlacementPlan
from placement.probe import ProbeBatch, build_probe
from placement.scorers import get_scorer, probe_source_for
from placement.settings import ScorerSettings


# The dtype the model is loaded in for scoring. Hooks and losses always accumulate in
# float32; bfloat16 only changes the forward/backward passes. On SmolLM2 + 32 GSM8K
# samples it picked the same top module and the same top-10 order as float32, PAGE
# scores within 3% (median 0.5%). It scored 1.2-1.4x faster on a CPU with bf16 units,
# and slower on an H100, where what it saves is memory.
PROBE_DTYPES = ("float32", "bfloat16")


def scoring_device() -> torch.device:
    """The first GPU when there is one: a probe is a few forward/backward passes."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_scoring_model(model_path: str, dtype: str = "float32", device: str | None = None) -> torch.nn.Module:
    """The model a scorer probes, in ``dtype``, on ``device`` (default: ``scoring_device()``)."""
    from core.models import load_model

    if dtype not in PROBE_DTYPES:
        raise ValueError(f"placement.probe_dtype={dtype!r} is not one of {', '.join(PROBE_DTYPES)}")
    return load_model(model_path, dtype).to(device or scoring_device())


def score_model(scorer_name: str, model: torch.nn.Module, probe: ProbeBatch | None, budget: Budget,
                settings: ScorerSettings, model_name: str = "") -> PlacementPlan:
    """Run one scorer and stamp the plan with its wall time, the model's name and the probe's dtype."""
    scorer = get_scorer(scorer_name)
    if scorer.needs_probe and probe is None:
        raise ValueError(f"placement.scorer={scorer_name} needs probe rows (prompt + answer); pass some")
    start = time.perf_counter()
    plan = scorer(model, probe, budget, settings)
    plan.seconds = time.perf_counter() - start
    plan.model = model_name or plan.model
    if scorer.needs_probe:
        plan.details.setdefault("probe_dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
    if plan.scorer != scorer_name:
        plan.scorer = scorer_name
    return plan


def plan_from_config(placement_cfg, model_path: str, probe_rows: list[dict] | None = None,
                     max_tokens: int = 512) -> PlacementPlan:
    """The plan a run's ``placement`` section asks for (see rl.config.PlacementConfig)."""
    if placement_cfg.plan:
        return PlacementPlan.load(placement_cfg.plan)
    from core.models import load_tokenizer

    settings = ScorerSettings.from_config(placement_cfg)
    budget = Budget.parse(placement_cfg.budget)
    scorer = get_scorer(placement_cfg.scorer)
    source = probe_source_for(placement_cfg.scorer, placement_cfg.probe_source)
    probe = None
    if scorer.needs_probe:
        rows = list(probe_rows or [])[: placement_cfg.probe_samples]
        if not rows:
            raise ValueError(f"placement.scorer={placement_cfg.scorer} needs probe rows; "
                             "pass prompts with gold answers (probe_source=sft) or rollouts (grpo)")
        if source == "grpo" and "completions" not in rows[0]:
            raise ValueError(f"placement.scorer={placement_cfg.scorer} with probe_source=grpo needs rows with "
                             "completions and rewards; build them with rl.placement_probe.grpo_probe_rows "
                             "(rl.startup.make_plan does), or set placement.probe_source=sft")
        probe = build_probe(load_tokenizer(model_path), rows, source, max_tokens)
    model = load_scoring_model(model_path, placement_cfg.probe_dtype)
    plan = score_model(placement_cfg.scorer, model, probe, budget, settings, model_name=model_path)
    if probe is not None:
        plan.details["probe_source"] = source
    if model.device.type == "cuda":
        # The caller (a training driver) shares the GPU with rollout and learner actors next.
        del model
        torch.cuda.empty_cache()
    return plan
