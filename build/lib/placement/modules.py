"""The candidate modules a scorer may place adapters on.

A candidate is a ``torch.nn.Linear`` whose last name component is one of the asked
module types (``q_proj``, ``down_proj``, ...). Everything downstream (plans, budgets,
reports) refers to candidates by their full module name, never by a pattern, because
PEFT's pattern keys are regexes that fall back silently when they match nothing.

Left out: non-Linear layers (embeddings, convolutions, fused QKV of other
architectures); a plugin scorer that needs them can enumerate its own candidates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleInfo:
    """One candidate projection: its full name, type, layer index and weight shape."""

    name: str
    kind: str  # the last name component, e.g. "down_proj"
    layer: int  # -1 when the name has no numeric component
    d_in: int
    d_out: int

    @property
    def weight_params(self) -> int:
        return self.d_in * self.d_out


def layer_of(name: str) -> int:
    """The first numeric component of a module name (``model.layers.6.mlp`` -> 6), else -1."""
    m = _LAYER.search(name + ".")
    return int(m.group(1)) if m else -1


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def candidate_modules(model: nn.Module, kinds: list[str] | tuple[str, ...]) -> list[ModuleInfo]:
    """Every Linear of ``model`` whose type is in ``kinds``, in module order."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and kind_of(name) in kinds:
            out.append(ModuleInfo(name, kind_of(name), layer_of(name), mod.in_features, mod.out_features))
    found = {m.kind for m in out}
    missing = [k for k in kinds if k not in found]
    if missing:
        present = sorted({kind_of(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"placement.target_modules={missing} match no Linear module of the model; "
                         f"its Linear types are {present}")
    return out


def kinds_in_order(modules: list[ModuleInfo]) -> list[str]:
    """Module types in the order the model first uses them (q, k, v, o, gate, up, down)."""
    seen: dict[str, None] = {}
    for m in modules:
        seen.setdefault(m.kind, None)
    return list(seen)
