"""GRPO step time: placerl against TRL's GRPOTrainer, and adapter sync as a share of a step.

Both trainers get the same model, LoRA config, prompts, batch (prompts x group size),
completion length and reward, and run in this one invocation, one after the other,
so that the printed ratios compare like with like on the same (noisy) machine:

    python bench/bench_grpo_step.py --steps 4 --prompts 8 --group 4 --tokens 64

placerl runs its real system (Ray actors, a vLLM rollout worker, an FSDP2 learner);
TRL runs its own loop with transformers generation (its vLLM modes do not run on a
CPU). The first step of each is warm-up and is left out of the means.

``--weight-sync adapter,merged`` runs placerl once per way of serving the adapter
(vLLM's LoRA kernels; merged into the base weights, the CPU default) in the same
invocation and prints the ratio of their step times. ``--learner-path whole,default`` does the
same for the learner: ``whole`` is every row's whole forward and the whole [b, t, vocab] logits
(``learner.shared_prefix=false learner.logprob_chunk=0``), ``default`` one forward per shared
prompt and logprobs from the hidden states in chunks. With both lists every pair runs, or
``--runs merged/whole,merged/default,adapter/default`` names the pairs.

For each placerl run the learner actor's peak resident memory and the rollout worker's CPU
use while the learner trains are sampled from outside (bench/actor_usage.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


LEARNER_PATHS = {"default": [], "whole": ["learner.shared_prefix=false", "learner.logprob_chunk=0"]}


def placerl_steps(args, weight_sync: str = "auto", learner_path: str = "default") -> tuple[list[dict], dict]:
    """The step metrics of one placerl run, and its actors' CPU and memory (bench/actor_usage.py)."""
    from bench.actor_usage import ActorUsage
    from bench.recipe_steps import recipe_step_metrics

    with ActorUsage() as usage:
        steps = recipe_step_metrics("launch/configs/gsm8k_grpo.yaml", [
            *LEARNER_PATHS[learner_path], f"rollout.weight_sync={weight_sync}", f"trainer.steps={args.steps}",
            f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
            f"rollout.max_new_tokens={args.tokens}", f"learner.micro_batch_size={args.micro_batch}",
            f"trainer.save_every={args.steps + 1}", "reward.functions=[{name: gsm8k_flexible}]",
            f"placement.rank={args.rank}", f"placement.alpha={2 * args.rank}"])
    return steps, usage.summary()


