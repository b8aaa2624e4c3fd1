"""What a vLLM rollout engine is built with, decided before it starts (pure functions, no
engine): the rank cap, dtype and CUDA-graph settings, seed and sleep modes, the KV cache and
prefill arguments, async scheduling, and the one-line errors for vLLM's start-up failures that
a user can fix. rl/rollout/vllm_engine.py builds the engine from them."""
from __future__ import annotations

import contextlib
import os

# The ranks vLLM accepts for max_lora_rank.
VLLM_RANK_CAPS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def served_rank_cap(max_lora_rank: int) -> int:
    """The smallest rank cap vLLM accepts that is at least ``rollout.max_lora_rank``."""
    for cap in VLLM_RANK_CAPS:
        if cap >= max_lora_rank:
            return cap
    raise ValueError(f"rollout.max_lora_rank={max_lora_rank} exceeds vLLM's largest LoRA rank "
                     f"{VLLM_RANK_CAPS[-1]}; lower it or use rollout.engine=hf")


def adapter_root() -> str | None:
    # RAM-backed when available: the folder lives for milliseconds and is read once.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def check_vllm_dtype(dtype: str, on_gpu: bool) -> None:
    """vLLM's GPU LoRA kernels take float16/bfloat16 only: refuse float32 before starting."""
    if on_gpu and dtype == "float32":
        raise ValueError("rollout.dtype=float32 cannot serve LoRA adapters with vLLM on a GPU (its LoRA "
                         "kernels take float16/bfloat16 only); set rollout.dtype=bfloat16 (or auto)")


def resolve_enforce_eager(setting, on_gpu: bool) -> bool:
    """``rollout.enforce_eager``: auto is eager on CPU and CUDA graphs on a GPU."""
    return (not on_gpu) if setting == "auto" else bool(setting)


def resolve_seed_mode(setting: str, on_gpu: bool, in_process: bool) -> str:
    """``rollout.seed_mode``: auto is one seed per request on CPU, one reseed per call on a GPU.

    vLLM's CPU model runner samples a seeded request with its own generator, in a Python loop
    over the batch's seeded sequences (one small kernel each, every decode step). "batch"
    reseeds the process's default generators instead, which only reach the sampler when the
    engine runs in this process: torch's (the CPU runner's) and numpy's, from which vLLM's GPU
    model runner draws the seed of each request that has none (it then samples every request
    from its own seed in one kernel, seeded or not). On an H200 the two modes measured alike so
    far (64 x 8: 18.1k and 18.3k tokens/s in two sessions; 128 x 8: 27.2k request, 24.7k batch
    in one run, reports/gpu/README.md 6.1).
    """
    mode = ("batch" if on_gpu and in_process else "request") if setting == "auto" else setting
    if mode == "batch" and not in_process:
        raise ValueError("rollout.seed_mode=batch needs vLLM's engine in the worker's process "
                         "(VLLM_ENABLE_V1_MULTIPROCESSING=0); unset that variable or set rollout.seed_mode=request")
    return mode


# vLLM's default max_num_batched_tokens for an LLM on CPU.
CPU_BATCHED_TOKENS = 4096


def whole_prefill_args(max_model_len: int) -> dict:
    """vLLM scheduler options that never split a prompt's prefill over engine steps (CPU).

    After a step that prefilled part of a prompt, vLLM rewinds that request's seeded
    generator by its offset; a CPU generator has no offset ("CPU Generator does not use
    offset"), so with per-request seeds (``rollout.seed_mode: request``) any batch with more
    prompt tokens than one step takes would crash. Without chunked prefill a prompt waits
    for the next step instead of being cut, so any batch size works; the budget must hold
    the longest prompt (vLLM refuses less than max_model_len).
    """
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_model_len, CPU_BATCHED_TOKENS)}


def resolve_sleep_mode(setting, colocated: bool, on_gpu: bool) -> bool:
    """``rollout.sleep_mode``: auto sleeps when the rollout shares a GPU with the learner."""
    if setting == "auto":
        return colocated and on_gpu
    if setting and not on_gpu:
        raise ValueError("rollout.sleep_mode=true needs vLLM on a GPU (this platform has no sleep "
                         "mode); set rollout.sleep_mode=auto or false")
    return bool(setting)


