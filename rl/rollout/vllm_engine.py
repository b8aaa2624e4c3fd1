"""The vLLM rollout engine: an in-process vLLM that serves the current adapter version.

vLLM runs in the calling process (no engine-core subprocess, ``uni`` executor), which
inside a Ray actor gives a start of seconds and nothing left behind when the actor
dies. Adapters are served through vLLM's LoRA support, never by merging them into
the base weights:

- a version with the same modules and ranks as the one served (every version after the
  first of a run) is written into the served id's slot in place, and the prefix cache is
  reset (:mod:`rl.rollout.vllm_inplace`; ``rollout.inplace_sync``);
- any other version (the first, a new structure, or an in-place update that vLLM's
  internals decline) is written to a fresh temporary folder (under ``/dev/shm`` where it
  exists), registered with ``add_lora`` under a NEW ``lora_int_id`` (vLLM caches adapters
  by id, so re-adding an id would serve the old weights), and the previous id is removed;
- the folder is deleted as soon as vLLM has loaded it, so a killed actor leaks nothing;
- ranks are checked against ``rollout.max_lora_rank`` before anything is submitted,
  because an over-rank adapter hangs an in-process vLLM instead of raising;
- per-module PEFT scales are folded into B (see :mod:`rl.rollout.sync`).

Logprobs are vLLM's ``processed_logprobs``: the distribution after temperature and
top-p, which is what :mod:`rl.rollout.engine` promises. vLLM neither detokenizes nor builds
a logprob dict per token while decoding; texts are decoded once per call after it
(:mod:`rl.rollout.vllm_outputs`).

On a GPU the engine runs with CUDA graphs (``rollout.enforce_eager: auto``), specialised
on LoRA where the installed vLLM has ``cudagraph_specialize_lora``, and in bfloat16 (its
LoRA kernels refuse float32). With sleep mode (``rollout.sleep_mode``) the engine offloads
its weights and drops its KV cache while the learner steps, and wakes on the next sync or
generate, serving the same adapter. Sleep mode assumes one engine per GPU: vLLM checks
that the whole device's free memory grew across the sleep, so another process allocating
on the same GPU meanwhile fails the step (see :func:`explain_sleep_failure`). vLLM also sizes
its KV cache from the device's memory measured at start-up, so engines starting together on
one GPU can leave one of them none (see :func:`explain_kv_cache_failure`).

On CPU a prompt's prefill is never split over engine steps (:func:`whole_prefill_args`):
vLLM cannot rewind a per-request CPU generator after a partial prefill.

Left out: prefix caching tuning, speculative decoding, multi-GPU tensor parallelism
(one worker is one engine on one device; scale out with more workers).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time

from rl.rollout.engine import Completion, SamplingSpec, batch_seed, check_prompts, prompt_seed
from rl.rollout.vllm_outputs import completion_rows, lean_output_options
from rl.rollout.sync import AdapterPayload, check_ranks, check_servable, fold_scales_for_vllm, write_peft_adapter
from rl.rollout.vllm_inplace import adapter_signature, update_served_adapter

log = logging.getLogger(__name__)

# The ranks vLLM accepts for max_lora_rank.
VLLM_RANK_CAPS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def served_rank_cap(max_lora_rank: int) -> int:
    """The smallest rank cap vLLM accepts that is at least ``rollout.max_lora_rank``."""
    for cap in VLLM_RANK_CAPS:
        if cap >= max_lora_rank:
            return cap
    raise ValueError(f"rollout.max_lora_rank={max_lora_rank} exceeds vLLM's largest LoRA rank "
                     f"{VLLM_RANK_CAPS[-1]}; lower it or use rollout.engine=hf")


def _adapter_root() -> str | None:
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

    vLLM samples a seeded request with its own generator, in a Python loop over the batch's
    seeded sequences (one small kernel each, every decode step). "batch" reseeds the engine's
    default generator instead, which only reaches the sampler when the engine runs in this
    process. On an H200 the two measured alike so far (64 x 8: 18.1k and 18.3k tokens/s in two
    sessions; 128 x 8: 27.2k request, 24.7k batch in one run, reports/gpu/README.md 6.1).
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


def _graph_options(enable_lora: bool, max_batch: int) -> dict:
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


class VLLMEngine:
    def __init__(self, rollout_cfg, model_path: str, dtype: str, seed: int):
        use_in_process_engine()
        from vllm import LLM
        from vllm.platforms import current_platform

        on_gpu = current_platform.is_cuda_alike()
        check_vllm_dtype(dtype, on_gpu)
        # The trainer resolves "auto" (it knows the placement); an engine built alone shares no GPU.
        self.sleeps = resolve_sleep_mode(rollout_cfg.sleep_mode, False, on_gpu)
        if self.sleeps and not current_platform.is_sleep_mode_available():
            raise ValueError(f"rollout.sleep_mode=true: vLLM has no sleep mode on {current_platform.device_type}; "
                             "set rollout.sleep_mode=false")
        eager = resolve_enforce_eager(rollout_cfg.enforce_eager, on_gpu)
        extra = {} if eager else _graph_options(enable_lora=True, max_batch=rollout_cfg.cudagraph_max_batch)
        if current_platform.is_cpu():
            # Whatever the seed mode: the bench and tests switch an engine's seed_mode in place.
            extra.update(whole_prefill_args(rollout_cfg.max_model_len))
        extra.update(kv_cache_args(rollout_cfg, on_cpu=current_platform.is_cpu()))
        if self.sleeps:
            extra["enable_sleep_mode"] = True
        extra.update(async_scheduling_args(getattr(rollout_cfg, "async_scheduling", "auto")))
        self.seed_mode = resolve_seed_mode(getattr(rollout_cfg, "seed_mode", "auto"), on_gpu,
                                           os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0")
        self.max_lora_rank = rollout_cfg.max_lora_rank
        self.max_model_len = rollout_cfg.max_model_len
        with explained_errors(explain_kv_cache_failure):
            self.llm = LLM(
                model=model_path,
                dtype=dtype,
                seed=seed,
                max_model_len=rollout_cfg.max_model_len,
                gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                enforce_eager=eager,
                logprobs_mode="processed_logprobs",
                distributed_executor_backend="uni",
                disable_log_stats=True,
                **self._lora_args(rollout_cfg),
                **extra,
            )
        self._output_options = lean_output_options()
        self._tokenizer = self.llm.get_tokenizer()
        self._lora = None  # the LoRARequest being served
        self._signature = None  # adapter_signature of the version that add_lora registered
        # rollout.inplace_sync: later versions of the same structure are written into the slot.
        self.inplace_sync = bool(getattr(rollout_cfg, "inplace_sync", True))
        self.inplace_declined: str | None = None  # why the last in-place attempt fell back
        self._version: int | None = None
        self._next_id = 1
        self._asleep = False

    # ------------------------------------------------------------------ sleep mode

    def sleep(self) -> bool:
        """Offload the weights (adapter slots included) to host memory and drop the KV cache."""
        if not self.sleeps or self._asleep:
            return self._asleep
        with explained_errors(explain_sleep_failure):
            self.llm.sleep(level=1)
        self._asleep = True
        return True

    def wake_up(self) -> None:
        # The served adapter's slots live among the weights and come back with them; the
        # prefix cache was cleared by sleep (its KV blocks are gone).
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _lora_args(self, rollout_cfg) -> dict:
        # One adapter serves all requests; room for two so the next version is loaded
        # before the previous one is dropped. (rl/rollout/merged.py serves without LoRA.)
        return {"enable_lora": True, "max_lora_rank": served_rank_cap(rollout_cfg.max_lora_rank),
                "max_loras": 1, "max_cpu_loras": 2}

    # ------------------------------------------------------------------ generation

    def _params(self, spec: SamplingSpec, prompt_index: int):
        from vllm import SamplingParams

        # vLLM gives child i of a request seed+i; prompt_seed spaces prompts by n.
        seed = None
        if spec.seed is not None and self.seed_mode == "request":
            seed = prompt_seed(spec.seed, spec.prompt_offset + prompt_index, spec.n)
        return SamplingParams(n=1 if spec.temperature == 0 else spec.n, max_tokens=spec.max_new_tokens,
                              temperature=spec.temperature, top_p=spec.top_p, seed=seed, logprobs=0,
                              **self._output_options)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        sampling.validate()
        check_prompts(prompt_ids, self.max_model_len, sampling.max_new_tokens)
        if not prompt_ids:
            return []
        self.wake_up()
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        params = [self._params(sampling, i) for i in range(len(prompt_ids))]
        if sampling.seed is not None and self.seed_mode == "batch":
            import torch

            torch.manual_seed(batch_seed(sampling.seed, sampling.prompt_offset))
        outs = self.llm.generate(prompts, params, lora_request=self._lora, use_tqdm=False)
        rows = completion_rows(self._tokenizer, prompt_ids, outs,
                               decoded=self._output_options.get("detokenize", True))
        # vLLM refuses n > 1 for greedy; the n greedy completions are one completion, repeated.
        return [row * sampling.n if len(row) == 1 < sampling.n else row for row in rows]

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, payload: AdapterPayload) -> dict:
        """Serve ``payload`` from now on; returns seconds per stage (check, wake, fold, then
        ``inplace`` or write, add_lora, remove) and ``sync_path`` ("inplace" or "add_lora")
        for the sync's timing report."""
        timings, t = {}, time.perf_counter()

        def stage(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[f"{name}_s"], t = now - t, now

        check_servable(payload.peft_config)
        check_ranks(payload.peft_config, self.max_lora_rank, payload.tensors)
        stage("check")
        self.wake_up()  # adapter slots are unmapped while asleep
        stage("wake")
        # A payload from the learner arrives folded (rl/rollout/sync.py make_payload).
        tensors, config = ((payload.tensors, payload.peft_config) if payload.folded
                           else fold_scales_for_vllm(payload.tensors, payload.peft_config))
        stage("fold")
        signature = adapter_signature(tensors, config)
        if self.inplace_sync and self._lora is not None and signature == self._signature:
            declined = update_served_adapter(self.llm, self._lora.lora_int_id, tensors, config)
            if declined is None:
                self._version = payload.version
                stage("inplace")
                return dict(timings, sync_path="inplace")
            # Not as expected once, not as expected every step: the rest go through add_lora.
            log.warning("in-place adapter update declined (%s); serving every version with add_lora from now on",
                        declined)
            self.inplace_declined, self.inplace_sync = declined, False
            stage("inplace_declined")
        self._add_lora(payload.version, tensors, config, stage)
        self._signature = signature
        return dict(timings, sync_path="add_lora")

    def _add_lora(self, version: int, tensors: dict, config: dict, stage) -> None:
        """Register the adapter under a new id from a PEFT folder, then drop the previous id."""
        from vllm.lora.request import LoRARequest

        lora_id = self._next_id
        self._next_id += 1
        folder = tempfile.mkdtemp(prefix=f"placerl-lora-v{version}-", dir=_adapter_root())
        try:
            write_peft_adapter(AdapterPayload(version, tensors, config), folder)
            stage("write")
            request = LoRARequest(lora_name=f"v{version}-id{lora_id}", lora_int_id=lora_id, lora_path=folder)
            # Loads now, so that a broken adapter fails here and not in the middle of a rollout.
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not register adapter version {version}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        stage("add_lora")
        previous, self._lora, self._version = self._lora, request, version
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        stage("remove")

    def adapter_version(self) -> int | None:
        return self._version

    def loaded_lora_ids(self) -> set[int]:
        return set(self.llm.llm_engine.list_loras())

