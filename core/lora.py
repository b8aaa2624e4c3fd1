"""PEFT's LoRA conventions, written once for the learner, the rollout sync and the placement scorers.

- the projections a LoRA adapter targets by default (every linear of a Llama-style block);
- how a ``rank_pattern``/``alpha_pattern`` key matches a module name (a regex anchored at
  the end of the name, PEFT's ``get_pattern_key`` rule);
- the scale PEFT multiplies ``B A`` by: alpha / r, or alpha / sqrt(r) with rsLoRA;
- a ``LoraConfig`` as a JSON-able dict and back (the form that travels between processes
  and is written next to adapter weights);
- the whole tensor of a parameter that FSDP2 shards (a collective: every rank calls it).

Left out: anything that loads a model or starts a process group.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from typing import Any

import torch

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pattern_matches(key: str, name: str) -> bool:
    """Whether a ``rank_pattern``/``alpha_pattern`` key applies to module ``name``, as PEFT decides."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """The factor PEFT multiplies ``B A`` by: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value


def lora_config_to_dict(config) -> dict:
    """A PEFT ``LoraConfig`` as a plain JSON-able dict (sets sorted, enums as strings)."""
    out = _jsonable(config.to_dict())
    json.dumps(out)  # fail here, not on a worker, if some field still is not JSON-able
    return out


def lora_config_from_dict(d: dict):
    """The inverse of :func:`lora_config_to_dict`; unknown keys (from newer PEFT) are dropped."""
    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type"}
    return LoraConfig(**{k: v for k, v in d.items() if k in names})


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter, detached; collective for DTensors."""
    t = p.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t
