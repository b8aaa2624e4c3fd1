"""A verified map of vLLM's LoRA slots, and each new adapter version written straight through it.

vLLM's own in-place path (:mod:`rl.rollout.vllm_inplace`) rebuilds a ``LoRAModel`` for every
version (casting and pinning every tensor), packs it, and re-activates the adapter: every
LoRA layer zero-fills its slot and copies the new values in. Between two versions of one
run nothing but the values changes, so after vLLM has written one version itself the
worker learns where each payload tensor went and writes later versions there directly:

- :func:`build_slot_map` runs right after vLLM's own activation of a version. For every
  adapted module of the payload (its ``lora_A``/``lora_B`` pair) it finds, with vLLM's own
  name parsing and packing table, the LoRA layer, the slice within a packed layer (q/k/v,
  gate/up) and the slot index, and the scale vLLM folds into B (``optimize()``:
  ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; 1 for placerl's folded payloads,
  :func:`rl.rollout.sync.fold_scales_for_vllm`). The map must cover exactly what vLLM
  wrote (every module of the registered ``LoRAModel``, nothing else), and it is VERIFIED:
  every mapped slot region and every registered CPU tensor is read back and compared,
  bitwise, with what the map says it holds (the payload cast to vLLM's LoRA dtype, B
  times the scale in that dtype, as ``optimize()`` computes it). Anything unexpected (a
  tensor-parallel layer, a layer that is not a stacked linear LoRA layer, per-module
  scale patterns, a mismatch) leaves no map, and vLLM's path stays in use.
- :func:`write_direct` writes a later version with the same signature into the same slot:
  each tensor is copied (cast, B scaled) into the registered ``LoRAModel``'s own CPU
  tensors, so that a re-activation by vLLM (after an eviction, say) serves the new version
  and not a stale one, and from there into its slot region, as ``set_lora`` copies. Nothing
  is zero-filled: the structure is the verified one, so the regions outside the written
  ones still hold vLLM's zeros. The caller then reads one layer back (``_check_slot``) and
  resets the prefix cache, as on vLLM's path.

Written against vLLM 0.26 and 0.32, with only the internals vLLM's path already relies on
(``manager.modules``, ``packed_modules``, ``lora_index_to_id``, ``lora_a_stacked`` /
``lora_b_stacked``, ``get_adapter``, ``LoRAModel.loras`` with its ``lora_a``/``lora_b``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# The verified map (or why there will be none) lives on vLLM's worker: it dies with it.
ATTR = "_placerl_slot_map"


class MapDeclined(LookupError):
    """No verified map: the layout is not the expected one, or a read-back differs."""


@dataclass(frozen=True)
class SlotEntry:
    layer: str  # the vLLM LoRA layer (a key of manager.modules)
    slice: int  # the slice within a packed layer (0 for an unpacked one)
    a_key: str  # the payload's tensor names
    b_key: str


@dataclass
class SlotMap:
    manager: object
    lora_model: object  # the registered LoRAModel whose CPU tensors the map updates
    loras: dict  # its ``loras`` when they were made private (vLLM's own path replaces the dict)
    lora_id: int
    signature: tuple
    index: int  # the slot the adapter occupies
    scale: float  # folded into B by vLLM's optimize()
    entries: list[SlotEntry]


def vllm_scale(peft_config: dict) -> float:
    """The scale vLLM folds into every B of an adapter with this config (pure). Per-module
    patterns are refused: vLLM 0.26 ignores them, 0.32 honours them (placerl folds them away)."""
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise MapDeclined("the adapter config has per-module rank or alpha patterns")
    r, alpha = peft_config["r"], peft_config["lora_alpha"]
    return alpha / math.sqrt(r) if peft_config.get("use_rslora") else alpha / r


def expected(tensors: dict, entry: SlotEntry, dtype: torch.dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What vLLM's LoRAModel holds for ``entry``: the payload cast to its LoRA dtype, B times the
    scale in that dtype (``LoRALayerWeights.optimize`` multiplies in place after the cast)."""
    a = tensors[entry.a_key].to("cpu", dtype)
    b = tensors[entry.b_key].to("cpu", dtype, copy=True)
    if scale != 1:
        b *= scale
    return a, b


