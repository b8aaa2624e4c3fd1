"""placerl rewards: TRL-signature reward functions, a registry, and a failure-isolating runner.

``RewardRunner.from_config(cfg.reward).score(prompts, completions, columns)`` is what the
trainer calls; the built-in rewards are plain functions usable in TRL's ``GRPOTrainer`` too.
"""
from rewards.gsm8k import flexible_answer, gsm8k_flexible, gsm8k_strict, matches_gold, strict_answer
from rewards.registry import RewardError, RewardRef, register, registry_names, resolve
from rewards.runner import RewardResult, RewardRunner, score_once
from rewards.shaping import answer_tag, format_hash, length_penalty, overlong_penalty, think_format

__all__ = [
    "RewardError", "RewardRef", "RewardResult", "RewardRunner", "answer_tag", "flexible_answer", "format_hash",
    "gsm8k_flexible", "gsm8k_strict", "length_penalty", "matches_gold", "overlong_penalty", "register",
    "registry_names", "resolve", "score_once", "strict_answer", "think_format",
]
