"""The GRPO step parts of bench/bench_vllm_gpu.py: placerl's recipe for a few steps (colocated with
or without sleep mode, disaggregated, one step off-policy, with compiled decoder layers, with
groups streamed to the learner as they finish, with the adapter merged into vLLM's weights) and TRL's
GRPOTrainer on the same batch."""
from __future__ import annotations

import statistics

import torch

from bench.bench_vllm_gpu import Sizes
from bench.gpu_measure import PeakMemory, Recorder


def step_overrides(s: Sizes) -> list[str]:
    return [f"model.name={s.model}", f"trainer.steps={s.steps}", f"trainer.save_every={s.steps + 1}",
            f"rollout.prompts_per_step={s.step_prompts}", f"rollout.group_size={s.step_group}",
            f"rollout.max_new_tokens={s.step_tokens}", f"learner.micro_batch_size={s.micro_batch}",
            f"placement.rank={s.rank}", f"placement.alpha={2 * s.rank}", f"rollout.max_lora_rank={s.rank}",
            f"rollout.gpu_memory_utilization={s.gpu_memory_utilization}",
            "rollout.engine=vllm", "reward.functions=[{name: gsm8k_flexible}]"]


STEP_KEYS = ("time/step_s", "time/rollout_s", "time/reward_s", "time/learner_s", "time/sync_s", "time/sleep_s",
             "time/wake_s", "time/rollout_wait_s", "rollout/staleness", "throughput/rollout_tokens_per_s",
             "rollout/response_tokens_mean", "time/rollout_generate_s", "time/rollout_rows_s", "rollout/stream_parts",
             # How far the rollout's logprobs are from the learner's: merged bf16 weights round small updates away.
             "learner/logprob_mismatch_abs_diff_mean", "learner/logprob_mismatch_kl_k3", "rollout/merged_update_error",
             "rollout/merged_direct_write",
             # The reward function's own seconds within time/reward_s (summed over the runner's slices).
             "reward/gsm8k_flexible/seconds")
# Reported with the first step: Ray, the actors and the engines (with learner.compile, the
# rank's compile warm-up over the rollout engine's start; learner/warm_up_s is its own time).
STARTUP_KEYS = ("time/startup_s", "learner/warm_up_s", "learner/compiled_graphs")


def _short(key: str) -> str:
    """A metric's name in the JSON: its last part (``reward_fn_s`` for the reward function's seconds)."""
    return "reward_fn_s" if key.startswith("reward/") else key.split("/")[-1]


def _rounded(key: str, value: float) -> float:
    """Seconds to 0.1 ms; a logprob mismatch (1e-7 on CPU in fp32) or a merged update's error to 9 places."""
    return round(value, 9 if "mismatch" in key or "error" in key else 4)


def part_step_placerl(s: Sizes, rec: Recorder, sleep: bool, two_gpus: bool = False, overlap: bool = False,
                      compile_layers: bool = False, stream: bool = False, merged: bool = False) -> None:
    """The recipe for ``s.steps`` timed steps, then (unless ``--no-learner-profile``) one more under
    the profiler (rl/learner/profiling.py), left out of the means: the profiler slows the step it watches."""
    import json

    from bench.recipe_steps import recipe_run

    placement = ["cluster.colocate=false", "cluster.gpus_per_learner_rank=1", "cluster.gpus_per_rollout_worker=1",
                 "rollout.gpu_memory_utilization=0.8"] if two_gpus else []
    placement += ["trainer.max_staleness=1"] if overlap else []
    placement += ["learner.compile=true"] if compile_layers else []
    # One part per full micro-batch of rows: the learner's micro-batches stay as large as in the whole step.
    placement += [f"trainer.stream_groups={max(1, s.micro_batch // s.step_group)}"] if stream else []
    placement += ["rollout.weight_sync=merged"] if merged else []
    memory = PeakMemory()
    profiled = s.steps + 1 if s.learner_profile else 0
    if profiled:
        placement += [f"trainer.steps={profiled}", f"trainer.save_every={profiled + 1}",
                      f"learner.profile_step={profiled}"]
    # A CPU (--smoke) has no sleep mode: auto there, so that every part runs end to end.
    sleep_mode = ("true" if torch.cuda.is_available() else "auto") if sleep else "false"
    steps, run_dir = recipe_run(s.recipe, step_overrides(s) + [f"rollout.sleep_mode={sleep_mode}"] + placement
                                 + s.step_settings)
    if profiled:
        profile = run_dir / "profile" / f"learner-step-{profiled}-rank-0.json"
        rec("learner_profile", json.loads(profile.read_text()) if profile.exists() else None)
        rec("profiled_step", {_short(k): round(steps[-1].get(k, 0.0), 4) for k in STEP_KEYS} if steps else None)
    rec("startup", {k.split("/")[-1]: round(steps[0][k], 4) for k in STARTUP_KEYS if k in steps[0]} if steps else None)
    # Graphs built after the warm-up would be compiles inside the timed steps.
    rec("compiled_graphs_by_step", [m.get("learner/compiled_graphs") for m in steps])
    steps = steps[:s.steps]
    # The sync's own stages (time/sync_<stage>_s: export, transfer, the engine's load steps) say
    # where a sync that misses its share goes.
    keys = STEP_KEYS + tuple(sorted({k for m in steps for k in m if k.startswith("time/sync_") and k != "time/sync_s"}))
    rec("steps", [{_short(k): _rounded(k, m.get(k, 0.0)) for k in keys} for m in steps])
    timed = steps[1:] or steps
    mean = {_short(k): _rounded(k, statistics.mean(m.get(k, 0.0) for m in timed)) for k in keys}
    mean["sync_over_step"] = round(mean["sync_s"] / mean["step_s"], 5)
    rec("mean_after_first", mean)
    rec("memory", memory.result())


def part_step_trl(s: Sizes, rec: Recorder, sleep: bool = True) -> None:
    from bench.trl_vllm_step import trl_vllm_steps

    memory = PeakMemory()
    rec("steps", trl_vllm_steps(s.recipe, step_overrides(s), s.steps, sleep))
    timed = rec.data["steps"][1:] or rec.data["steps"]
    rec("mean_after_first", {k: round(statistics.mean(m[k] for m in timed), 4) for k in timed[0]})
    rec("memory", memory.result())