# vLLM's gpu_worker.sleep asserts this when the device's free memory shrank across the sleep.
_SLEEP_MEMORY_ASSERTION = "Memory usage increased after sleeping"


def explain_sleep_failure(error: BaseException) -> RuntimeError | None:
    """The one-line error for vLLM's sleep assertion, or None for any other error.

    vLLM measures the free memory of the whole device before and after sleeping, so another
    process allocating on the same GPU in between trips its assertion. The error is raised,
    never ignored: after the assertion vLLM's own sleeping state may be wrong.
    """
    if isinstance(error, AssertionError) and _SLEEP_MEMORY_ASSERTION in str(error):
        return RuntimeError("vLLM sleep failed: the GPU's used memory grew while the engine slept, so several "
                            "processes share this GPU: set rollout.sleep_mode=false (sleep mode assumes one "
                            "engine per GPU)")
    return None


# vLLM's kv_cache_utils raises this (a ValueError) when start-up left no memory for the KV cache.
_NO_KV_CACHE_MEMORY = "No available memory for the cache blocks"


def explain_kv_cache_failure(error: BaseException) -> RuntimeError | None:
    """The one-line error for vLLM finding no memory for its KV cache, or None for any other error.

    vLLM sizes its KV cache from the device's memory as measured during start-up, so with
    several engines on one GPU another process holding or allocating memory meanwhile leaves
    this one nothing, even at a gpu_memory_utilization that fits when the engines start alone.
    """
    if _NO_KV_CACHE_MEMORY in str(error):
        return RuntimeError("vLLM found no memory for its KV cache: it measures the GPU's memory during "
                            "start-up, and another process on the same GPU may have been holding or allocating "
                            "memory meanwhile; set rollout.gpu_kv_cache_gb (a fixed cache, no measuring), start the runs one "
                            "after another, or give each its own GPU")
    return None


@contextlib.contextmanager
def explained_errors(explain):
    """Raise ``explain(error)`` in place of an error it recognises (chained to it); others pass."""
    try:
        yield
    except Exception as error:
        explained = explain(error)
        if explained is None:
            raise
        raise explained from error


def async_scheduling_args(setting, engine_fields: set[str] | None = None) -> dict:
    """``rollout.async_scheduling`` as vLLM keyword arguments: auto leaves vLLM's default;
    true/false are passed where this vLLM's EngineArgs has the field (a false elsewhere is
    what that vLLM does anyway; a true is refused in one line)."""
    if setting == "auto":
        return {}
    if engine_fields is None:
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs

        engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    if "async_scheduling" not in engine_fields:
        if setting:
            raise ValueError("rollout.async_scheduling=true: this vLLM has no async scheduling; "
                             "set rollout.async_scheduling=auto or false")
        return {}
    return {"async_scheduling": bool(setting)}


def graph_options(enable_lora: bool, max_batch: int) -> dict:
    """CUDA-graph options, each where this vLLM has the field: graphs specialised on LoRA
    (with and without an active adapter), captured up to ``max_batch`` sequences (0: default)."""
    import dataclasses

    from vllm.config import CompilationConfig

    fields = {f.name for f in dataclasses.fields(CompilationConfig)}
    options = {}
    if enable_lora and "cudagraph_specialize_lora" in fields:
        options["cudagraph_specialize_lora"] = True
    if max_batch and "max_cudagraph_capture_size" in fields:
        options["max_cudagraph_capture_size"] = max_batch
    return {"compilation_config": options} if options else {}


def kv_cache_args(rollout_cfg, on_cpu: bool) -> dict:
    """A fixed KV cache size where one is configured: always on CPU (unless vLLM's own
    VLLM_CPU_KVCACHE_SPACE is set), on a GPU only with rollout.gpu_kv_cache_gb > 0; otherwise
    vLLM sizes it from gpu_memory_utilization."""
    if on_cpu:
        gb = 0 if os.environ.get("VLLM_CPU_KVCACHE_SPACE") else rollout_cfg.cpu_kv_cache_gb
    else:
        gb = getattr(rollout_cfg, "gpu_kv_cache_gb", 0)
    return {"kv_cache_memory_bytes": int(gb * 2**30)} if gb else {}


def use_in_process_engine() -> None:
    """Run vLLM's engine core in this process (unless the environment says otherwise): a fast
    start, and no child processes left behind when a rollout actor dies. Set before vLLM starts."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
