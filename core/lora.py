"""PEFT's LoRA conventions, written once for the learner, the rollout sync and the placement scorers.

- the projections a LoRA adapter targets by default (every linear of a Llama-style block);
- how a ``rank_pattern``/``alpha_pattern`` key matches a module name (a regex anchored at
  the end of the name, PEFT's ``get_pattern_key`` rule);
- the scale PEFT multiplies ``B A`` by: alpha / r, or alpha / sqrt(r) with rsLoRA;
- a ``LoraConfig`` as a JSON-able dict and back (the form that travels between processes
  and is written next to adapter weights);
- the whole tensor of a parameter that FSDP2 shards (a collective: every rank calls it), and
  of many such parameters at once with ONE all-gather (hundreds of small collectives each
  pay a fixed cost that dwarfs their bytes).

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


def shard_numels(shape: tuple, parts: int) -> list[int]:
    """Elements each of ``parts`` ranks holds of a tensor split on dim 0 as DTensor's ``Shard(0)``
    splits it (``torch.chunk``: pieces of ceil(rows / parts) rows, the last ones shorter or empty)."""
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if shape else 1
    chunk = -(-rows // parts)
    return [max(0, min(chunk, rows - r * chunk)) * per_row for r in range(parts)]


def full_tensors(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole tensors of several (possibly FSDP2-sharded) parameters, detached; collective.

    DTensors sharded on dim 0 over one 1-D mesh (FSDP2's layout) are gathered with one
    ``all_gather_into_tensor`` per mesh and dtype; on a one-rank mesh the local tensor is the
    whole one; any other layout falls back to ``full_tensor``. Every rank must pass the same
    parameters in the same order.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    out: list[torch.Tensor | None] = [None] * len(params)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        t = p.detach()
        if not hasattr(t, "full_tensor"):
            out[i] = t
        elif t.device_mesh.size() == 1:
            out[i] = t.to_local()
        elif t.device_mesh.ndim == 1 and t.placements == (Shard(0),):
            groups.setdefault((id(t.device_mesh), t.dtype), []).append(i)
        else:
            out[i] = t.full_tensor()
    for idx in groups.values():
        ts = [params[i].detach() for i in idx]
        mesh = ts[0].device_mesh
        n, me = mesh.size(), mesh.get_local_rank()
        numels = [shard_numels(tuple(t.shape), n) for t in ts]  # [param][rank]
        sent = [t.to_local().reshape(-1) for t in ts]
        bad = [tuple(t.shape) for t, s, k in zip(ts, sent, numels) if s.numel() != k[me]]
        if bad:
            raise RuntimeError(f"FSDP2 shard of shape {bad[0]} is not the Shard(0) split this gather assumes")
        width = max(sum(k[r] for k in numels) for r in range(n))
        buf = torch.zeros(width, dtype=ts[0].dtype, device=sent[0].device)
        torch.cat(sent, out=buf[: sum(s.numel() for s in sent)])
        gathered = torch.empty(n * width, dtype=buf.dtype, device=buf.device)
        dist.all_gather_into_tensor(gathered, buf, group=mesh.get_group())
        offsets = [r * width for r in range(n)]
        for i, t, k in zip(idx, ts, numels):
            pieces = []
            for r in range(n):
                pieces.append(gathered[offsets[r]: offsets[r] + k[r]])
                offsets[r] += k[r]
            out[i] = torch.cat(pieces).view(t.shape)
    return out


def check_lora_shapes(peft_model, lora_config: dict) -> None:
    """PEFT pattern keys are regexes that silently fall back to the default rank: check
    that every rank_pattern key matched a LoRA module and gave it the rank asked for."""
    from peft.tuners.lora import LoraLayer

    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if isinstance(m, LoraLayer) and "default" in m.r}
    for key, rank in (lora_config.get("rank_pattern") or {}).items():
        hits = [n for n in layers if pattern_matches(key, n)]
        if not hits:
            raise ValueError(f"rank_pattern key {key!r} matched no LoRA module; use full module names "
                             "(model.layers.0.mlp.down_proj, regex-escaped) that target_modules covers")
        for n in hits:
            a = layers[n].lora_A["default"].weight
            if a.shape[0] != rank:
                raise ValueError(f"{n}: lora_A has rank {a.shape[0]} but rank_pattern asks {rank}; "
                                 "an earlier pattern key matched it first, make the keys disjoint")
