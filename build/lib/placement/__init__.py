"""placerl placement: scorers decide where LoRA adapters go, at what rank, and which B entries train.

Public API: PlacementPlan and AdapterSpec (plan.py), apply_plan and mask_b_gradients
(apply.py), plan_from_config (scoring.py), Budget and ScorerSettings, and the scorer
registry (scorers/).
"""
from placement.apply import apply_plan, check_peft_config, lora_a_init, mask_b_gradients, verify_adapters
from placement.budget import Budget
from placement.plan import AdapterSpec, PlacementPlan
from placement.probe import ProbeBatch, build_probe
from placement.scorers import available_scorers, get_scorer, register_scorer
from placement.scoring import plan_from_config, score_model
from placement.settings import ScorerSettings

__all__ = ["AdapterSpec", "Budget", "PlacementPlan", "ProbeBatch", "ScorerSettings", "apply_plan",
           "available_scorers", "build_probe", "check_peft_config", "get_scorer", "lora_a_init",
           "mask_b_gradients", "plan_from_config", "register_scorer", "score_model", "verify_adapters"]
