"""A sleep that frees only vLLM's KV cache and keeps the weights on the GPU (``rollout.sleep_weights: keep``).

vLLM's sleep level 1 copies every weight to host memory on sleep and back on wake: for a
0.5B model in bf16, 1 GB across PCIe each way per engine, every step. Merged adapters then
overwrite most of those weights right after the wake anyway. What the learner needs from a
sleeping engine is mostly its KV cache (several GiB); the weights are the model's size.

vLLM allocates both in its sleep-mode pool (``CuMemAllocator``), each allocation tagged
``weights`` or ``kv_cache``; its sleep unmaps them all. :func:`release_kv_cache` unmaps only
the KV cache's, as vLLM's sleep does for each of them (the physical memory goes back to the
device, the addresses stay reserved, so CUDA graphs and tensors keep pointing at them), and
:func:`restore_kv_cache` maps them again through vLLM's own worker ``wake_up(tags=["kv_cache"])``,
which also re-initialises what lives in the cache (its block-table layout, fp8 scales).

vLLM's pool is one per process, as its own sleep assumes: one engine per process. Both run
inside vLLM's worker (``LLM.collective_rpc``). The engine resets the prefix cache
before releasing (the blocks' contents are lost) and does not go through vLLM's engine-level
sleep: nothing is in flight between two calls of an in-process engine, and vLLM's check that
the whole device's free memory grew (which fails when another process allocates meanwhile)
does not apply.
"""
from __future__ import annotations

KV_CACHE_TAG = "kv_cache"  # vLLM's tag for the KV cache's allocations (gpu_worker.py)


def kv_sleep_unsupported() -> str | None:
    """Why this vLLM cannot sleep keeping its weights (what of its sleep-mode pool is missing),
    or None: checked when the engine is built, before anything runs."""
    import dataclasses

    try:
        from vllm.device_allocator import cumem
    except ImportError as error:
        return f"vLLM's sleep-mode allocator does not import ({error})"
    missing = [name for name in ("CuMemAllocator", "AllocationData", "unmap_and_release") if not hasattr(cumem, name)]
    if not missing:
        fields = {f.name for f in dataclasses.fields(cumem.AllocationData)}
        missing = [f"AllocationData.{name}" for name in ("handle", "tag", "is_asleep") if name not in fields]
        missing += [f"CuMemAllocator.{name}" for name in ("get_instance", "wake_up")
                    if not hasattr(cumem.CuMemAllocator, name)]
    return f"vLLM's sleep-mode allocator lacks {', '.join(missing)}" if missing else None


def kv_allocations(allocator) -> list:
    """The allocation records of vLLM's sleep-mode pool that hold the KV cache."""
    return [data for data in allocator.pointer_to_data.values() if data.tag == KV_CACHE_TAG]


def release_kv_cache(worker) -> int:
    """Runs in vLLM's worker: give the KV cache's physical memory back to the device, keeping
    every other allocation (the weights) mapped. Returns the bytes released."""
    from vllm.device_allocator.cumem import CuMemAllocator, unmap_and_release

    released = 0
    for data in kv_allocations(CuMemAllocator.get_instance()):
        if not data.is_asleep:
            unmap_and_release(data.handle)
            data.is_asleep = True
            released += data.handle[1]
    return released


def restore_kv_cache(worker) -> int:
    """Runs in vLLM's worker: map the KV cache's memory again (vLLM's own partial wake).
    Returns the bytes mapped."""
    from vllm.device_allocator.cumem import CuMemAllocator

    asleep = [data for data in kv_allocations(CuMemAllocator.get_instance()) if data.is_asleep]
    if asleep:
        worker.wake_up(tags=[KV_CACHE_TAG])
    return sum(data.handle[1] for data in asleep)


def pool_state(worker) -> dict[str, int]:
    """Runs in vLLM's worker: bytes of vLLM's sleep-mode pool per tag, and of them asleep
    (``kv_cache``, ``kv_cache_asleep``, ``weights``, ``weights_asleep``)."""
    from vllm.device_allocator.cumem import CuMemAllocator

    state: dict[str, int] = {}
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        state[data.tag] = state.get(data.tag, 0) + data.handle[1]
        key = f"{data.tag}_asleep"
        state[key] = state.get(key, 0) + (data.handle[1] if data.is_asleep else 0)
    return state
