"""Learner -> rollout adapter sync: what travels, and how it is made servable.

After each update the learner gathers its LoRA tensors (a collective under FSDP2),
wraps them with the adapter's LoRA config and a version number in an
:class:`AdapterPayload`, and puts that in Ray's object store; every rollout worker
loads it. Only the adapter moves: the base weights never change, so there is no
full-weight merge and no base-weight reload.

vLLM applies one global scale to every module of an adapter (some versions honour
PEFT's ``rank_pattern``/``alpha_pattern`` scaling, some do not), so an adapter whose
modules differ in alpha/r is exported for vLLM with each module's own PEFT scale
folded into its B and a global scale of exactly 1. That makes the served adapter
independent of the vLLM version. The folded export is for serving only; checkpoints
keep the payload as PEFT wrote it (:func:`write_peft_adapter` on the unfolded payload).

Left out: DoRA, LoRA bias and ``modules_to_save`` adapters (vLLM does not serve them;
:func:`check_servable` says so in one line), and any transport other than Ray's
object store (NCCL broadcast of the adapter is not needed at LoRA sizes).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from core.lora import full_tensor, lora_config_to_dict, lora_scale

_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class AdapterPayload:
    """One adapter version, as it travels from the learner to the rollout workers."""

    version: int
    tensors: dict[str, torch.Tensor]  # PEFT state-dict names (adapter name stripped), CPU
    peft_config: dict  # JSON-able LoraConfig fields, see lora_config_to_dict

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def make_payload(peft_model, version: int, adapter_name: str = "default") -> AdapterPayload:
    """Gather the adapter (collective under FSDP2) and wrap it with its config."""
    tensors = gather_lora_state(peft_model, adapter_name)
    return AdapterPayload(version, tensors, lora_config_to_dict(peft_model.peft_config[adapter_name]))


# ----------------------------------------------------------------------------- gathering

def gather_lora_state(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors, full and on CPU, named as ``get_peft_model_state_dict`` names them.

    Collective under FSDP2: every rank must call it, in the same order, because each
    sharded LoRA parameter is all-gathered by ``DTensor.full_tensor()``. Only LoRA
    parameters are gathered, never the base weights.
    """
    from peft import get_peft_model_state_dict

    full = {}
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        full[name] = full_tensor(p).to("cpu", copy=True)
    # PEFT strips the adapter name and keeps only that adapter's keys.
    out = get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=adapter_name)
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- checks

def module_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{module name: rank}`` read from the lora_A shapes (module names without PEFT's prefix)."""
    return {k[len(_PREFIX):-len(_A)] if k.startswith(_PREFIX) else k[:-len(_A)]: int(v.shape[0])
            for k, v in tensors.items() if k.endswith(_A)}


def check_ranks(peft_config: dict, max_lora_rank: int,
                tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Fail fast, in one line, if any module's rank exceeds the rollout engine's cap.

    An over-rank adapter makes an in-process vLLM hang instead of raising, so this
    runs before anything is submitted. The ranks come from the config (``r`` and
    ``rank_pattern``) and, when given, from the tensors themselves.
    """
    found = [("r (the default rank)", int(peft_config.get("r", 0)))]
    found += [(f"{k!r} (rank_pattern)", int(v)) for k, v in (peft_config.get("rank_pattern") or {}).items()]
    found += [(repr(k), v) for k, v in module_ranks(tensors or {}).items()]
    for where, rank in found:
        if rank > max_lora_rank:
            raise ValueError(
                f"adapter rank {rank} of module {where} exceeds rollout.max_lora_rank={max_lora_rank}; "
                f"raise rollout.max_lora_rank to at least {rank} or lower that module's rank")


def check_servable(peft_config: dict) -> None:
    """Reject, in one line, LoRA variants that vLLM cannot serve."""
    if peft_config.get("use_dora"):
        raise ValueError("adapter uses DoRA (use_dora=true), which vLLM does not serve; "
                         "set use_dora=false or use rollout.engine=hf")
    if peft_config.get("lora_bias") or peft_config.get("bias", "none") != "none":
        raise ValueError("adapter trains biases (bias/lora_bias), which vLLM does not serve; "
                         "set bias='none' and lora_bias=false or use rollout.engine=hf")
    if peft_config.get("modules_to_save"):
        raise ValueError(f"adapter has modules_to_save={peft_config['modules_to_save']}, which vLLM "
                         "does not serve for causal LMs; remove them or use rollout.engine=hf")


# ----------------------------------------------------------------------------- scales

def _pattern_value(pattern: dict, module: str, default):
    # PEFT's own matcher, so that a pattern means here exactly what it meant to PEFT.
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    key = get_pattern_key(pattern.keys(), module)
    return pattern.get(key, default)


def module_scales(tensors: dict[str, torch.Tensor], peft_config: dict) -> dict[str, float]:
    """Each module's PEFT scale, from its actual rank and its (pattern-resolved) alpha."""
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    rslora = bool(peft_config.get("use_rslora", False))
    return {m: lora_scale(r, float(_pattern_value(alpha_pattern, m, peft_config["lora_alpha"])), rslora)
            for m, r in module_ranks(tensors).items()}


def fold_scales_for_vllm(tensors: dict[str, torch.Tensor], peft_config: dict) -> tuple[dict, dict]:
    """Tensors and config that make a one-global-scale server compute what PEFT computes.

    Each module's B is multiplied by its own PEFT scale, and the exported config sets
    the global scale to exactly 1 (``lora_alpha == r``, no rsLoRA, no patterns), with
    ``r`` the largest module rank so that the server's own rank check sees the truth.
    The inputs are not modified.
    """
    scales = module_scales(tensors, peft_config)
    out = {}
    for k, t in tensors.items():
        if k.endswith(_B):
            module = k[len(_PREFIX):-len(_B)] if k.startswith(_PREFIX) else k[:-len(_B)]
            if module not in scales:
                raise ValueError(f"adapter tensor {k!r} has no matching lora_A; the payload is incomplete")
            t = (t.float() * scales[module]).to(t.dtype)
        out[k] = t.contiguous()
    r_max = max(module_ranks(tensors).values(), default=int(peft_config.get("r", 1)))
    config = dict(peft_config, r=r_max, lora_alpha=r_max, use_rslora=False,
                  rank_pattern={}, alpha_pattern={})
    return out, config


# ----------------------------------------------------------------------------- files

def write_peft_adapter(payload: AdapterPayload, directory: str | os.PathLike) -> str:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json``; PEFT and vLLM load the folder."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = dict(payload.peft_config)
    config.setdefault("peft_type", "LORA")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in payload.tensors.items()}
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return str(directory)
