"""What every scorer is told besides the model, the probe and the budget.

``ScorerSettings`` mirrors ``rl.config.PlacementConfig`` (base rank, alpha and its
policy, candidate module types, top_k, seed, dropout) plus free-form ``options`` for
scorer-specific knobs (``steps`` for bmask and gradrank). The alpha policy lives here
because every scorer that assigns ranks must also assign alphas, the same way.

Alpha policies (scale s is what multiplies B A in the forward pass):
- fixed: alpha is the same on every module, s = alpha / r;
- proportional: alpha grows with r so that s = base_alpha / base_rank everywhere;
- rslora: alpha is fixed and s = alpha / sqrt(r) (PEFT's use_rslora).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.lora import DEFAULT_TARGET_MODULES, lora_scale

ALPHA_POLICIES = ("fixed", "proportional", "rslora")


@dataclass(frozen=True)
class ScorerSettings:
    rank: int = 8
    alpha: float = 16.0
    alpha_policy: str = "fixed"
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    top_k: int = 1
    seed: int = 0
    dropout: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.alpha_policy not in ALPHA_POLICIES:
            raise ValueError(f"placement.alpha_policy={self.alpha_policy!r} is not one of {', '.join(ALPHA_POLICIES)}")
        if self.rank < 1:
            raise ValueError(f"placement.rank={self.rank} must be >= 1")
        if self.top_k < 1:
            raise ValueError(f"placement.top_k={self.top_k} must be >= 1")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_config(cls, cfg, **options: Any) -> "ScorerSettings":
        """From an ``rl.config.PlacementConfig`` (or anything with the same fields)."""
        options = {"steps": getattr(cfg, "probe_steps", 4), **options}
        return cls(rank=cfg.rank, alpha=cfg.alpha, alpha_policy=cfg.alpha_policy,
                   target_modules=tuple(cfg.target_modules), top_k=cfg.top_k, seed=cfg.seed,
                   dropout=cfg.dropout, options=dict(options))

    def alpha_for(self, rank: int) -> float:
        return alpha_for(rank, self.rank, self.alpha, self.alpha_policy)

    def scale_for(self, rank: int) -> float:
        return lora_scale(rank, self.alpha_for(rank), self.alpha_policy == "rslora")

    def option(self, name: str, default: Any) -> Any:
        return self.options.get(name, default)


def alpha_for(rank: int, base_rank: int, base_alpha: float, policy: str) -> float:
    if policy == "proportional":
        return base_alpha * rank / base_rank
    return float(base_alpha)

