"""Updating the adapter vLLM serves in place, without a disk round trip or a new LoRA id.

vLLM's public way to change an adapter is ``add_lora`` under a new id: it writes nothing
itself, but it reads a PEFT folder from disk, builds a ``LoRAModel`` on CPU, pins it,
copies it into the GPU slot, and the previous id must then be removed. Between two
versions of one training run nothing but the values changes (same modules, same ranks;
per-module alphas are folded into B, :func:`rl.rollout.sync.fold_scales_for_vllm`), so
the new values can be written straight into the slot the served id already occupies.

The update runs inside vLLM's worker (``LLM.collective_rpc`` hands it the worker, in this
process or in vLLM's worker processes) and reuses vLLM's own steps, so vLLM's packing of
q/k/v and gate/up into one layer stays vLLM's:

- ``LoRAModel.from_lora_tensors`` builds the new version from the tensors in memory;
- ``LoRAModelManager._create_merged_loras_inplace`` packs it and folds its scale, as
  ``add_lora`` does;
- its modules, ranks and shapes are compared with the registered version; any
  difference, or a manager that does not look as expected, declines the update (the
  caller then takes the ``add_lora`` path) before anything served has changed;
- the registered ``LoRAModel`` takes the new weights (a later re-activation, e.g. after
  an eviction, copies the new ones), and the manager's own ``activate_adapter`` writes
  them into the slot (every module, ``set_lora``: copies into the existing buffers, so
  CUDA graphs captured on them stay valid);
- one module's slot is read back and compared with the payload: a mismatch raises,
  because serving stale weights under the new version number would be silent.

That rebuild and re-activation is most of a sync's time (on a GPU host, casting and
pinning every tensor and re-writing every slot). So once it has served one version, the
worker maps where each payload tensor went and verifies the map by reading every mapped
slot region back (:mod:`rl.rollout.vllm_slots`); later versions with the same signature,
in the same active slot, are then copied straight into the slot regions and into the
registered ``LoRAModel``'s CPU tensors (``rollout.inplace_direct``), followed by the same
one-layer read-back. No verified map, or a direct write that fails, leaves the update to
vLLM's path above (which rewrites every slot from the payload); a failed verification or
write also stops further direct writes on that worker.

The caller resets vLLM's prefix cache afterwards: cached KV blocks are keyed by the
adapter's name and path, which an in-place update keeps, and were computed with the
old weights.

Each update also reports where its time went (:data:`PARTS`), measured where each part
runs: the worker's parts inside the worker function, the call's overhead and the prefix
cache reset on the driver. They are parts of the in-place stage (``inplace_direct`` or
``inplace``) and reach the trainer as ``time/sync_<part>_s``.

Written against vLLM 0.26 and 0.32 (``vllm/lora/model_manager.py``,
``vllm/lora/lora_model.py``, ``vllm/lora/worker_manager.py``).
"""
from __future__ import annotations

import logging
import time

import torch

from rl.rollout import vllm_slots
from rl.rollout.vllm_slots import LORA_A, LORA_B

log = logging.getLogger(__name__)


# The parts of an in-place update, in seconds; together at most its stage's total.
PARTS = (
    "gpu_wait",      # worker: device work queued before the update (a synchronize; 0 on CPU)
    "prepare",       # worker: host-side work before anything served changes (on vLLM's path the
                     # LoRAModel rebuilt, cast, pinned, packed and compared with the served one)
    "slot_write",    # worker: the direct write, or vLLM's re-activation, until the device has done it
    "readback",      # worker: the one-layer read-back check (_check_slot)
    "slot_map",      # worker: mapping and verifying the slots after vLLM's path (once per served id)
    "rpc",           # driver: LLM.collective_rpc's wall time minus the slowest worker's own
    "prefix_reset",  # driver: llm.reset_prefix_cache()
)


