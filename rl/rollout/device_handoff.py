"""The adapter handed from the learner to a rollout worker on the same GPU, without leaving it.

Through Ray's object store an adapter version goes device -> host (learner), host -> object
store -> host (worker), host -> device (worker). For an all-linear r=16 adapter of a 0.5B
model in float32 (35 MB) that was about 0.1 s of a colocated sync on one H200, more than the
merge and the write together (reports/gpu/README.md 18). When the worker's process sees the
learner's GPU, the adapter can stay on it: the learner copies it into one flat buffer per
dtype on its device and sends a CUDA IPC handle (a few hundred bytes) through the object
store; the worker opens the handle and copies the buffer into its own memory, device to device.

- The learner keeps its buffers from one export to the next (:class:`DeviceBuffers`), so the
  handle stays the same and the worker opens it once (:func:`open_tensors` keeps it open).
- The learner overwrites its buffer at the next export, so a worker must have copied a
  version before the learner exports the next one. The trainer's sync waits for the workers'
  loads before the next step when rollouts do not overlap learning (``trainer.max_staleness=0``),
  which :func:`resolve_weight_transfer` requires.
- The learner waits for its copy before it hands the handle out: the worker's process reads
  the buffer with no ordering against the learner's stream.
- A worker finds the learner's GPU by its UUID, not by its index: Ray gives each actor its own
  ``CUDA_VISIBLE_DEVICES``, so one GPU can have different indices in the two processes.

Left out: handing out across GPUs (a worker on another GPU takes the object store) and the
LoRA-kernel path's pinned host registers, which expect host tensors (``rollout.weight_sync=adapter``
keeps the object store).
"""
from __future__ import annotations

import torch

from rl.rollout.sync import split_flat

TRANSFERS = ("auto", "object_store", "cuda_ipc")


def resolve_weight_transfer(setting: str, merged: bool, max_staleness: int,
                            workers_see_learner_gpu: bool | None) -> str:
    """``rollout.weight_transfer`` for this run: "cuda_ipc" or "object_store" (pure).

    ``workers_see_learner_gpu``: whether every rollout worker's process sees the learner's
    (rank 0's) GPU; None where the learner has no GPU. auto takes cuda_ipc wherever it can run;
    an explicit cuda_ipc that cannot fails here, in one line, before any step.
    """
    if setting not in TRANSFERS:
        raise ValueError(f"rollout.weight_transfer={setting!r}: choose one of {', '.join(TRANSFERS)}")
    why_not = None
    if workers_see_learner_gpu is None:
        why_not = "the learner has no GPU"
    elif not merged:
        why_not = "it serves merged weights only (set rollout.weight_sync=merged)"
    elif max_staleness:
        why_not = (f"trainer.max_staleness={max_staleness} lets a worker load a version after the learner "
                   "has overwritten it (set trainer.max_staleness=0)")
    elif not workers_see_learner_gpu:
        why_not = "a rollout worker does not see the learner's GPU (place them on one GPU: cluster.colocate=true)"
    if setting == "cuda_ipc" and why_not:
        raise ValueError(f"rollout.weight_transfer=cuda_ipc cannot run: {why_not}; "
                         "or set rollout.weight_transfer=object_store")
    if setting == "object_store" or why_not:
        return "object_store"
    return "cuda_ipc"


def device_uuids() -> list[str]:
    """The UUIDs of the GPUs this process sees, by index."""
    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


class DeviceBuffers:
    """The learner's side: one flat buffer per dtype on the adapter's device, reused by every
    export of the same layout so that the handle a worker opened stays valid."""

    def __init__(self):
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def share(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Copy ``tensors`` (all on one GPU) into the buffers; returns what a worker needs to open
        them (picklable: handles, shapes, the GPU's UUID)."""
        from torch.multiprocessing.reductions import reduce_tensor

        device = next(iter(tensors.values())).device
        groups = []
        for dtype in dict.fromkeys(t.dtype for t in tensors.values()):
            names = [k for k, t in tensors.items() if t.dtype == dtype]
            numel = sum(tensors[k].numel() for k in names)
            flat = self._flat.get(dtype)
            if flat is None or flat.numel() != numel or flat.device != device:
                flat = self._flat[dtype] = torch.empty(numel, dtype=dtype, device=device)
            torch.cat([tensors[k].detach().reshape(-1) for k in names], out=flat)
            groups.append((reduce_tensor(flat)[1], [(k, tuple(tensors[k].shape)) for k in names]))
        torch.cuda.current_stream(device).synchronize()  # the worker reads with no ordering against this stream
        return {"gpu_uuid": str(torch.cuda.get_device_properties(device).uuid), "order": list(tensors),
                "groups": groups}


# The worker's opened buffers, by handle: opened once, since the learner reuses its buffers.
_OPENED: dict[tuple, torch.Tensor] = {}


def open_tensors(shared: dict) -> dict[str, torch.Tensor]:
    """The worker's side: its own copy, on the learner's GPU, of the tensors :meth:`DeviceBuffers.share`
    put there (views of one buffer per dtype)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuids = device_uuids()
    if shared["gpu_uuid"] not in uuids:
        raise RuntimeError(f"this process does not see the learner's GPU {shared['gpu_uuid']} (it sees "
                           f"{uuids or 'none'}); set rollout.weight_transfer=object_store")
    device = uuids.index(shared["gpu_uuid"])
    out = {}
    for args, manifest in shared["groups"]:
        args = list(args)
        args[6] = device  # rebuild_cuda_tensor's storage_device: this process's index of that GPU
        key = (args[7], args[9])  # the storage's handle and offset
        if key not in _OPENED:
            _OPENED[key] = rebuild_cuda_tensor(*args)
        out.update(split_flat(_OPENED[key].clone(), manifest))
    return {k: out[k] for k in shared["order"]}


def adapter_stays_on_gpu(rollout_cfg, max_staleness: int, learner, pool) -> bool:
    """Whether this run's adapter versions travel as CUDA IPC handles (``rollout.weight_transfer``
    resolved against the running actors: ``learner`` a LearnerGroup, ``pool`` a RolloutPool or
    None where the run has no rollouts)."""
    from rl.rollout.merged import merges_weights

    if pool is None:
        return False
    setting = rollout_cfg.weight_transfer
    merged = rollout_cfg.engine == "vllm" and merges_weights(rollout_cfg)
    uuid = learner.gpu_uuid() if setting != "object_store" else None
    sees = None if uuid is None else pool.sees_gpu(uuid)
    return resolve_weight_transfer(setting, merged, max_staleness, sees) == "cuda_ipc"
