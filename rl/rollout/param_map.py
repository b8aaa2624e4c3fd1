"""Where vLLM's loader puts each merged weight, learned once and verified; later versions copied straight there.

The merged path (rl/rollout/merged.py) writes every adapter version's merged weights into the
served parameters. vLLM's ``load_weights`` knows the model's layout (q/k/v fused into one
``qkv_proj``, gate/up into ``gate_up_proj``), but it walks the weights one by one in Python,
matching names and narrowing parameters for each: 11-22 ms a sync for the 168 adapted
weights of Qwen2.5-0.5B on an H200 (reports/gpu/README.md 20), where one multi-tensor copy
of the same bytes took 0.6 ms (bench/bench_merge.py). Between two versions of a run only the
values change, so:

- the first version goes through ``load_weights`` while :class:`CopyRecorder` (a torch
  dispatch mode) records every copy the loader makes: for each weight, the view of a
  parameter it was copied into;
- :func:`verified_map` keeps those views only if they are complete and checked: each weight
  copied exactly once, whole, without a cast, into a contiguous view of one of the model's own
  parameters, no two views overlapping, and every view, read back after the load, bitwise
  equal to the weight it was given;
- a later version with the same names, shapes and dtypes is copied into the views in one
  ``torch._foreach_copy_`` (:func:`write_served_weights`).

Anything else leaves no map, and ``load_weights`` stays in use (without the recording, for the
weights it was declined for): a loader that casts, splits, permutes or post-processes a weight,
a tensor-parallel shard. Another set of weights is recorded and mapped anew. The
views stay valid through vLLM's sleep and wake, which keep the parameters' device addresses
(the engine's CUDA graphs rely on that as well).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The map, or the reason there is none, lives on vLLM's worker object: it dies with the engine.
ATTR = "_placerl_param_map"


@dataclass(frozen=True)
class ParamMap:
    signature: tuple  # (name, shape, dtype) of each weight, in the order of ``destinations``
    destinations: tuple  # views into the model's parameters


@dataclass(frozen=True)
class Declined:
    """A recorded load that left no map, and why: the same weights then load without recording."""

    signature: tuple  # the weights the recorded load could not map
    reason: str


def weights_signature(weights: dict[str, torch.Tensor]) -> tuple:
    """What a map is built for (pure): the weights' names, shapes and dtypes, in order."""
    return tuple((name, tuple(w.shape), w.dtype) for name, w in weights.items())


class CopyRecorder(TorchDispatchMode):
    """Records, for each tensor of ``sources``, the destination and source of every ``copy_`` that reads it."""

    def __init__(self, sources: dict[str, torch.Tensor]):
        super().__init__()
        self._name_at = {t.data_ptr(): name for name, t in sources.items()}
        self.copies: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.copy_.default:
            name = self._name_at.get(args[1].data_ptr())
            if name is not None:
                self.copies.setdefault(name, []).append((args[0], args[1]))
        return out


def verified_map(weights: dict[str, torch.Tensor], copies: dict, parameters: list[torch.Tensor]) -> ParamMap | str:
    """The map the recorded ``copies`` of ``weights`` make, or why there is none (read-back included)."""
    storages = {p.untyped_storage().data_ptr() for p in parameters}
    spans: dict[int, list[tuple[int, int, str]]] = {}
    destinations = []
    for name, w in weights.items():
        found = copies.get(name, [])
        if len(found) != 1:
            return f"the loader copied {name!r} {len(found)} times"
        dst, src = found[0]
        if src.shape != w.shape or src.stride() != w.stride() or dst.shape != w.shape or dst.dtype != w.dtype:
            return f"the loader copied {name!r} in part or with a cast"
        if not dst.is_contiguous() or dst.untyped_storage().data_ptr() not in storages:
            return f"the loader copied {name!r} somewhere other than a contiguous view of a parameter"
        start = dst.storage_offset() * dst.element_size()
        spans.setdefault(dst.untyped_storage().data_ptr(), []).append((start, start + dst.nbytes, name))
        destinations.append(dst)
    for runs in spans.values():
        runs.sort()
        for (_, end, a), (start, _, b) in zip(runs, runs[1:]):
            if start < end:
                return f"the loader's destinations of {a!r} and {b!r} overlap"
    for (name, w), dst in zip(weights.items(), destinations):
        if not torch.equal(dst, w):
            return f"after the load, the parameter does not hold {name!r} as given"
    return ParamMap(weights_signature(weights), tuple(destinations))


def write_served_weights(worker, weights: dict[str, torch.Tensor]) -> dict:
    """Runs in vLLM's worker (``LLM.collective_rpc``): copy ``weights`` (checkpoint names, the
    served dtype) into the served model's parameters. Straight through the verified map where
    one fits; else with the model's own ``load_weights``, learning the map on the way.
    Returns ``written`` (how many were written: weights through the map, parameters through the
    loader; 0 where the loader took none) and ``direct`` (through the map)."""
    found, signature = getattr(worker, ATTR, None), weights_signature(weights)
    if isinstance(found, ParamMap) and found.signature == signature:
        torch._foreach_copy_(list(found.destinations), list(weights.values()))
        return {"written": len(weights), "direct": True}
    model = worker.model_runner.get_model()
    if isinstance(found, Declined) and found.signature == signature:
        return {"written": len(model.load_weights(iter(weights.items()))), "direct": False}
    recorder = CopyRecorder(weights)
    with recorder:
        written = len(model.load_weights(iter(weights.items())))
    found = verified_map(weights, recorder.copies, list(model.parameters()))
    setattr(worker, ATTR, found if isinstance(found, ParamMap) else Declined(signature, found))
    return {"written": written, "direct": False}


def map_state(worker) -> str:
    """Runs in vLLM's worker: ``mapped``, ``none yet``, or why the last recorded load left no map."""
    found = getattr(worker, ATTR, None)
    return "mapped" if isinstance(found, ParamMap) else found.reason if found else "none yet"
