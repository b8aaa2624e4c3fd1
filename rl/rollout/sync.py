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

For vLLM the learner does that fold itself, on its device and in float32, then casts to
the served dtype (:func:`make_payload` with ``serve_dtype``): the bytes that travel halve
in bfloat16 and the result is the same as folding on the worker before vLLM's own cast.
All tensors leave the device in ONE copy (one flat buffer, split into views), and a
payload pickles as one flat array per dtype plus a manifest: pickled tensor by tensor,
hundreds of small tensors cost far more than their bytes, and views of one buffer would
each carry the whole buffer.

Every payload carries ``timings`` (seconds per stage so far, and ``sent_at``, the wall
clock when the learner handed it over) so that a sync can report where its time went.

Left out: DoRA, LoRA bias and ``modules_to_save`` adapters (vLLM does not serve them;
:func:`check_servable` says so in one line), and any transport other than Ray's
object store and, for a worker on the learner's GPU, CUDA IPC (rl/rollout/device_handoff.py;
NCCL broadcast of the adapter is not needed at LoRA sizes).
"""
from __future__ import annotations

import json
import os
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from core.lora import full_tensors, lora_config_to_dict, lora_scale

_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class AdapterPayload:
    """One adapter version, as it travels from the learner to the rollout workers."""

    version: int
    tensors: dict[str, torch.Tensor]  # PEFT state-dict names (adapter name stripped), CPU
    peft_config: dict  # JSON-able LoraConfig fields, see lora_config_to_dict
    folded: bool = False  # per-module scales already folded into B (fold_scales_for_vllm)
    timings: dict = field(default_factory=dict)  # sync stage -> seconds, and "sent_at" (time.time())
    # Set by the learner instead of tensors when the workers share its GPU: CUDA IPC handles to
    # the tensors on the device (rl/rollout/device_handoff.py); the receiver gets tensors again.
    shared: dict | None = None

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k != "tensors"}
        if self.shared is None:
            state["packed"] = pack_tensors(self.tensors)
        return state

    def __setstate__(self, state: dict) -> None:
        t = time.perf_counter()
        packed = state.pop("packed", None)
        self.__dict__.update(state)
        if packed is not None:
            self.tensors = unpack_tensors(packed)
        else:
            from rl.rollout.device_handoff import open_tensors

            self.tensors, self.shared = open_tensors(self.shared), None
        self.timings = dict(self.timings, unpack_s=time.perf_counter() - t)


def make_payload(peft_model, version: int, adapter_name: str = "default",
                 serve_dtype: torch.dtype | None = None, device_buffers=None) -> AdapterPayload:
    """Gather the adapter (collective under FSDP2) and wrap it with its config.

    ``serve_dtype``: fold the per-module scales for vLLM (in float32, on the model's
    device) and cast to that dtype before the copy to CPU; None keeps the adapter as
    PEFT holds it (checkpoints, the hf and merged engines). ``device_buffers``
    (rl.rollout.device_handoff.DeviceBuffers): the tensors stay on the device and travel as
    CUDA IPC handles to those buffers instead.
    """
    t = time.perf_counter()
    config = lora_config_to_dict(peft_model.peft_config[adapter_name])
    on_device = device_buffers is not None
    tensors = gather_lora_state(peft_model, adapter_name, to_cpu=serve_dtype is None and not on_device)
    if serve_dtype is not None:
        tensors, config = fold_scales_for_vllm(tensors, config)
        tensors = {k: v.to(serve_dtype) for k, v in tensors.items()}
        tensors = tensors if on_device else to_cpu_at_once(tensors)
    shared = device_buffers.share(tensors) if on_device else None
    return AdapterPayload(version, {} if on_device else tensors, config, folded=serve_dtype is not None,
                          timings={"gather_s": time.perf_counter() - t, "sent_at": time.time()}, shared=shared)


# ----------------------------------------------------------------------------- gathering

def gather_lora_state(peft_model, adapter_name: str = "default", to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors, full and on CPU (or left where they are), named as
    ``get_peft_model_state_dict`` names them.

    Collective under FSDP2: every rank must call it, in the same order, because the
    sharded LoRA parameters are all-gathered (one collective, :func:`core.lora.full_tensors`).
    Only LoRA parameters are gathered, never the base weights.
    """
    named = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    keys = _peft_keys(peft_model, adapter_name, [n for n, _ in named])
    out = {keys[n]: t for (n, _), t in zip(named, full_tensors([p for _, p in named])) if n in keys}
    return to_cpu_at_once(out) if to_cpu else out


