"""TRL's GRPOTrainer with colocated vLLM, set up as a placerl recipe is, with a per-step time breakdown.

Used by bench/bench_vllm_gpu.py (part ``step-trl``) to compare GRPO step time on one GPU.
Everything that both trainers share comes from the recipe: the model, the LoRA (rank,
alpha, target modules), the prompts (in the order placerl's sampler draws them, with
TRL's shuffling off), the group size, the completion length, the micro-batch, the
learning rate, clip-higher, activation checkpointing, the vLLM memory share and context length. TRL generates a
whole step's completions at once (micro-batch x accumulation = prompts x group) and
trains micro-batch by micro-batch, as placerl does. Its vLLM sleeps while it trains
(``vllm_enable_sleep_mode``, on a GPU) unless ``sleep=False``, TRL's own default.

The breakdown comes from TRL's own profiling timers (``trl.extras.profiling``): vLLM
generation, weight sync (TRL merges the adapter into the base weights and loads them
into vLLM), reward; the learner is the rest of the step (its logprob passes, forward,
backward and optimizer, and sleep/wake).
"""
from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict


def trl_vllm_steps(recipe: str, overrides: list[str], steps: int, sleep: bool = True) -> list[dict]:
    """One dict of seconds per optimizer step: step, rollout, reward, sync, learner."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOTrainer
    from trl.extras import profiling

    from bench.recipe_steps import REPO
    from rewards.gsm8k import gsm8k_flexible
    from rl.config import load_config
    from core.models import load_model, load_tokenizer, resolve_model

    cfg = load_config(REPO / recipe, overrides)
    pc = cfg.placement
    path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    tok = load_tokenizer(path)
    ds = recipe_dataset(cfg, tok, steps)

    timers: dict[str, float] = defaultdict(float)
    original = profiling.ProfilingContext._log_metrics

    def keep(self, duration):  # TRL's timers ("GRPOTrainer.<block>"), summed per block over the step
        timers[self.name.split(".", 1)[-1]] += duration
        return original(self, duration)

    profiling.ProfilingContext._log_metrics = keep
    out: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timers.clear()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step = time.perf_counter() - self.t
            rollout, sync = timers.get("vLLM.generate", 0.0), timers.get("sync_weights", 0.0)
            reward = timers.get("_calculate_rewards", 0.0)
            out.append({"step_s": round(step, 4), "rollout_s": round(rollout, 4), "reward_s": round(reward, 4),
                        "sync_s": round(sync, 4), "learner_s": round(step - rollout - sync - reward, 4),
                        "sync_over_step": round(sync / step, 5)})

    def gsm8k_reward(prompts, completions, **cols):
        return gsm8k_flexible(prompts, completions, **cols)

    cuda = torch.cuda.is_available()
    # TRL's colocated vLLM joins a one-process group at MASTER_PORT, 29500 unless set: a second
    # benchmark on the same host (another GPU) would find it taken and stop.
    from rl.cluster import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    args = grpo_config(cfg, steps, cuda, sleep)
    lora = LoraConfig(r=pc.rank, lora_alpha=pc.alpha, target_modules=list(pc.target_modules), task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=load_model(path, cfg.model.dtype), reward_funcs=gsm8k_reward, args=args,
                          train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[StepTimer()])
    try:
        trainer.train()
    finally:
        profiling.ProfilingContext._log_metrics = original
    return out


def recipe_dataset(cfg, tok, steps: int):
    """The prompts of ``steps`` steps, in the order placerl's sampler draws them."""
    from datasets import Dataset

    from rl.data import PromptSampler, attach_prompts, load_task

    rows = attach_prompts(load_task(cfg.data, "train"), tok, cfg.data)
    sampler = PromptSampler(len(rows), seed=cfg.data.seed)
    order = [i for _ in range(steps) for i in sampler.next_indices(cfg.rollout.prompts_per_step)]
    return Dataset.from_list([{k: rows[i][k] for k in ("prompt", "question", "answer", "gold")} for i in order])


def grpo_config(cfg, steps: int, cuda: bool, sleep: bool = True):
    """TRL's GRPOConfig with the recipe's batch, sampling, clipping, vLLM and learner settings."""
    from trl import GRPOConfig

    r, lc = cfg.rollout, cfg.learner
    batch = r.prompts_per_step * r.group_size
    if batch % lc.micro_batch_size:
        raise ValueError(f"learner.micro_batch_size={lc.micro_batch_size} must divide prompts x group = {batch}")
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=lc.micro_batch_size,
        gradient_accumulation_steps=batch // lc.micro_batch_size, num_generations=r.group_size,
        max_completion_length=r.max_new_tokens, max_steps=steps, learning_rate=lc.lr, temperature=r.temperature,
        top_p=r.top_p, beta=0.0, epsilon=cfg.algorithm.epsilon_low, epsilon_high=cfg.algorithm.epsilon_high,
        shuffle_dataset=False, use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=cuda and sleep,
        vllm_gpu_memory_utilization=r.gpu_memory_utilization, vllm_max_model_length=r.max_model_len,
        gradient_checkpointing=lc.gradient_checkpointing, bf16=cuda, use_cpu=not cuda, report_to=[],
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=cfg.trainer.seed)
