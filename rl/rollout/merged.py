"""Serving the adapter merged into the base weights: vLLM without its LoRA kernels.

vLLM's LoRA path runs a LoRA kernel pair beside every adapted projection: on CPU it decodes
SmolLM2 3-4x slower than the plain model, and on a GPU a 0.5B model's projections are small
enough that the extra kernels are a visible share of each decode step. Here the worker keeps
a copy of the base weights, and each adapter version that arrives (the same small
:class:`AdapterPayload` that the LoRA path receives through Ray's object store) is folded
in, ``W' = W + scale * B @ A``, and written into the running engine. Only the adapter travels
(through the object store, or as a CUDA IPC handle where the worker shares the learner's GPU:
rl/rollout/device_handoff.py); the merge happens in the worker, on the engine's device.

How the merged weights reach the engine depends on where it runs:

- on a GPU, straight into the served parameters, only the adapted modules' weights: the
  first version through the model's own ``load_weights`` (it knows vLLM's fused q/k/v and
  gate/up layout), which also teaches the worker where each weight goes; later versions
  through that verified map in one multi-tensor copy (rl/rollout/param_map.py). The
  parameters are written in place, so CUDA graphs captured on them stay valid. The base
  copy of those modules and the merged results live on the GPU (:class:`AdapterMerger`; for
  an all-linear adapter, most of the model twice more: 358M parameters, 0.7 GB in bf16 each,
  for Qwen2.5-0.5B);
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
                             module_ranks, module_scales)
from rl.rollout.param_map import write_served_weights
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
    A one-off :class:`AdapterMerger`; an engine keeps one across versions.
    """
    return AdapterMerger(base, tensors, peft_config).merge(tensors)


