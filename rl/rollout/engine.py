"""The rollout engine interface: sampling settings and seeds, completions, the engine protocol and factory.

Two engines sit behind :class:`RolloutEngine` and pass the same tests:

- ``vllm`` (:mod:`rl.rollout.vllm_engine`): an in-process vLLM engine inside the actor,
  adapters served by version through vLLM's LoRA support;
- ``hf`` (:mod:`rl.rollout.hf_engine`): plain transformers batched sampling with a KV cache,
  for hosts without vLLM; the adapter is applied with PEFT.

What ``Completion.logprobs`` means (both engines agree, the learner relies on it):
the log-probability of each generated token under the distribution it was sampled
from, i.e. ``log_softmax(logits / temperature)``, renormalised over the top-p nucleus
when ``top_p < 1``. Greedy decoding (``temperature == 0``) reports
``log_softmax(logits)``. A learner that computes ``log_softmax(logits / T)`` on the
same tokens therefore reproduces them exactly when ``top_p == 1``. The generated
stop token (eos) is part of ``token_ids`` and has a logprob: it is an action too.

The Ray actor that hosts an engine is :mod:`rl.rollout.worker`.

Left out: streaming, per-request adapters (one adapter version serves every request
of a worker), stop strings (stopping is on the model's eos token ids only).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Protocol

from rl.rollout.sync import AdapterPayload


@dataclass
class SamplingSpec:
    n: int = 1  # completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # None: the engine's own seeded stream
    # The place of this call's first prompt among all the prompts of the step: a pool that
    # spreads a step over workers gives each its offset, so no two prompts share a stream.
    prompt_offset: int = 0

    def validate(self) -> "SamplingSpec":
        if self.n < 1:
            raise ValueError(f"sampling.n={self.n} must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0 (0 is greedy)")
        if 0 < self.temperature < 1e-5:  # vLLM silently turns these greedy; say so instead
            raise ValueError(f"sampling.temperature={self.temperature} is below 1e-5; use 0 for greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        return self


def step_seed(run_seed: int, step: int) -> int:
    """The sampling seed of one step of a run (``trainer.seed``, step number)."""
    return _mix(f"step:{run_seed}:{step}", 1 << 62)


def prompt_seed(seed: int, prompt_index: int, n: int) -> int:
    """The first of the ``n`` consecutive seeds of one prompt's samples.

    vLLM gives sample j of a request ``seed + j``, so each prompt owns the range
    ``[k * n, k * n + n)`` for a key ``k`` hashed from (step seed, prompt index): distinct
    prompts of any step get disjoint ranges unless two 60-bit keys collide. A plain
    ``seed + index * n`` overlapped step s+1 with step s (its seed is one higher).
    """
    return _mix(f"prompt:{seed}:{prompt_index}", (1 << 62) // max(1, n)) * max(1, n)


def batch_seed(seed: int, prompt_offset: int) -> int:
    """The generator seed of one engine call (``rollout.seed_mode: batch``): distinct across
    steps (``seed`` is the step's) and across the workers of a step (their prompt offsets)."""
    return _mix(f"batch:{seed}:{prompt_offset}", 1 << 62)


def _mix(text: str, modulus: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % modulus


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens only, the stop token included when it was generated
    logprobs: list[float]  # one per token; see the module docstring for which distribution
    text: str  # decoded without special tokens
    finish_reason: str  # "stop" (an eos token) | "length" (max_new_tokens reached)
    # The adapter version that generated it, set by the rollout worker (0: the initial adapter,
    # which is the base model); the driver measures a batch's staleness with it.
    adapter_version: int = 0


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """``[prompt][n]`` completions for token-id prompts."""

    def load_adapter(self, payload: AdapterPayload) -> None:
        """Serve this adapter version from the next ``generate`` on."""

    def adapter_version(self) -> int | None:
        """The version being served, None for the bare base model."""


def check_prompts(prompt_ids: list[list[int]], max_model_len: int, max_new_tokens: int) -> None:
    """One-line errors for prompts that no engine could serve."""
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(p) + max_new_tokens > max_model_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, which with max_new_tokens={max_new_tokens} exceeds "
                f"rollout.max_model_len={max_model_len}; raise max_model_len or shorten the prompt")


def make_engine(rollout_cfg, model_path: str, dtype: str, seed: int) -> RolloutEngine:
    """The engine named by ``rollout_cfg.engine`` (``rl.config.RolloutConfig``)."""
    if rollout_cfg.engine == "vllm":
        from rl.rollout.merged import MergedVLLMEngine, merges_weights
        from rl.rollout.vllm_engine import VLLMEngine

        cls = MergedVLLMEngine if merges_weights(rollout_cfg) else VLLMEngine
        return cls(rollout_cfg, model_path, dtype, seed)
    if rollout_cfg.engine == "hf":
        from rl.rollout.hf_engine import HFEngine

        return HFEngine(rollout_cfg, model_path, dtype, seed)
    raise ValueError(f"rollout.engine={rollout_cfg.engine!r} is not known; choose vllm or hf")


def payload_dtype(rollout_cfg, dtype: str) -> str | None:
    """The dtype the learner casts the adapter to, folded for vLLM's LoRA kernels, before it
    travels; None where the engine takes the adapter as PEFT holds it (hf, merged weights)."""
    from rl.rollout.merged import merges_weights

    return dtype if rollout_cfg.engine == "vllm" and not merges_weights(rollout_cfg) else None


def rollout_dtype(cfg) -> str:
    """``rollout.dtype``, with auto = bfloat16 on a GPU and the model's dtype elsewhere."""
    if cfg.rollout.dtype != "auto":
        return cfg.rollout.dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else cfg.model.dtype


def served_config(rollout_cfg, adapter_rank: int):
    """``rollout_cfg`` serving adapters of at most ``adapter_rank``.

    vLLM computes every adapter padded to its max_lora_rank: rank-8 adapters under a cap
    of 64 made CPU rollouts 5x slower. ``rollout.max_lora_rank`` stays the upper bound, so
    an adapter above it still fails in one line when it is loaded.
    """
    return dataclasses.replace(rollout_cfg, max_lora_rank=min(adapter_rank, rollout_cfg.max_lora_rank))
