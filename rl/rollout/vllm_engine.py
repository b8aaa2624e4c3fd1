"""The vLLM rollout engine: an in-process vLLM that serves the current adapter version.

vLLM runs in the calling process (no engine-core subprocess, ``uni`` executor), which
inside a Ray actor gives a start of seconds and nothing left behind when the actor
dies. Adapters are served through vLLM's LoRA support, never by merging them into
the base weights:

- a version with the same modules and ranks as the one served (every version after the
  first of a run) is written into the served id's slot in place, and the prefix cache is
  reset (:mod:`rl.rollout.vllm_inplace`; ``rollout.inplace_sync``): after vLLM's own
  re-activation has served one such version, straight through a verified map of the slots
  (:mod:`rl.rollout.vllm_slots`; ``rollout.inplace_direct``);
- any other version (the first, a new structure, or an in-place update that vLLM's
  internals decline) is written to a fresh temporary folder (under ``/dev/shm`` where it
  exists), registered with ``add_lora`` under a NEW ``lora_int_id`` (vLLM caches adapters
  by id, so re-adding an id would serve the old weights), and the previous id is removed;
- the folder is deleted as soon as vLLM has loaded it, so a killed actor leaks nothing;
- ranks are checked against ``rollout.max_lora_rank`` before anything is submitted,
  because an over-rank adapter hangs an in-process vLLM instead of raising;
- per-module PEFT scales are folded into B (see :mod:`rl.rollout.sync`).

``generate_stream`` hands out prompts' groups as they finish (``trainer.stream_groups``), so
the learner can start on them while the longest samples still decode; ``generate`` is the
same loop, collected.

Logprobs are vLLM's ``processed_logprobs``: the distribution after temperature and
top-p, which is what :mod:`rl.rollout.engine` promises. vLLM neither detokenizes nor builds
a logprob dict per token while decoding; texts are decoded once per call after it
(:mod:`rl.rollout.vllm_outputs`).

On a GPU the engine runs with CUDA graphs (``rollout.enforce_eager: auto``), specialised
on LoRA where the installed vLLM has ``cudagraph_specialize_lora``, and in bfloat16 (its
LoRA kernels refuse float32). With sleep mode (``rollout.sleep_mode``) the engine drops its KV
cache and offloads its weights (or keeps them on the GPU, ``rollout.sleep_weights``) while the
learner steps, and wakes on the next sync or generate, serving the same adapter. Offloading,
sleep mode assumes one engine per GPU: vLLM checks that the whole device's free memory grew
across the sleep, so another process allocating on the same GPU meanwhile fails the step (see
:func:`explain_sleep_failure`). vLLM also sizes
its KV cache from the device's memory measured at start-up, so engines starting together on
one GPU can leave one of them none unless ``rollout.gpu_kv_cache_gb`` fixes its size (see
:func:`explain_kv_cache_failure`). On CPU a prompt's prefill is never split over engine steps
(:func:`whole_prefill_args`): vLLM cannot rewind a per-request CPU generator after a partial
prefill. Those settings and errors are pure functions in rl/rollout/vllm_settings.py.

Left out: prefix caching tuning, speculative decoding, multi-GPU tensor parallelism
(one worker is one engine on one device; scale out with more workers).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from rl.rollout.engine import Completion, SamplingSpec, batch_seed, check_prompts, prompt_seed
from rl.rollout.kv_sleep import kv_sleep_unsupported, release_kv_cache, restore_kv_cache
from rl.rollout.vllm_outputs import completion_rows, lean_output_options
from rl.rollout.sync import AdapterPayload, check_ranks, check_servable, fold_scales_for_vllm, write_peft_adapter
from rl.rollout.vllm_inplace import adapter_signature, update_served_adapter
from rl.rollout.vllm_settings import (adapter_root, async_scheduling_args, check_vllm_dtype, explain_kv_cache_failure,
                                      explain_sleep_failure, explained_errors, graph_options, kv_cache_args,
                                      resolve_enforce_eager, resolve_seed_mode, resolve_sleep_mode, served_rank_cap,
                                      use_in_process_engine, whole_prefill_args)

log = logging.getLogger(__name__)


class StageClock:
    """Seconds per stage of one adapter load, each since the previous stage: ``clock("check")``
    records ``timings["check_s"]``. ``wait_for_gpu``: each stage first waits for the GPU work it
    queued, so that the work is charged to it and not to the next."""

    def __init__(self, wait_for_gpu: bool = False):
        self.timings: dict[str, float] = {}
        self.wait_for_gpu = wait_for_gpu
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.wait_for_gpu:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[f"{name}_s"], self._t = now - self._t, now


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
        extra = {} if eager else graph_options(enable_lora=bool(self._lora_args(rollout_cfg)),
                                                  max_batch=rollout_cfg.cudagraph_max_batch)
        if current_platform.is_cpu():
            # Whatever the seed mode: the bench and tests switch an engine's seed_mode in place.
            extra.update(whole_prefill_args(rollout_cfg.max_model_len))
        extra.update(kv_cache_args(rollout_cfg, on_cpu=current_platform.is_cpu()))
        if self.sleeps:
            extra["enable_sleep_mode"] = True
        self.keeps_weights = self.sleeps and getattr(rollout_cfg, "sleep_weights", "offload") == "keep"
        if self.keeps_weights and (why := kv_sleep_unsupported()):
            raise ValueError(f"rollout.sleep_weights=keep: {why}; set rollout.sleep_weights=offload")
        if getattr(rollout_cfg, "max_num_seqs", 0):
            extra["max_num_seqs"] = rollout_cfg.max_num_seqs
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
        # rollout.inplace_direct: in place, write through a verified map of the slots.
        self.inplace_direct = bool(getattr(rollout_cfg, "inplace_direct", True))
        self._version: int | None = None
        self.last_call_s: dict[str, float] = {}  # the last generate's seconds: vLLM's call, then the rows
        self._next_id = 1
        self._asleep = False

    # ------------------------------------------------------------------ sleep mode

    def sleep(self) -> bool:
        """Drop the KV cache and offload the weights (adapter slots included) to host memory,
        or with ``rollout.sleep_weights: keep`` leave them on the GPU (rl/rollout/kv_sleep.py)."""
        if not self.sleeps or self._asleep:
            return self._asleep
        if self.keeps_weights:
            self.llm.reset_prefix_cache()  # the cached blocks' contents are about to go
            self.llm.collective_rpc(release_kv_cache)
        else:
            with explained_errors(explain_sleep_failure):
                self.llm.sleep(level=1)
        self._asleep = True
        return True

    def wake_up(self) -> None:
        # The served adapter's slots live among the weights and come back with them (or never
        # left); the prefix cache was cleared by sleep (its KV blocks are gone).
        if self._asleep:
            if self.keeps_weights:
                self.llm.collective_rpc(restore_kv_cache)
            else:
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
        rows: list = [None] * len(prompt_ids)
        # One part, the whole call; generate_stream leaves its seconds in last_call_s.
        for positions, groups, _ in self.generate_stream(prompt_ids, sampling, max(len(prompt_ids), 1)):
            for i, group in zip(positions, groups):
                rows[i] = group
        return rows

    def generate_stream(self, prompt_ids: list[list[int]], sampling: SamplingSpec, groups_per_part: int):
        """Yield ``(positions, groups, call_s)`` as prompts finish: ``positions`` index
        ``prompt_ids``, ``groups`` are their ``[n]`` completions, ``groups_per_part`` of them at a
        time (fewer in the last part), and ``call_s`` the engine's seconds so far in this
        call: ``generate_s`` stepping vLLM, ``rows_s`` building rows from its outputs.

        vLLM's own loop (``LLM.generate``), with the finished requests handed out as they come:
        a request with n samples finishes when its last sample does, so a part holds whole
        groups. A caller that stops early leaves no request behind (they are aborted)."""
        sampling.validate()
        check_prompts(prompt_ids, self.max_model_len, sampling.max_new_tokens)
        self.last_call_s = {"generate_s": 0.0, "rows_s": 0.0}
        if not prompt_ids:
            return
        self.wake_up()
        params = [self._params(sampling, i) for i in range(len(prompt_ids))]
        if sampling.seed is not None and self.seed_mode == "batch":
            import numpy as np
            import torch

            call_seed = batch_seed(sampling.seed, sampling.prompt_offset)
            # The CPU model runner samples from torch's default generator. vLLM's GPU model runner
            # (its V2 runner) gives each request without a seed one drawn from numpy's global
            # generator when the request joins the batch, and samples from that: seeding only
            # torch left a GPU call's samples to whatever numpy had drawn before.
            torch.manual_seed(call_seed)
            np.random.seed(call_seed % 2**32)
        call_s, t = dict(self.last_call_s), time.perf_counter()
        ids = self.llm.enqueue([{"prompt_token_ids": list(p)} for p in prompt_ids], params,
                               lora_request=self._lora, use_tqdm=False)
        # enqueue returns vLLM's internal ids (the caller's id and a random suffix); outputs carry the caller's.
        position = {**{rid.rsplit("-", 1)[0]: i for i, rid in enumerate(ids)}, **{rid: i for i, rid in enumerate(ids)}}
        engine, finished, left = self.llm.llm_engine, [], len(ids)
        try:
            while left:
                done = [o for o in engine.step() if o.finished]
                finished += done
                left -= len(done)
                # Parts of exactly groups_per_part (the learner's micro-batches stay full), the rest last.
                while finished and (len(finished) >= groups_per_part or not left):
                    part, finished = finished[:groups_per_part], finished[groups_per_part:]
                    t1 = time.perf_counter()
                    positions = [position[o.request_id] for o in part]
                    rows = completion_rows(self._tokenizer, [prompt_ids[i] for i in positions], part,
                                           decoded=self._output_options.get("detokenize", True))
                    call_s["generate_s"] += t1 - t
                    call_s["rows_s"] += time.perf_counter() - t1
                    self.last_call_s = dict(call_s)
                    # vLLM refuses n > 1 for greedy; the n greedy completions are one completion, repeated.
                    groups = [row * sampling.n if len(row) == 1 < sampling.n else row for row in rows]
                    yield positions, groups, dict(call_s)
                    t = time.perf_counter()
        finally:
            if left:
                engine.abort_request(list(ids), internal=True)

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, payload: AdapterPayload) -> dict:
        """Serve ``payload`` from now on; returns seconds per stage (check, wake, fold, then
        ``inplace_direct`` or ``inplace`` with its parts, ``rl.rollout.vllm_inplace.PARTS``, or
        write, add_lora, remove) and ``sync_path`` ("inplace", whichever of the two in-place
        stages ran, or "add_lora") for the sync's timing report."""
        stage = StageClock()
        timings = stage.timings
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
            declined, path, parts = update_served_adapter(self.llm, self._lora.lora_int_id, tensors, config,
                                                          direct=self.inplace_direct)
            if declined is None:
                self._version = payload.version
                stage(path)  # inplace_direct (the verified slot map) or inplace (vLLM's re-activation)
                timings.update({f"{part}_s": seconds for part, seconds in parts.items()})  # its parts
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
        folder = tempfile.mkdtemp(prefix=f"placerl-lora-v{version}-", dir=adapter_root())
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