_PEFT_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _peft_keys(peft_model, adapter_name: str, names: list[str]) -> dict[str, str]:
    """``{parameter name: PEFT state-dict key}`` for ``adapter_name``'s parameters, as
    ``get_peft_model_state_dict`` names and selects them; worked out once per model (PEFT
    takes tens of milliseconds per call for hundreds of tensors)."""
    from peft import get_peft_model_state_dict

    cached = _PEFT_KEYS.setdefault(peft_model, {})
    key = (adapter_name, tuple(names))
    if key not in cached:
        # Placeholders stand in for the tensors: PEFT only selects and renames entries.
        placeholders = {n: torch.empty(0) for n in names}
        by_id = {id(v): n for n, v in placeholders.items()}
        selected = get_peft_model_state_dict(peft_model, state_dict=placeholders, adapter_name=adapter_name)
        if not all(id(v) in by_id for v in selected.values()):
            raise RuntimeError("PEFT's adapter state dict holds tensors that are not the adapter's parameters")
        cached[key] = {by_id[id(v)]: k for k, v in selected.items()}
    return cached[key]


def to_cpu_at_once(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh contiguous CPU copies of ``tensors`` made by one device-to-host copy per dtype
    (hundreds of small copies each wait for the device); the results are views of one buffer."""
    out = {}
    for dtype in dict.fromkeys(t.dtype for t in tensors.values()):
        names = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].detach().reshape(-1) for k in names]).to("cpu")
        out.update(split_flat(flat, [(k, tuple(tensors[k].shape)) for k in names]))
    return {k: out[k] for k in tensors}


def split_flat(flat: torch.Tensor, manifest: list[tuple[str, tuple]]) -> dict[str, torch.Tensor]:
    """``{name: view of flat}`` for a manifest of ``(name, shape)`` laid out in order."""
    out, offset = {}, 0
    for name, shape in manifest:
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    return out


# ----------------------------------------------------------------------------- transport

def pack_tensors(tensors: dict[str, torch.Tensor]) -> dict:
    """``tensors`` as one flat numpy array per dtype plus a manifest: what pickles fast
    (numpy arrays go out of band, zero-copy in Ray's object store). 16-bit floats travel
    as int16 bit patterns (numpy has no bfloat16)."""
    groups = []
    for dtype in dict.fromkeys(t.dtype for t in tensors.values()):
        names = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].detach().to("cpu").reshape(-1) for k in names])
        bits = flat.view(torch.int16) if dtype in (torch.bfloat16, torch.float16) else flat
        groups.append((str(dtype).removeprefix("torch."), bits.numpy(),
                       [(k, tuple(tensors[k].shape)) for k in names]))
    return {"order": list(tensors), "groups": groups}


def unpack_tensors(packed: dict) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_tensors`: views of one writable buffer per dtype."""
    out = {}
    for dtype_name, array, manifest in packed["groups"]:
        # An array read out of Ray's object store is a read-only view of shared memory:
        # copy it once, since vLLM scales B in place and other workers read the same object.
        flat = torch.from_numpy(array if array.flags.writeable else array.copy())
        dtype = getattr(torch, dtype_name)
        out.update(split_flat(flat.view(dtype) if flat.dtype != dtype else flat, manifest))
    return {k: out[k] for k in packed["order"]}


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


def check_unfolded(payload: AdapterPayload) -> None:
    """Refuse, in one line, an adapter folded for vLLM where PEFT's own form is needed."""
    if payload.folded:
        raise ValueError(f"adapter version {payload.version} was folded for vLLM's LoRA kernels "
                         "(rl.rollout.engine.payload_dtype); export it with serve_dtype=None for this engine")


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
