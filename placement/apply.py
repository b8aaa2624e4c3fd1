"""Build a PEFT model from a PlacementPlan and keep masked B entries at exactly zero.

``apply_plan`` refuses to guess: every planned module must exist, every pattern key
must match a module, and after PEFT has built the adapters each one's A and B shapes
and scale are checked against the plan (PEFT's pattern keys are regexes that fall
back to the default rank without a word).

A is initialised per module from ``(plan.seed, module name)`` with LoRA's default
distribution (Kaiming-uniform, a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))). The bmask
scorer picks B entries for one particular A, so training must see that same A whatever
else the plan contains; and every FSDP rank builds the same A without a broadcast.

Why masked entries of B stay exactly zero under AdamW with weight decay: B starts at
zero; a masked entry's gradient is zeroed (``masked_fill``, so a NaN cannot leak in as
NaN * 0 would) on every backward, so Adam's moments stay 0 and its update is
0 / (sqrt(0) + eps) = 0; decoupled weight decay multiplies the entry by (1 - lr wd),
and 0 stays 0. The optimizer therefore never moves them, decay included.

Left out: optimizer construction (the learner's job) and merging adapters into weights.
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import nn

from core.lora import pattern_matches
from placement.plan import ADAPTER_NAME, PlacementPlan


def lora_a_init(module_name: str, rank: int, d_in: int, seed: int) -> torch.Tensor:
    """The plan's A for one module: U(-1/sqrt(d_in), 1/sqrt(d_in)), seeded by (seed, name)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63))
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def check_peft_config(model: nn.Module, config: Any) -> None:
    """Fail in one line if a target or a rank/alpha pattern key of ``config`` matches no module."""
    names = [n for n, _ in model.named_modules()]
    targets = config.target_modules
    if isinstance(targets, (list, tuple, set)):
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n in names):
                raise ValueError(f"target_modules entry '{t}' matches no module of the model; "
                                 "fix the module name in the plan")
    for attr in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, attr, None) or {}:
            if not any(pattern_matches(key, n) for n in names):
                raise ValueError(f"{attr} key '{key}' matches no module of the model; "
                                 "PEFT would silently use the default; fix or drop the key")


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Base-model module name -> the PEFT LoRA layer wrapping it."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and isinstance(getattr(mod, "lora_A"), nn.ModuleDict):
            out[name.removeprefix("base_model.model.")] = mod
    return out


def verify_adapters(model: nn.Module, plan: PlacementPlan, adapter_name: str = ADAPTER_NAME) -> None:
    """Assert that the PEFT model holds exactly the planned adapters, shapes and scales."""
    layers = _lora_layers(model)
    planned = set(plan.module_names())
    extra = sorted(set(n for n, m in layers.items() if adapter_name in m.lora_A) - planned)
    if extra:
        raise AssertionError(f"PEFT placed an adapter on unplanned module {extra[0]!r} ({len(extra)} in all)")
    for spec in plan.adapters:
        layer = layers.get(spec.module_name)
        if layer is None or adapter_name not in layer.lora_A:
            raise AssertionError(f"planned module {spec.module_name!r} got no adapter")
        a = layer.lora_A[adapter_name].weight
        b = layer.lora_B[adapter_name].weight
        d_out, d_in = layer.get_base_layer().weight.shape
        if tuple(a.shape) != (spec.rank, d_in) or tuple(b.shape) != (d_out, spec.rank):
            raise AssertionError(f"{spec.module_name}: A {tuple(a.shape)} B {tuple(b.shape)} but the plan says "
                                 f"rank {spec.rank} on ({d_out}, {d_in})")
        want, got = plan.scale(spec), float(layer.scaling[adapter_name])
        if not math.isclose(want, got, rel_tol=1e-6):
            raise AssertionError(f"{spec.module_name}: scale {got:g} but the plan says {want:g} "
                                 f"(alpha {spec.alpha:g}, rank {spec.rank}, {plan.alpha_policy})")
        if spec.mask is not None and tuple(spec.mask.shape) != tuple(b.shape):
            raise AssertionError(f"{spec.module_name}: mask {tuple(spec.mask.shape)} does not fit B {tuple(b.shape)}")


def _mask_hook(mask: torch.Tensor):
    frozen = ~mask

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(frozen.to(grad.device), 0)

    return hook


def apply_plan(base_model: nn.Module, plan: PlacementPlan, *, grad_hooks: bool = True,
               adapter_name: str = ADAPTER_NAME):
    """``get_peft_model`` for ``plan``, verified, with A seeded and B masks enforced.

    ``grad_hooks=False`` leaves masking to the caller (an FSDP2 learner calls
    ``mask_b_gradients`` after backward, since sharding replaces the parameters).
    """
    from peft import get_peft_model

    config = plan.to_peft_config()
    check_peft_config(base_model, config)
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    verify_adapters(model, plan, adapter_name)
    layers = _lora_layers(model)
    with torch.no_grad():
        for spec in plan.adapters:
            layer = layers[spec.module_name]
            a = layer.lora_A[adapter_name].weight
            a.copy_(lora_a_init(spec.module_name, spec.rank, a.shape[1], plan.seed))
            if spec.mask is None:
                continue
            b = layer.lora_B[adapter_name].weight
            b.masked_fill_(~spec.mask.to(b.device), 0)
            a.requires_grad_(False)
            if grad_hooks:
                b.register_hook(_mask_hook(spec.mask))
    return model


def _local_mask(mask: torch.Tensor, grad: Any) -> torch.Tensor:
    """The part of ``mask`` that lines up with ``grad`` (a plain tensor or a DTensor)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = None
    if DTensor is None or not isinstance(grad, DTensor):
        return mask
    local = grad.to_local()
    mesh, placements = grad.device_mesh, grad.placements
    if mesh.ndim != 1 or not isinstance(placements[0], (Shard, Replicate)):
        raise ValueError(f"B masks support 1-D meshes with Shard or Replicate; got {placements}")
    if isinstance(placements[0], Shard):
        dim = placements[0].dim
        # FSDP2 and DTensor shard with torch.chunk semantics; trailing ranks may hold nothing.
        chunks = torch.chunk(mask, mesh.size(), dim=dim)
        rank = mesh.get_local_rank()
        mask = chunks[rank] if rank < len(chunks) else mask.narrow(dim, 0, 0)
    if tuple(mask.shape) != tuple(local.shape):
        raise ValueError(f"local mask {tuple(mask.shape)} does not match the local gradient shard {tuple(local.shape)}")
    return mask


def mask_b_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, the masked entries of each lora_B gradient (plain tensors or FSDP2 DTensors)."""
    if not masks:
        return
    seen = set()
    for name, p in model.named_parameters():
        if "lora_B" not in name:
            continue
        key = name if name in masks else next((k for k in masks if name.endswith("." + k)), None)
        if key is None:
            continue
        seen.add(key)
        if p.grad is None:
            continue
        local = _local_mask(masks[key], p.grad)
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        g.masked_fill_(~local.to(g.device), 0)
    missing = sorted(set(masks) - seen)
    if missing:
        raise ValueError(f"B mask for {missing[0]!r} names no parameter of the model ({len(missing)} unmatched); "
                         "build the model with apply_plan from the same plan")