def trl_step_times(args) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from core.lora import DEFAULT_TARGET_MODULES
    from rewards.gsm8k import gsm8k_flexible
    from rl.config import DataConfig
    from rl.data import attach_prompts, load_task
    from core.models import load_model, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    rows = attach_prompts(load_task(DataConfig(), "train"), tok, DataConfig())[: args.prompts * (args.steps + 1)]
    ds = Dataset.from_list([{"prompt": r["prompt"], "gold": r["gold"], "answer": r["answer"]} for r in rows])
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    def reward(prompts, completions, **cols):
        return gsm8k_flexible(prompts, completions, **cols)

    # The same micro-batches as placerl's learner: TRL generates for the whole step
    # (micro-batch x accumulation steps = prompts x group) and trains micro-batch by micro-batch.
    accumulate = args.prompts * args.group // args.micro_batch
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.micro_batch,
                     num_generations=args.group, max_completion_length=args.tokens, max_steps=args.steps,
                     learning_rate=2e-5, use_vllm=False, use_cpu=True, report_to=[], logging_steps=1,
                     save_strategy="no", bf16=False, gradient_accumulation_steps=accumulate, temperature=1.0, beta=0.0,
                     epsilon_high=0.28, dataloader_num_workers=0, seed=0)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                      target_modules=list(DEFAULT_TARGET_MODULES))
    trainer = GRPOTrainer(model=load_model(path), reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=tok, peft_config=lora, callbacks=[StepTimer()])
    trainer.train()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=8,
                    help="sequences per forward/backward on both sides (a whole 32-sequence batch "
                         "of SmolLM2 logits needs about 20 GB)")
    ap.add_argument("--weight-sync", default="auto",
                    help="comma-separated rollout.weight_sync modes to time (auto, adapter, merged)")
    ap.add_argument("--learner-path", default="default",
                    help=f"comma-separated learner paths to time ({', '.join(LEARNER_PATHS)})")
    ap.add_argument("--runs", default=None, help="comma-separated WEIGHT_SYNC/LEARNER_PATH pairs (instead "
                                                 "of every pair of --weight-sync and --learner-path)")
    ap.add_argument("--skip-trl", action="store_true")
    args = ap.parse_args()
    if (args.prompts * args.group) % args.micro_batch:
        ap.error(f"--micro-batch={args.micro_batch} must divide prompts x group = {args.prompts * args.group}")
    runs = ([tuple(r.split("/")) for r in args.runs.split(",")] if args.runs else
            [(mode, path) for mode in args.weight_sync.split(",") for path in args.learner_path.split(",")])
    for run in runs:
        if len(run) != 2 or run[1] not in LEARNER_PATHS:
            ap.error(f"run {'/'.join(run)!r} is not WEIGHT_SYNC/LEARNER_PATH with a learner path among "
                     f"{', '.join(LEARNER_PATHS)}")
    by_run = {}
    for mode, path in runs:
        metrics, usage = placerl_steps(args, mode, path)
        steps = metrics[1:]
        ours = statistics.mean(m["time/step_s"] for m in steps)
        parts = {k: statistics.mean(m.get(k, 0.0) for m in steps)
                 for k in ("time/rollout_s", "time/reward_s", "time/learner_s", "time/sync_s")}
        by_run[mode if len(runs) == len({m for m, _ in runs}) else f"{mode}/{path}"] = {
            "placerl_step_s": ours, "sync_over_step": parts["time/sync_s"] / ours,
            **{f"placerl_{k[5:]}": v for k, v in parts.items()},
            "rollout_tokens_per_s": statistics.mean(m["throughput/rollout_tokens_per_s"] for m in steps),
            "reward_over_step": parts["time/reward_s"] / ours, **usage}
    names = list(by_run)
    result = dict(by_run[names[-1]])
    if len(names) > 1:
        result["by_run"] = by_run
        first = by_run[names[0]]
        for name in names[1:]:
            for part in ("step", "rollout", "learner"):
                result[f"{name}_over_{names[0]}_{part}"] = (by_run[name][f"placerl_{part}_s"]
                                                          / first[f"placerl_{part}_s"])
            result[f"{name}_over_{names[0]}_learner_peak_rss"] = (by_run[name]["learner_peak_rss_gb"]
                                                                 / max(first["learner_peak_rss_gb"], 1e-9))
    ours = result["placerl_step_s"]
    if not args.skip_trl:
        theirs = statistics.mean(trl_step_times(args)[1:])
        result.update({"trl_step_s": theirs, "placerl_over_trl": ours / theirs})
        for r in by_run.values():
            r["placerl_over_trl"] = r["placerl_step_s"] / theirs
    print(json.dumps(result, indent=1))
    for name, r in by_run.items():
        print(f"{name}: step {r['placerl_step_s']:.1f} s (rollout {r['placerl_rollout_s']:.1f} s at "
              f"{r['rollout_tokens_per_s']:.0f} tokens/s, learner {r['placerl_learner_s']:.1f} s, sync "
              f"{r['placerl_sync_s']:.2f} s); learner peak RSS {r['learner_peak_rss_gb']:.2f} GB; rollout worker "
              f"{r['worker_cores_during_train_step']:.2f} cores while the learner trains"
              + (f"; placerl / TRL {r['placerl_over_trl']:.3f}" if "placerl_over_trl" in r else ""))
    print(f"sync / step = {result['sync_over_step']:.3%} (goal < 5%)")
    if "trl_step_s" in result:
        print(f"placerl step / TRL step = {result['placerl_over_trl']:.3f} (goal <= 0.5 on a CPU; TRL {theirs:.1f} s, placerl {ours:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