def _wait_for_device() -> None:
    """Wait for the work this process has queued on its GPU (a no-op without CUDA), so that
    what a part waits for is not charged to it; other processes' work only shares the GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PartClock:
    """Seconds per part (:data:`PARTS`) of one in-place update, lap by lap; a part that runs
    twice (a fallback) adds up."""

    def __init__(self):
        self.start = self._t = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, part: str) -> None:
        assert part in PARTS, part
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._t
        self._t = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class SlotMismatch(RuntimeError):
    """The slot does not hold the values just written: the served adapter is not the payload."""


def adapter_signature(tensors: dict[str, torch.Tensor], peft_config: dict) -> tuple:
    """What must be equal between two versions for one to replace the other in place (pure):
    every tensor's name and shape, and the (folded) config's global scale inputs. Not the
    dtype: vLLM casts every version to its LoRA dtype (the worker compares after the cast)."""
    shapes = tuple((k, tuple(v.shape)) for k, v in sorted(tensors.items()))
    return shapes, peft_config.get("r"), peft_config.get("lora_alpha"), bool(peft_config.get("use_rslora"))


def _layout(lora_model) -> dict:
    """``{module: (rank, [A shape or None, ...], [B shape or None, ...])}`` of a packed LoRAModel."""
    def shapes(t):
        items = t if isinstance(t, (list, tuple)) else [t]
        return tuple(None if x is None else (tuple(x.shape), x.dtype) for x in items)

    return {name: (w.rank, shapes(w.lora_a), shapes(w.lora_b)) for name, w in lora_model.loras.items()}


def _weights_mapper(model):
    # As WorkerLoRAManager._load_adapter: renames only (0.32 calls it get_rename_mapper,
    # 0.26 get_unstacked_mapper). A mapper with neither is reported, never guessed.
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is None:
        return None
    for name in ("get_rename_mapper", "get_unstacked_mapper"):
        if hasattr(mapper, name):
            return getattr(mapper, name)()
    raise LookupError("the model's hf_to_vllm_mapper has neither get_rename_mapper nor get_unstacked_mapper")


def _probe(manager, tensors: dict[str, torch.Tensor], weights_mapper) -> tuple[str, list]:
    """One LoRA layer to read back after the update, and ``[(slice index, payload A, payload B)]``:
    the last adapted layer in vLLM's activation order, so a read-back that matches also shows
    that activation ran to the end."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    by_module = {}
    for key, a in tensors.items():
        if key.endswith(LORA_A) and key[:-len(LORA_A)] + LORA_B in tensors:
            module, _ = parse_fine_tuned_lora_name(key, weights_mapper)
            by_module[module] = (a, tensors[key[:-len(LORA_A)] + LORA_B])
    for name in reversed(list(manager.modules)):
        layer = manager.modules[name]
        members = manager.packed_modules.get(name, [name])
        slices = [(i, *by_module[m]) for i, m in enumerate(members) if m in by_module]
        if slices and vllm_slots.is_stacked_linear(layer, len(members)):
            return name, slices
    raise LookupError("no adapted single-device linear LoRA layer to read back")


def _check_slot(layer, index: int, slices: list, name: str) -> None:
    for i, a, b in slices:
        for stacked, want in ((layer.lora_a_stacked[i], a), (layer.lora_b_stacked[i], b)):
            got = stacked[index, 0, :want.shape[0], :want.shape[1]].to("cpu")
            if not torch.equal(got, want.to(got.dtype)):
                raise SlotMismatch(f"vLLM's LoRA slot of {name} (slice {i}) does not hold the adapter just "
                                   "written in place; set rollout.inplace_sync=false to load each version with add_lora")