class AdapterMerger:
    """Merges the versions of one adapter structure (modules, ranks, scales) into one base.

    Modules of one shape and rank are merged together in batched matmuls, in chunks of at most
    ``_CHUNK_ELEMENTS`` float32 elements: a module at a time, an all-linear adapter of a 24-layer
    model took 168 host-to-device round trips and as many small matmuls (about 75 ms a sync on
    an H200, reports/gpu/README.md 17). The factors reach W's device in one buffer, laid out in
    merge order (each chunk's A factors, then its B factors), so that a chunk's stacked factors
    are views of it: one concatenation and one cast a version, not a cast and a stack per module.
    Everything a merge writes is allocated once, here, and reused by every version: the
    adapted modules' base weights stacked by shape and rank, as many merged weights (the
    results, overwritten by the next merge), the factors' buffer and one float32 chunk of
    workspace. A merge allocates nothing large, so vLLM's sleep (which empties the allocator's
    cache) leaves it nothing to allocate again. With sleep mode on one H200 the merge took
    67-86 ms allocating everything per merge, 42-51 ms with the stacked weights kept, and 9 ms
    with nothing allocated (reports/gpu/README.md 18, 20, 21; 16-23 ms where two or three
    engines merge at once on the GPU). For an all-linear adapter of Qwen2.5-0.5B in bf16 that
    is 0.7 GB of base copy and 0.7 GB of results, beside 128 MiB of workspace and 34 MB of
    factors (r=16).
    """

    def __init__(self, base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], peft_config: dict,
                 device: torch.device | str | None = None):
        """``device``: where the merges run and their results live; default: the base weights' device."""
        self.scales = module_scales(tensors, peft_config)
        self.structure = self.signature(tensors, peft_config)
        for module in self.scales:
            if f"{module}.weight" not in base:
                raise ValueError(f"adapter module {module!r} has no weight {module + '.weight'!r} in the base "
                                 "model; the adapter was trained on another model")
        ranks = module_ranks(tensors)
        same_merge: dict[tuple, list[str]] = {}  # (W's shape and dtype, rank) -> modules
        for m in self.scales:
            w = base[f"{m}.weight"]
            same_merge.setdefault((tuple(w.shape), w.dtype, ranks[m]), []).append(m)
        first = base[f"{next(iter(self.scales))}.weight"].device if self.scales else "cpu"
        self.device = torch.device(device or first)
        self.factor_keys: list[str] = []  # the payload's factors in merge order (one buffer)
        # One entry per chunk: (its modules, their rows of the group, the group's base stack, results
        # and [k, 1, 1] scales, the rank, and where the chunk's A and B factors start in the buffer).
        self.chunks: list[tuple] = []
        largest = offset = 0
        for (shape, dtype, rank), modules in same_merge.items():
            base_stack = torch.stack([base[f"{m}.weight"] for m in modules]).to(self.device)
            results = torch.empty((len(modules), *shape), dtype=dtype, device=self.device)
            scales = torch.tensor([self.scales[m] for m in modules], device=self.device).view(-1, 1, 1)
            per_chunk = max(1, _CHUNK_ELEMENTS // base_stack[0].numel())
            for start in range(0, len(modules), per_chunk):
                chunk = modules[start:start + per_chunk]
                self.factor_keys += [f"{_PREFIX}{m}{ab}" for ab in (_A, _B) for m in chunk]
                a_at, b_at = offset, offset + len(chunk) * rank * shape[1]
                offset = b_at + len(chunk) * shape[0] * rank
                self.chunks.append((chunk, slice(start, start + len(chunk)), base_stack, results, scales, rank,
                                    a_at, b_at))
                largest = max(largest, len(chunk) * base_stack[0].numel())
        self.workspace = torch.empty(largest, dtype=torch.float32, device=self.device)
        self.flat = torch.empty(offset, dtype=torch.float32, device=self.device)  # the factors, in merge order

    @staticmethod
    def signature(tensors: dict[str, torch.Tensor], peft_config: dict) -> tuple:
        """What a merger is built for: a version with another signature needs a new one."""
        ranks = module_ranks(tensors)
        return tuple(sorted((m, ranks[m], s) for m, s in module_scales(tensors, peft_config).items()))

    def factors(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``tensors``' factors in merge order, in float32, in this merger's own buffer on its
        device (the merge scales B there): one concatenation, and one copy from another device."""
        parts = [tensors[k].reshape(-1) for k in self.factor_keys]
        if parts[0].device == self.flat.device:  # a concrete device ("cuda:0", not "cuda")
            return torch.cat(parts, out=self.flat)
        return self.flat.copy_(torch.cat(parts))

    def merge(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """``tensors``' merged weights (views of this merger's results: valid until the next merge)
        and the update's error as served (:func:`adapted_weights`)."""
        if not self.scales:
            return {}, 0.0
        flat = self.factors(tensors)
        out: dict[str, torch.Tensor] = {}
        lost_sq = update_sq = torch.zeros((), device=self.device)
        for chunk, rows, base_stack, results, scales, r, a_at, b_at in self.chunks:
            k, (n_out, n_in) = len(chunk), base_stack.shape[1:]
            a = flat[a_at:a_at + k * r * n_in].view(k, r, n_in)
            b = flat[b_at:b_at + k * n_out * r].view(k, n_out, r).mul_(scales[rows])
            exact = self.workspace[:k * n_out * n_in].view(k, n_out, n_in)
            exact.copy_(base_stack[rows]).baddbmm_(b, a)  # W + scale * B @ A in float32
            merged = results[rows]
            merged.copy_(exact)  # rounded once, to W's dtype
            # |scale * B @ A|^2 = sum((A A^T) * (sB^T sB)): two r x r products instead of the update again.
            update_sq = update_sq + (torch.bmm(a, a.mT) * torch.bmm(b.mT, b)).sum()
            lost_sq = lost_sq + torch.linalg.vector_norm(exact.sub_(merged)).square()
            out.update((f"{m}.weight", w) for m, w in zip(chunk, merged.unbind(0)))
        update_norm = float(update_sq.clamp_min(0)) ** 0.5  # read once every module is merged: one wait for the device
        return out, (float(lost_sq) ** 0.5 / update_norm if update_norm > 0 else 0.0)


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


class MergedVLLMEngine(VLLMEngine):
    """A :class:`VLLMEngine` that serves each adapter version merged into the base weights."""

    def __init__(self, rollout_cfg, model_path: str, dtype: str, seed: int):
        super().__init__(rollout_cfg, model_path, dtype, seed)
        from vllm.platforms import current_platform

        self._in_place = current_platform.is_cuda_alike()
        self._base = load_base_weights(model_path, getattr(torch, dtype) if dtype != "auto" else torch.float32)
        # Built for the first version and kept while versions keep its structure: on a GPU it holds
        # the adapted modules' base weights there.
        self._merger: AdapterMerger | None = None

    def _lora_args(self, rollout_cfg) -> dict:
        return {}  # no LoRA kernels: the adapter is in the weights

    def load_adapter(self, payload: AdapterPayload) -> dict:
        """Serve ``payload`` merged; returns seconds per stage (check, wake, merge, load, reset),
        ``sync_path`` ("merged"), ``merged_update_error`` (what the serving dtype's rounding
        made of the update, :func:`adapted_weights`; the trainer logs it as
        ``rollout/merged_update_error``) and ``merged_direct_write`` (1 where the weights went
        straight into the parameters through the verified map, rl/rollout/param_map.py)."""
        stage = StageClock(wait_for_gpu=self._in_place)
        check_servable(payload.peft_config)
        check_unfolded(payload)
        # Not needed to serve it, but the adapter path refuses these and a run must not
        # depend on which path serves it.
        check_ranks(payload.peft_config, self.max_lora_rank, payload.tensors)
        stage("check")
        self.wake_up()  # asleep, the parameters are not on the GPU
        stage("wake")
        if self._merger is None or self._merger.structure != AdapterMerger.signature(payload.tensors,
                                                                                   payload.peft_config):
            self._merger = AdapterMerger(self._base, payload.tensors, payload.peft_config,
                                         device="cuda" if self._in_place else "cpu")
        weights, error = self._merger.merge(payload.tensors)
        stage("merge")
        direct = 0.0
        if self._in_place:
            written = self.llm.collective_rpc(write_served_weights, args=(weights,))
            if not all(w["written"] for w in written):
                raise RuntimeError(f"vLLM's model loaded none of adapter version {payload.version}'s weights")
            direct = float(all(w["direct"] for w in written))
        else:
            # In-process engine (uni executor): the tensors are handed over, not serialised.
            every_weight = list({**self._base, **weights}.items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": every_weight})
        stage("load")
        self.llm.reset_prefix_cache()
        stage("reset")
        self._version = payload.version
        return dict(stage.timings, sync_path="merged", merged_update_error=error, merged_direct_write=direct)
