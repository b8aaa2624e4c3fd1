"""The ``rollout`` section of the config (rl/config.py): the engine, sampling, and how vLLM is
built and served. Its own file because most of its options are about vLLM, whose settings are
resolved for the host in rl/rollout/vllm_settings.py; rl.config re-exports it."""
from __future__ import annotations

from dataclasses import dataclass

from rl.typed_yaml import check as _check, one_of as _one_of


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm | hf (plain transformers, for hosts without vLLM)
    num_workers: int = 1
    prompts_per_step: int = 8
    group_size: int = 4  # completions per prompt (GRPO's G)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    max_lora_rank: int = 64  # vLLM's cap; every adapter rank is checked against it
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.4
    cpu_kv_cache_gb: float = 1.0  # vLLM's KV cache on CPU hosts
    # A fixed KV cache on a GPU (GiB); 0: vLLM sizes it from gpu_memory_utilization by measuring
    # the GPU while it starts, which fails when other processes allocate meanwhile. Fixed, several
    # runs can start on one GPU at once (gpu_memory_utilization then only gates the start).
    gpu_kv_cache_gb: float = 0.0
    # auto: eager on CPU, CUDA graphs on a GPU (launch-bound decoding is 3-5x faster with
    # graphs); true/false force it.
    enforce_eager: bool | str = "auto"
    # The largest decode batch (sequences per engine) that runs as a CUDA graph; larger ones run
    # without. 0: vLLM's default (512 on vLLM 0.26-0.32); raise it for bigger rollouts per worker.
    cudagraph_max_batch: int = 0
    # Sequences vLLM decodes at once (a request's n samples count n); 0: vLLM's default.
    max_num_seqs: int = 0
    # vLLM's sleep mode frees the KV cache and offloads the weights while the learner steps.
    # auto: on when rollout workers share GPUs with learner ranks (cluster.colocate) on a
    # GPU host; true/false force it (true needs a GPU).
    sleep_mode: bool | str = "auto"
    # What a sleeping engine does with its weights: "offload" (vLLM's sleep level 1: copied to
    # host memory and back on every wake) or "keep" (they stay on the GPU and only the KV cache
    # is freed: no copy either way, for the engine's weights pool of the learner's memory, about
    # 2 GiB per engine for Qwen2.5-Coder-0.5B in bf16, reports/gpu/README.md 22).
    # rl/rollout/kv_sleep.py
    sleep_weights: str = "offload"
    dtype: str = "auto"  # auto: bfloat16 on a GPU, else the learner's model.dtype
    eval_max_new_tokens: int = 256
    # How a vLLM worker serves each adapter version: "adapter" (vLLM's LoRA kernels),
    # "merged" (folded into a copy of the base weights and written into the engine: 3-4x
    # faster decoding on CPU, no LoRA kernels on a GPU; bf16 rounds small updates away),
    # "auto" (merged on CPU hosts, adapter on GPUs). rl/rollout/merged.py
    weight_sync: str = "auto"
    # How an adapter version reaches the workers: "object_store" (Ray's, through host memory),
    # "cuda_ipc" (left on the learner's GPU, handed to workers that share it; merged weights,
    # trainer.max_staleness=0), "auto" (cuda_ipc wherever it can run). rl/rollout/device_handoff.py
    weight_transfer: str = "auto"
    # weight_sync=adapter: a version with the same modules and ranks as the served one (every
    # version after a run's first) is written into vLLM's LoRA slot in place, skipping the PEFT
    # folder, add_lora and remove_lora (rl/rollout/vllm_inplace.py); other versions, and any
    # update vLLM's internals decline, go through add_lora. false: add_lora for every version.
    inplace_sync: bool = True
    # inplace_sync: once vLLM's own re-activation has written one such version, later ones are
    # copied straight into the slot regions through a map of them that was read back and verified
    # bitwise (rl/rollout/vllm_slots.py), skipping vLLM's rebuild, pinning and re-activation of
    # the whole adapter; anything unexpected keeps vLLM's path. false: vLLM's path every version.
    inplace_direct: bool = True
    # How a vLLM worker seeds a step: "request" (a seed per sequence: the same samples
    # whatever the batching), "batch" (one reseed of the engine per call: reproducible for
    # the same batch), "auto" (request on CPU hosts, batch on GPUs). Why and what each costs:
    # rl/rollout/vllm_settings.py resolve_seed_mode.
    seed_mode: str = "auto"
    # vLLM's async scheduling (the next step is scheduled while the current one runs on the
    # device): auto leaves vLLM's default; true/false set it (true needs a vLLM that has it).
    async_scheduling: bool | str = "auto"

    def validate(self, p: str) -> None:
        _one_of(f"{p}.engine", self.engine, ["vllm", "hf"])
        _check(self.num_workers >= 1, f"{p}.num_workers", self.num_workers, "must be >= 1")
        _check(self.prompts_per_step >= 1, f"{p}.prompts_per_step", self.prompts_per_step, "must be >= 1")
        _check(self.group_size >= 2, f"{p}.group_size", self.group_size,
               "must be >= 2 (a group of one has no relative advantage)")
        _check(self.max_new_tokens >= 1, f"{p}.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.temperature > 0, f"{p}.temperature", self.temperature, "must be > 0")
        _check(0 < self.top_p <= 1, f"{p}.top_p", self.top_p, "must be in (0, 1]")
        _check(self.max_lora_rank >= 1, f"{p}.max_lora_rank", self.max_lora_rank, "must be >= 1")
        _check(0 < self.gpu_memory_utilization <= 1, f"{p}.gpu_memory_utilization",
               self.gpu_memory_utilization, "must be in (0, 1]")
        _check(self.gpu_kv_cache_gb >= 0, f"{p}.gpu_kv_cache_gb", self.gpu_kv_cache_gb,
               "must be >= 0 (0: sized from gpu_memory_utilization)")
        _one_of(f"{p}.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        _check(self.cudagraph_max_batch >= 0, f"{p}.cudagraph_max_batch", self.cudagraph_max_batch,
               "must be >= 0 (0: vLLM's default)")
        _check(self.max_num_seqs >= 0, f"{p}.max_num_seqs", self.max_num_seqs, "must be >= 0 (0: vLLM's default)")
        for key in ("inplace_sync", "inplace_direct"):
            _check(isinstance(getattr(self, key), bool), f"{p}.{key}", getattr(self, key), "true or false")
        for key in ("enforce_eager", "sleep_mode", "async_scheduling"):
            value = getattr(self, key)
            _check(isinstance(value, bool) or value == "auto", f"{p}.{key}", value, "auto, true or false")
        _one_of(f"{p}.weight_sync", self.weight_sync, ["auto", "adapter", "merged"])
        _one_of(f"{p}.weight_transfer", self.weight_transfer, ["auto", "object_store", "cuda_ipc"])
        _one_of(f"{p}.seed_mode", self.seed_mode, ["auto", "request", "batch"])
        _one_of(f"{p}.sleep_weights", self.sleep_weights, ["offload", "keep"])
