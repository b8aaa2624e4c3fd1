"""Serving the adapter merged into the base weights: vLLM without its LoRA kernels.

vLLM's LoRA path runs a LoRA kernel pair beside every adapted projection: on CPU it decodes
SmolLM2 3-4x slower than the plain model, and on a GPU a 0.5B model's projections are small
enough that the extra kernels are a visible share of each decode step. Here the worker keeps
a copy of the base weights, and each adapter version that arrives (the same small
:class:`AdapterPayload` that the LoRA path receives through Ray's object store) is folded
in, ``W' = W + scale * B @ A``, and written into the running engine. Only the adapter crosses
the object store; the merge happens in the worker, on the engine's device.

How the merged weights reach the engine depends on where it runs:

- on a GPU, straight into the served parameters through the model's own ``load_weights``
  (it knows vLLM's fused q/k/v and gate/up layout), only the adapted modules' weights. The
  parameters are written in place, so CUDA graphs captured on them stay valid. The base
  copy of those modules lives on the GPU (for an all-linear adapter, most of the model once
  more: 358M parameters, 0.7 GB in bf16, for Qwen2.5-0.5B);
- on CPU, vLLM repacks each linear weight for its CPU kernels when it loads it and drops
  the original, so a write into the parameter would not be seen: every weight goes through
  vLLM's ``reload_weights``, which repeats that processing. Every weight, not only the
  adapted ones, because that reload rebuilds a fused layer from what it is given, and a
  fused layer loaded in part would keep garbage in the other part.

What stays the same as the LoRA path: the learner, the payload, the versioning, the
one-line errors for adapters vLLM cannot serve. What differs:

- the prefix cache is reset after each version (its key knows nothing of the weights, so
  the shared chat-template prefix would otherwise be served from the old policy);
- in sleep mode the engine is woken before the write (the parameters are not on the GPU
  while it sleeps);
- the merge rounds to the serving dtype: in bf16, an update smaller than half a unit in
  the last place of its base weight is rounded away (W has 8 significant bits), so early,
  small updates reach the rollouts late. Each sync measures it (``rollout/merged_update_error``:
  the served update's relative error), and the learner scores the rollout's tokens with the
  exact adapter, so its effect shows in ``learner/logprob_mismatch_*``. TRL's colocated vLLM
  serves LoRA the same way. ``rollout.weight_sync=auto`` merges on CPU only.
"""
from __future__ import annotations

import torch

from rl.rollout.sync import (_A, _B, _PREFIX, AdapterPayload, check_ranks, check_servable, check_unfolded,
                             module_scales)
from rl.rollout.vllm_engine import StageClock, VLLMEngine


def merges_weights(rollout_cfg) -> bool:
    """Whether a vLLM worker serves merged weights (``rollout.weight_sync``; auto: on CPU)."""
    mode = getattr(rollout_cfg, "weight_sync", "auto")
    if mode == "auto":
        return not torch.cuda.is_available()
    return mode == "merged"


# Float32 elements of one merge chunk's stacked weights (128 MiB): bounds what a merge allocates
# beside the engine, whatever the model's size.
_CHUNK_ELEMENTS = 1 << 25