def _registered(lora_model, entry: SlotEntry) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered LoRAModel's own CPU tensors for ``entry`` (packed layers keep lists)."""
    weights = lora_model.loras.get(entry.layer)
    if weights is None:
        raise MapDeclined(f"the registered adapter has no weights for {entry.layer}")
    a, b = weights.lora_a, weights.lora_b
    if isinstance(a, (list, tuple)):
        a, b = a[entry.slice], b[entry.slice]
    elif entry.slice != 0:
        raise MapDeclined(f"{entry.layer} is unpacked in the registered adapter, but slice {entry.slice} is mapped")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise MapDeclined(f"the registered adapter's weights of {entry.layer} (slice {entry.slice}) are not tensors")
    return a, b


def _own(lora_model, entry: SlotEntry) -> None:
    """Give the registered LoRAModel private CPU tensors for ``entry``: an unpinned one may be the
    payload itself (``Tensor.to`` returns its input when nothing changes), e.g. a view into a
    read-only object-store buffer, which later versions must not write into."""
    weights = lora_model.loras[entry.layer]
    for field in ("lora_a", "lora_b"):
        held = getattr(weights, field)
        packed = isinstance(held, (list, tuple))
        tensor = held[entry.slice] if packed else held
        if tensor.is_pinned():  # vLLM's pin_memory() already made a private copy
            continue
        if packed:
            held = list(held)
            held[entry.slice] = tensor.clone()
            setattr(weights, field, held)
        else:
            setattr(weights, field, tensor.clone())


def is_stacked_linear(layer, members: int) -> bool:
    """A single-device stacked linear LoRA layer: one slot buffer per packed member, nothing
    sliced over devices; the only kind whose slot regions are read back or written here."""
    stacked_a, stacked_b = getattr(layer, "lora_a_stacked", None), getattr(layer, "lora_b_stacked", None)
    return (getattr(layer, "tp_size", None) == 1 and getattr(layer, "n_slices", None) == members
            and isinstance(stacked_a, (tuple, list)) and isinstance(stacked_b, (tuple, list))
            and len(stacked_a) == len(stacked_b) == members)


