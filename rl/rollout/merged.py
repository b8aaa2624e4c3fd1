"""Serving the adapter merged into the base weights: vLLM without LoRA, for CPU hosts.

vLLM's LoRA path on CPU decodes SmolLM2 3-4x slower than the plain model (every
adapted projection runs a padded LoRA kernel beside the base matmul). Here the worker
keeps a copy of the base weights, and each adapter version that arrives (the same
small :class:`AdapterPayload` that the LoRA path receives through Ray's object store)
is folded in, ``W' = W + scale * B @ A``, and loaded into the running engine with
vLLM's in-place ``reload_weights``. Only the adapter crosses the object store; the
merge and the reload happen in the worker, in well under a second for 135M
parameters.

What stays the same as the LoRA path: the learner, the payload, the versioning, the
one-line errors for adapters vLLM cannot serve. What differs:

- every weight is reloaded, not only the adapted ones: vLLM fuses q/k/v and gate/up,
  and a fused layer loaded in part would keep garbage in the other part;
- the prefix cache is reset after each reload (its key knows nothing of the weights,
  so the shared chat-template prefix would otherwise be served from the old policy);
- merging in a low-precision dtype rounds small updates away, so GPUs (bf16 serving)
  keep the adapter path: ``rollout.weight_sync=auto`` merges on CPU only.
"""
from __future__ import annotations

import torch

from rl.rollout.sync import (_A, _B, _PREFIX, AdapterPayload, check_ranks, check_servable, check_unfolded,
                             module_scales)
from rl.rollout.vllm_engine import VLLMEngine


def merges_weights(rollout_cfg) -> bool:
    """Whether a vLLM worker serves merged weights (``rollout.weight_sync``; auto: on CPU)."""
    mode = getattr(rollout_cfg, "weight_sync", "auto")
    if mode == "auto":
        return not torch.cuda.is_available()
    return mode == "merged"


def merged_weights(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                   peft_config: dict) -> dict[str, torch.Tensor]:
    """``base`` with each adapted module's ``scale * B @ A`` added (pure; ``base`` is not modified).

    ``tensors`` are PEFT state-dict names (``base_model.model.<module>.lora_A.weight``);
    the scale is the module's own PEFT scale (alpha / r, patterns and rsLoRA resolved).
    """
    out = dict(base)
    for module, scale in module_scales(tensors, peft_config).items():
        name = f"{module}.weight"
        if name not in base:
            raise ValueError(f"adapter module {module!r} has no weight {name!r} in the base model; "
                             "the adapter was trained on another model")
        a, b = tensors[f"{_PREFIX}{module}{_A}"], tensors[f"{_PREFIX}{module}{_B}"]
        w = base[name]
        out[name] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def load_base_weights(model_path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under their checkpoint names, in the serving dtype."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_path}; rollout.weight_sync=merged needs a "
                                "safetensors checkpoint (set rollout.weight_sync=adapter)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.to(dtype) for k, v in load_file(str(f)).items()})
    return out


class MergedVLLMEngine(VLLMEngine):
    """A :class:`VLLMEngine` that serves each adapter version merged into the base weights."""

    def __init__(self, rollout_cfg, model_path: str, dtype: str, seed: int):
        super().__init__(rollout_cfg, model_path, dtype, seed)
        self._base = load_base_weights(model_path, getattr(torch, dtype) if dtype != "auto" else torch.float32)

    def _lora_args(self, rollout_cfg) -> dict:
        return {}  # no LoRA kernels: the adapter is in the weights

    def load_adapter(self, payload: AdapterPayload) -> None:
        check_servable(payload.peft_config)
        check_unfolded(payload)
        # Not needed to serve it, but the adapter path refuses these and a run must not
        # depend on which path serves it.
        check_ranks(payload.peft_config, self.max_lora_rank, payload.tensors)
        weights = merged_weights(self._base, payload.tensors, payload.peft_config)
        # In-process engine (uni executor): the tensors are handed over, not serialised.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        self.llm.reset_prefix_cache()
        self._version = payload.version
