"""Budgets for placement, and the rounding that turns real-valued shares into ranks.

A budget is written as ``"rank=N"`` (total LoRA rank summed over adapted modules),
``"params=N"`` (trainable parameters), ``"fraction=F"`` (of the uniform baseline's
trainable parameters) or ``""`` (exactly the uniform baseline). Every budget is
measured in "units": one rank on a module costs 1 unit under a rank budget and
``d_in + d_out`` units under a parameter budget, so that scorers can spend any budget
with one piece of code.

Left out: budgets in bytes or FLOPs, and per-type caps; a scorer that wants them can
build them from ``unit_cost``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from placement.modules import ModuleInfo

KINDS = ("rank", "params", "fraction")


@dataclass(frozen=True)
class Budget:
    kind: str  # "uniform" | "rank" | "params" | "fraction"
    value: float = 1.0

    @classmethod
    def parse(cls, text: str | None) -> "Budget":
        text = (text or "").strip()
        if not text:
            return cls("uniform", 1.0)
        kind, eq, num = text.partition("=")
        kind = kind.strip()
        try:
            value = float(num) if eq else float("nan")
        except ValueError:
            value = float("nan")
        if kind not in KINDS or not value > 0 or not math.isfinite(value):
            raise ValueError(f"placement.budget={text!r} is not a budget; write 'rank=N', 'params=N' "
                             "or 'fraction=F' with a positive number, or leave it empty for the uniform baseline")
        if kind in ("rank", "params") and not float(value).is_integer():
            raise ValueError(f"placement.budget={text!r}: {kind} must be a whole number")
        return cls(kind, value)

    def __str__(self) -> str:
        if self.kind == "uniform":
            return ""
        return f"{self.kind}={int(self.value) if self.kind != 'fraction' else self.value:g}"

    @property
    def explicit(self) -> bool:
        return self.kind != "uniform"

    def unit_cost(self, module: ModuleInfo) -> int:
        """What one rank on ``module`` costs in this budget's units."""
        return 1 if self.kind == "rank" else module.d_in + module.d_out

    def limit(self, modules: list[ModuleInfo], base_rank: int) -> float:
        """The budget in units, given the candidates and the uniform baseline's rank."""
        if self.kind in ("rank", "params"):
            return float(self.value)
        return self.value * base_rank * sum(self.unit_cost(m) for m in modules)


def uniform_parameters(modules: list[ModuleInfo], rank: int) -> int:
    """Trainable parameters of LoRA at ``rank`` on every candidate (A and B)."""
    return rank * sum(m.d_in + m.d_out for m in modules)


def allocate_ranks(shares: list[float], costs: list[float], limit: float, min_rank: int = 1) -> list[int]:
    """Integer ranks proportional to ``shares`` whose total cost stays within ``limit``.

    ``costs[i]`` is the price of one rank on item i. Ranks are scaled so that the
    real-valued allocation spends the whole limit, floored (never below ``min_rank``),
    and the leftover is handed out by largest remainder while it still fits.
    """
    if len(shares) != len(costs) or not shares:
        raise ValueError("allocate_ranks needs one share and one cost per item")
    if any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError("allocate_ranks needs non-negative shares with a positive sum")
    floor_cost = sum(min_rank * c for c in costs)
    if floor_cost > limit:
        raise ValueError(f"budget of {limit:g} units is below the minimum allocation ({floor_cost:g} units: "
                         f"rank {min_rank} everywhere); raise the budget")
    scale = limit / sum(s * c for s, c in zip(shares, costs))
    real = [s * scale for s in shares]
    ranks = [max(min_rank, math.floor(x)) for x in real]
    spent = sum(r * c for r, c in zip(ranks, costs))
    order = sorted(range(len(real)), key=lambda i: real[i] - math.floor(real[i]), reverse=True)
    for i in order:
        if spent + costs[i] <= limit + 1e-9 and ranks[i] < real[i]:
            ranks[i] += 1
            spent += costs[i]
    # Lifting tiny shares to min_rank can overshoot the limit: give the excess back from
    # the items that got the most above their real-valued share.
    while spent > limit + 1e-9:
        i = max((j for j in range(len(ranks)) if ranks[j] > min_rank), key=lambda j: ranks[j] - real[j])
        ranks[i] -= 1
        spent -= costs[i]
    return ranks