def _regions(layer, entry: SlotEntry, index: int, a_shape, b_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot regions ``set_lora`` writes: ``lora_a_stacked[i][index, 0, :r, :in]`` and
    ``lora_b_stacked[i][index, 0, :out, :r]``."""
    a = layer.lora_a_stacked[entry.slice][index, 0, :a_shape[0], :a_shape[1]]
    b = layer.lora_b_stacked[entry.slice][index, 0, :b_shape[0], :b_shape[1]]
    return a, b


def _entries(manager, tensors: dict, weights_mapper) -> list[SlotEntry]:
    """Every adapted payload module's layer and slice, in vLLM's activation order."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    by_module = {}
    for key in tensors:
        if key.endswith(LORA_A):
            module, is_a = parse_fine_tuned_lora_name(key, weights_mapper)
            if not is_a or key[:-len(LORA_A)] + LORA_B not in tensors or module in by_module:
                raise MapDeclined(f"payload tensor {key} does not pair with one lora_B")
            by_module[module] = (key, key[:-len(LORA_A)] + LORA_B)
        elif not key.endswith(LORA_B):
            raise MapDeclined(f"payload tensor {key} is neither a lora_A nor a lora_B weight")
    if 2 * len(by_module) != len(tensors):
        raise MapDeclined("the payload has a lora_B without its lora_A")
    entries = []
    for name, layer in manager.modules.items():
        members = manager.packed_modules.get(name, [name])
        mine = [(i, m) for i, m in enumerate(members) if m in by_module]
        if not mine:
            continue
        if not is_stacked_linear(layer, len(members)):
            raise MapDeclined(f"{name} is not a single-device stacked linear LoRA layer")
        entries += [SlotEntry(name, i, *by_module.pop(m)) for i, m in mine]
    if by_module:
        raise MapDeclined(f"no vLLM LoRA layer for {sorted(by_module)[0]}")
    return entries


def build_slot_map(manager, lora_id: int, tensors: dict, peft_config: dict, weights_mapper,
                   signature: tuple) -> SlotMap:
    """Map and verify, right after vLLM has activated ``tensors`` under ``lora_id`` itself;
    raises MapDeclined instead of returning a map that is not verified."""
    scale = vllm_scale(peft_config)
    lora_model = manager.get_adapter(lora_id)
    if lora_model is None or lora_id not in manager.lora_index_to_id:
        raise MapDeclined(f"LoRA id {lora_id} is not registered and active")
    index = manager.lora_index_to_id.index(lora_id)
    entries = _entries(manager, tensors, weights_mapper)
    # The map must cover all that vLLM's activation writes: every slice the LoRAModel holds.
    held = set()
    for name, weights in lora_model.loras.items():
        slices = weights.lora_a if isinstance(weights.lora_a, (list, tuple)) else [weights.lora_a]
        held |= {(name, i) for i, t in enumerate(slices) if t is not None}
    if held != {(e.layer, e.slice) for e in entries}:
        raise MapDeclined("the registered adapter's modules are not the payload's")
    for entry in entries:
        _own(lora_model, entry)
        reg_a, reg_b = _registered(lora_model, entry)
        want_a, want_b = expected(tensors, entry, reg_a.dtype, scale)
        slot_a, slot_b = _regions(manager.modules[entry.layer], entry, index, want_a.shape, want_b.shape)
        for what, got, want in (("CPU A", reg_a, want_a), ("CPU B", reg_b, want_b),
                                ("slot A", slot_a, want_a), ("slot B", slot_b, want_b)):
            want = want.to(got.dtype)
            if got.shape != want.shape or not torch.equal(got.to("cpu"), want):
                raise MapDeclined(f"{what} of {entry.layer} (slice {entry.slice}) does not hold the mapped "
                                  f"payload ({entry.a_key[:-len(LORA_A)]})")
    return SlotMap(manager, lora_model, lora_model.loras, lora_id, signature, index, scale, entries)


def probe_slices(slot_map: SlotMap, tensors: dict) -> tuple[str, list]:
    """The last mapped layer (as ``_probe`` picks it) and ``[(slice, A, B)]`` as its slot must hold them."""
    name = slot_map.entries[-1].layer
    dtype = _registered(slot_map.lora_model, slot_map.entries[-1])[0].dtype
    return name, [(e.slice, *expected(tensors, e, dtype, slot_map.scale))
                  for e in slot_map.entries if e.layer == name]


def usable_map(worker, manager, lora_id: int, signature: tuple, peft_config: dict) -> SlotMap | str:
    """The worker's verified map when it applies to this update, else why not (nothing changed)."""
    slot_map = getattr(worker, ATTR, None)
    if not isinstance(slot_map, SlotMap):
        return slot_map or "no verified slot map yet"
    if slot_map.manager is not manager or slot_map.lora_id != lora_id or slot_map.signature != signature:
        return "the slot map belongs to another adapter"
    if manager.get_adapter(lora_id) is not slot_map.lora_model:
        return "vLLM registered another LoRAModel under the id"
    if lora_id not in manager.lora_index_to_id or manager.lora_index_to_id.index(lora_id) != slot_map.index:
        return "the adapter is not active in the mapped slot"
    try:
        if vllm_scale(peft_config) != slot_map.scale:
            return "the adapter's scale differs from the mapped one"
    except (MapDeclined, KeyError, TypeError, ZeroDivisionError) as error:
        return f"no scale for the adapter config ({error})"
    return slot_map


def write_direct(slot_map: SlotMap, tensors: dict) -> None:
    """Write ``tensors`` into the registered LoRAModel's CPU tensors and the slot regions."""
    if slot_map.lora_model.loras is not slot_map.loras:
        # vLLM's own path served a version since the map was verified: same layout (same id,
        # signature and slot), new CPU tensors, which may be the payload's; make them private.
        for entry in slot_map.entries:
            _own(slot_map.lora_model, entry)
        slot_map.loras = slot_map.lora_model.loras
    for entry in slot_map.entries:
        reg_a, reg_b = _registered(slot_map.lora_model, entry)
        reg_a.copy_(tensors[entry.a_key])  # casts to vLLM's LoRA dtype, as from_lora_tensors does
        reg_b.copy_(tensors[entry.b_key])
        if slot_map.scale != 1:
            reg_b *= slot_map.scale  # optimize()'s multiply, in the LoRA dtype
        slot_a, slot_b = _regions(slot_map.manager.modules[entry.layer], entry, slot_map.index,
                                  reg_a.shape, reg_b.shape)
        # From (pinned, on a GPU host) CPU memory that is not written again before the caller's
        # read-back, which waits for these copies on the same stream.
        slot_a.copy_(reg_a, non_blocking=True)
        slot_b.copy_(reg_b, non_blocking=True)


def remember(worker, slot_map: SlotMap | str | None) -> None:
    """Store the verified map (or, when mapping can never work on this worker, why)."""
    setattr(worker, ATTR, slot_map)