def adapted_weights(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                    peft_config: dict) -> tuple[dict[str, torch.Tensor], float]:
    """Each adapted module's weight ``W + scale * B @ A`` (pure): only those, in W's dtype and
    on W's device, summed in float32 and rounded once; and the update's error as served,
    ``|(W' - W) - scale * B @ A| / |scale * B @ A|`` over all of them (Frobenius norms; 0 when
    the update is exact or zero, 1 when the rounding dropped all of it).

    ``tensors`` are PEFT state-dict names (``base_model.model.<module>.lora_A.weight``);
    the scale is the module's own PEFT scale (alpha / r, patterns and rsLoRA resolved).
    The factors reach W's device in one copy, and modules of one shape and rank are merged
    together in one batched matmul: a module at a time, an all-linear adapter of a 24-layer
    model took 168 host-to-device round trips and as many small matmuls (about 75 ms a sync
    on an H200, reports/gpu/README.md 17).
    """
    scales = module_scales(tensors, peft_config)
    for module in scales:
        if f"{module}.weight" not in base:
            raise ValueError(f"adapter module {module!r} has no weight {module + '.weight'!r} in the base model; "
                             "the adapter was trained on another model")
    if not scales:
        return {}, 0.0
    device = base[f"{next(iter(scales))}.weight"].device
    factors = _on_device([tensors[f"{_PREFIX}{m}{ab}"] for m in scales for ab in (_A, _B)], device)
    a_of = {m: factors[2 * i] for i, m in enumerate(scales)}
    b_of = {m: factors[2 * i + 1] for i, m in enumerate(scales)}
    same_merge: dict[tuple, list[str]] = {}  # (W's shape and dtype, rank) -> modules
    for m in scales:
        w = base[f"{m}.weight"]
        same_merge.setdefault((tuple(w.shape), w.dtype, a_of[m].shape[0]), []).append(m)
    out: dict[str, torch.Tensor] = {}
    lost_sq = update_sq = torch.zeros((), device=device)
    for (shape, dtype, _), modules in same_merge.items():
        per_chunk = max(1, _CHUNK_ELEMENTS // (shape[0] * shape[1]))
        for start in range(0, len(modules), per_chunk):
            chunk = modules[start:start + per_chunk]
            base_w = torch.stack([base[f"{m}.weight"] for m in chunk]).float()
            scale = torch.tensor([scales[m] for m in chunk], device=device).view(-1, 1, 1)
            update = scale * torch.bmm(torch.stack([b_of[m] for m in chunk]), torch.stack([a_of[m] for m in chunk]))
            merged = (base_w + update).to(dtype)
            lost_sq = lost_sq + (merged.float() - base_w - update).square().sum()
            update_sq = update_sq + update.square().sum()
            out.update((f"{m}.weight", w) for m, w in zip(chunk, merged.unbind(0)))
    update_norm = float(update_sq) ** 0.5  # read once every module is merged: one wait for the device
    return out, (float(lost_sq) ** 0.5 / update_norm if update_norm > 0 else 0.0)


def _on_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors`` as float32 on ``device``, moved in one copy (views of one buffer there)."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).to(device)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def merged_weights(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                   peft_config: dict) -> tuple[dict[str, torch.Tensor], float]:
    """``base`` with each adapted module's weight merged (pure; ``base`` is not modified), and
    the update's error as served (:func:`adapted_weights`)."""
    adapted, error = adapted_weights(base, tensors, peft_config)
    return {**base, **adapted}, error


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


def write_weights_in_place(worker, weights: dict[str, torch.Tensor]) -> int:
    """Runs in vLLM's worker (``LLM.collective_rpc``): copy ``weights`` (checkpoint names) into
    the served model's parameters with the model's own loader; returns how many parameters
    it wrote."""
    return len(worker.model_runner.get_model().load_weights(iter(weights.items())))


class MergedVLLMEngine(VLLMEngine):
    """A :class:`VLLMEngine` that serves each adapter version merged into the base weights."""

    def __init__(self, rollout_cfg, model_path: str, dtype: str, seed: int):
        super().__init__(rollout_cfg, model_path, dtype, seed)
        from vllm.platforms import current_platform

        self._in_place = current_platform.is_cuda_alike()
        self._base = load_base_weights(model_path, getattr(torch, dtype) if dtype != "auto" else torch.float32)
        self._device_base: dict[str, torch.Tensor] = {}  # the adapted modules' base weights, on the GPU

    def _lora_args(self, rollout_cfg) -> dict:
        return {}  # no LoRA kernels: the adapter is in the weights

    def load_adapter(self, payload: AdapterPayload) -> dict:
        """Serve ``payload`` merged; returns seconds per stage (check, wake, merge, load, reset),
        ``sync_path`` ("merged") and ``merged_update_error`` (what the serving dtype's rounding
        made of the update, :func:`adapted_weights`; the trainer logs it as
        ``rollout/merged_update_error``)."""
        stage = StageClock(wait_for_gpu=self._in_place)
        check_servable(payload.peft_config)
        check_unfolded(payload)
        # Not needed to serve it, but the adapter path refuses these and a run must not
        # depend on which path serves it.
        check_ranks(payload.peft_config, self.max_lora_rank, payload.tensors)
        stage("check")
        self.wake_up()  # asleep, the parameters are not on the GPU
        stage("wake")
        if self._in_place:
            weights, error = adapted_weights(self._adapted_base(payload), payload.tensors, payload.peft_config)
            stage("merge")
            written = self.llm.collective_rpc(write_weights_in_place, args=(weights,))
            if not all(written):
                raise RuntimeError(f"vLLM's model loaded none of adapter version {payload.version}'s weights")
        else:
            weights, error = merged_weights(self._base, payload.tensors, payload.peft_config)
            stage("merge")
            # In-process engine (uni executor): the tensors are handed over, not serialised.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        stage("load")
        self.llm.reset_prefix_cache()
        stage("reset")
        self._version = payload.version
        return dict(stage.timings, sync_path="merged", merged_update_error=error)

    def _adapted_base(self, payload: AdapterPayload) -> dict[str, torch.Tensor]:
        """The base weights of ``payload``'s modules on the GPU, copied there the first time."""
        for module in module_scales(payload.tensors, payload.peft_config):
            name = f"{module}.weight"
            if name not in self._device_base and name in self._base:
                self._device_base[name] = self._base[name].to("cuda")
        return self._device_base