def update_in_place(worker, lora_id: int, tensors: dict[str, torch.Tensor], peft_config: dict,
                    direct: bool = True) -> tuple[str | None, str, dict, float]:
    """Runs in vLLM's worker (``LLM.collective_rpc``): serve ``tensors`` under the registered
    ``lora_id``. Returns (None, the path taken: "inplace_direct" or "inplace", seconds per
    worker part, the worker's total seconds) when done, or (why it declined, "", {}, total)
    when nothing changed. ``direct``: write through the worker's verified slot map where one
    applies (rl/rollout/vllm_slots.py), and build one after vLLM's path."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    clock = PartClock()
    _wait_for_device()
    clock.lap("gpu_wait")
    try:
        worker_manager = worker.model_runner.lora_manager
        manager = worker_manager._adapter_manager
        current = manager.get_adapter(lora_id)
        if current is None:
            return f"LoRA id {lora_id} is not registered in vLLM's worker", "", {}, clock.elapsed()
        signature = adapter_signature(tensors, peft_config)
        if direct and _served_directly(worker, manager, lora_id, tensors, peft_config, signature, clock):
            return None, "inplace_direct", clock.seconds, clock.elapsed()
        mapper = _weights_mapper(manager.model)
        helper = PEFTHelper.from_dict(dict(peft_config, vllm_max_position_embeddings=worker_manager.max_position_embeddings))
        helper.validate_legal(worker_manager.lora_config)
        new = LoRAModel.from_lora_tensors(lora_id, tensors, helper, device="cpu",
                                          dtype=worker_manager.lora_config.lora_dtype,
                                          model_vocab_size=worker_manager.vocab_size, weights_mapper=mapper)
        manager._create_merged_loras_inplace(new)  # vLLM's packing, scale folding and pinning
        if _layout(new) != _layout(current) or new.rank != current.rank:
            return "the adapter's modules or ranks differ from the served version's", "", {}, clock.elapsed()
        probe_name, probe_slices = _probe(manager, tensors, mapper)
        active = lora_id in manager.lora_index_to_id
    except (AttributeError, LookupError, TypeError) as error:  # vLLM's internals are not as expected
        return f"vLLM's LoRA internals are not as expected ({type(error).__name__}: {error})", "", {}, clock.elapsed()
    clock.lap("prepare")
    # From here on the served state changes: errors propagate, they are not a decline.
    current.loras = new.loras
    if active:
        _activate(manager, lora_id, probe_name, probe_slices, clock)
        if direct and not isinstance(getattr(worker, vllm_slots.ATTR, None), str):
            _map_slots(worker, manager, lora_id, tensors, peft_config, mapper, signature, probe_name, probe_slices, clock)
    return None, "inplace", clock.seconds, clock.elapsed()


def _activate(manager, lora_id: int, probe_name: str, probe_slices: list, clock: PartClock) -> None:
    # vLLM's own activation, into the slot the id occupies (freed, then taken again).
    manager.deactivate_adapter(lora_id)
    manager.activate_adapter(lora_id)
    _wait_for_device()
    clock.lap("slot_write")
    _check_slot(manager.modules[probe_name], manager.lora_index_to_id.index(lora_id), probe_slices, probe_name)
    clock.lap("readback")


def _served_directly(worker, manager, lora_id, tensors, peft_config, signature, clock: PartClock) -> bool:
    """Write through the worker's verified slot map where one applies; False leaves the update
    to vLLM's path, which rewrites every slot and the registered tensors from the payload (so
    a direct write that failed half-way is also repaired there)."""
    slot_map = vllm_slots.usable_map(worker, manager, lora_id, signature, peft_config)
    if not isinstance(slot_map, vllm_slots.SlotMap):
        return False
    clock.lap("prepare")
    try:
        vllm_slots.write_direct(slot_map, tensors)
        _wait_for_device()  # its copies are asynchronous on a GPU
        clock.lap("slot_write")
        name, slices = vllm_slots.probe_slices(slot_map, tensors)
        _check_slot(manager.modules[name], slot_map.index, slices, name)
        clock.lap("readback")
        return True
    except Exception as error:  # any failure: vLLM's path serves this version and every later one
        clock.lap("slot_write")
        log.warning("direct LoRA slot write failed (%s: %s); vLLM's own in-place path serves from now on",
                    type(error).__name__, error)
        vllm_slots.remember(worker, f"the direct write failed once ({type(error).__name__}: {error})")
        return False


def _map_slots(worker, manager, lora_id, tensors, peft_config, mapper, signature, probe_name, probe_slices,
               clock: PartClock) -> None:
    """After vLLM's own activation: store a verified slot map, or never try again on this worker."""
    try:
        vllm_slots.remember(worker, vllm_slots.build_slot_map(manager, lora_id, tensors, peft_config, mapper, signature))
        clock.lap("slot_map")
    except (AttributeError, LookupError, TypeError, ValueError, IndexError) as error:
        clock.lap("slot_map")
        log.warning("no direct LoRA slot writes (%s: %s); vLLM's own in-place path serves every version",
                    type(error).__name__, error)
        vllm_slots.remember(worker, f"no verified slot map ({type(error).__name__}: {error})")
        # A read-back that differs may mean the slot does not hold what vLLM was given: write it again.
        _activate(manager, lora_id, probe_name, probe_slices, clock)


def update_served_adapter(llm, lora_id: int, tensors: dict[str, torch.Tensor], peft_config: dict,
                          direct: bool = True) -> tuple[str | None, str, dict[str, float]]:
    """Serve ``tensors`` under the registered ``lora_id`` of ``llm`` (a ``vllm.LLM``), on every
    worker. Returns (None, path, seconds per part) when done, path "inplace_direct" when every
    worker wrote through its verified slot map, else "inplace", and each worker part the
    slowest worker's (:data:`PARTS`); or (why it declined, "", {}) when nothing changed."""
    t = time.perf_counter()
    results = llm.collective_rpc(update_in_place, args=(lora_id, tensors, peft_config, direct))
    rpc = time.perf_counter() - t
    declined = [why for why, *_ in results if why is not None]
    if declined:
        return declined[0], "", {}
    parts = {part: max(seconds.get(part, 0.0) for _, _, seconds, _ in results)
             for part in PARTS if any(part in seconds for _, _, seconds, _ in results)}
    # The call's own cost: what the slowest worker's function did not account for.
    parts["rpc"] = max(0.0, rpc - max(total for *_, total in results))
    t = time.perf_counter()
    # Cached KV blocks are keyed by the adapter's name and path, which stayed the same.
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache after an in-place adapter update, so it could "
                           "serve KV blocks of the previous version; set rollout.inplace_sync=false")
    parts["prefix_reset"] = time.perf_counter() - t
    path = "inplace_direct" if all(path == "inplace_direct" for _, path, *_ in results) else "inplace"
    return None, path, parts
