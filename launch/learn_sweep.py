"""``placerl learn sweep``: a grid of arms x seeds as concurrent ``placerl learn arm`` processes.

    placerl learn sweep --out runs/learning --config RECIPE --arms launch/configs/sweeps/placement_arms.yaml \\
        --seeds 0,1,2 --gpus 0,1 --per-gpu 8 --budget-s 3000 \\
        --summary reports/learning --reference uniform-r8 [key=value ...]

Every arm's overrides are the arms file's ``common``, then the command line's, then the
arm's own. Seeds run seed-major, the arms of one seed together on one GPU where there is
room (rl/experiments/sweep.py says why). Pairs already evaluated are skipped; an arm whose
budget ran out (exit 3) is started again and resumes, at most ``--max-resumes`` times; a
failing arm is recorded and the others go on. Each arm's output is in
``<out>/logs/<arm>-s<seed>.log``. Everything is checked before the first process starts.
Exit status: 0 every arm evaluated, 1 some did not, 2 bad arguments, 128+N stopped by signal N.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from rl.config import ConfigError, load_config
from rl.experiments.learning import (LearningError, arm_dir, check_same_overrides, first_difference, read_json,
                                     shared_settings)
from rl.experiments.sweep import CPU, SweepError, SweepQueue, arm_overrides, format_table, job_order, \
    make_slots, parse_devices, parse_seeds, read_arms

RECIPE = "launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml"


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="placerl learn sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results folder, as for `placerl learn arm`")
    ap.add_argument("--config", default=RECIPE)
    ap.add_argument("--arms", required=True, help="YAML: common: [overrides], arms: {name: [overrides]}")
    ap.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    ap.add_argument("--gpus", default=None,
                    help="CUDA devices, e.g. 0,1 (default: every visible one; none: one arm at a time on CPU)")
    ap.add_argument("--per-gpu", type=int, default=1, help="arms running at once on each GPU")
    ap.add_argument("--budget-s", type=float, default=480.0, help="each `learn arm` call's budget (s)")
    ap.add_argument("--stagger-s", type=float, default=0.0,
                    help="seconds between starts on one GPU (0 is fine with rollout.gpu_kv_cache_gb set)")
    ap.add_argument("--max-resumes", type=int, default=3, help="times an arm out of budget (exit 3) is restarted")
    ap.add_argument("--summary", default="", metavar="REPORT_DIR",
                    help="then run `placerl learn summary` into this folder (evaluating the base model first if needed)")
    ap.add_argument("--reference", default="", help="the summary's reference arm, e.g. uniform-r8")
    ap.add_argument("--dry-run", action="store_true", help="check everything, print the first starts, start nothing")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every arm, e.g. trainer.steps=150")
    return ap.parse_args(argv)


def visible_devices() -> list[str]:
    """Every CUDA device this process sees, as the CUDA_VISIBLE_DEVICES values a child needs."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:  # already narrowed: pass the same ids on (they may be UUIDs)
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def check_sharing(cfg, arm: str, per_gpu: int) -> None:
    """Several vLLM engines on one GPU need a fixed KV cache and no sleep mode (docs/gpu.md)."""
    from rl.rollout.vllm_settings import resolve_sleep_mode

    if per_gpu == 1 or cfg.rollout.engine != "vllm":
        return
    if cfg.rollout.gpu_kv_cache_gb <= 0:
        raise SweepError(f"arm {arm}: rollout.gpu_kv_cache_gb is 0 with --per-gpu {per_gpu}: vLLM then sizes its KV "
                         "cache by measuring the GPU while it starts, and finds none while another arm allocates; "
                         "set rollout.gpu_kv_cache_gb (e.g. 3) or use --per-gpu 1")
    if resolve_sleep_mode(cfg.rollout.sleep_mode, cfg.cluster.colocate, on_gpu=True):
        raise SweepError(f"arm {arm}: rollout.sleep_mode is on with --per-gpu {per_gpu}: vLLM's sleep checks the "
                         "whole GPU's free memory, which the other arms change; set rollout.sleep_mode=false")


def check_arm(args, arm: str, overrides: list[str], seeds: list[int], per_gpu: int) -> dict:
    """One arm's config as `learn arm` will load it, and its shared settings."""
    from placement.scorers import check_budget

    try:
        cfg = load_config(args.config, overrides)
        if not cfg.placement.plan:
            check_budget(cfg.placement.scorer, cfg.placement.budget)
    except (ConfigError, ValueError) as e:
        raise SweepError(f"arm {arm}: {e}") from None
    check_sharing(cfg, arm, per_gpu)
    for seed in seeds:  # `learn arm` refuses to resume a pair started with other overrides: here, not on a GPU
        try:
            check_same_overrides(args.out, arm, seed, overrides)
        except LearningError as e:
            raise SweepError(str(e)) from None
    return shared_settings(cfg)


def check_shared(arm_settings: dict[str, dict], out: Path) -> None:
    """Every evaluation in ``out`` must share model, data and eval length: the first arm that
    differs (from the folder's settings.json or the first arm) fails here, not on a GPU."""
    saved = read_json(Path(out) / "settings.json")
    first = next(iter(arm_settings))
    reference, source = (saved, f"{out}/settings.json") if saved else (arm_settings[first], f"arm {first}")
    for arm, mine in arm_settings.items():
        key = first_difference(reference, mine)
        if key is not None:
            raise SweepError(f"arm {arm}: {key}={json.dumps(mine[key])[:120]} differs from {source} "
                             f"({json.dumps(reference.get(key))[:120]}); every arm must share it: move the "
                             "override to common, or use another --out")


def plan(args):
    """Everything checked, nothing started: (arms file, seeds, slots, overrides per arm)."""
    arms = read_arms(args.arms)
    seeds = parse_seeds(args.seeds)
    visible = visible_devices()
    if args.gpus is not None:
        devices = parse_devices(args.gpus)
        if not visible:
            raise SweepError(f"--gpus {args.gpus}: this host shows no CUDA device; leave --gpus out to run on CPU")
    else:
        devices = visible
    if not devices and args.per_gpu != 1:
        raise SweepError(f"--per-gpu {args.per_gpu}: this host has no CUDA device, so arms run one at a time on "
                         "CPU; leave --per-gpu at 1")
    slots = make_slots(devices or [CPU], args.per_gpu)
    for name, value, low in (("--budget-s", args.budget_s, 0.0), ("--stagger-s", args.stagger_s, 0.0),
                             ("--max-resumes", args.max_resumes, 0)):
        if not value >= low or (name == "--budget-s" and value <= 0):
            raise SweepError(f"{name} {value} must be {'> 0' if name == '--budget-s' else '>= 0'}")
    if args.reference and args.reference not in arms.arms:
        raise SweepError(f"--reference {args.reference}: not an arm of {args.arms} ({', '.join(arms.arms)})")
    if args.reference and not args.summary:
        raise SweepError("--reference needs --summary REPORT_DIR (the summary compares the arms)")
    overrides = {arm: arm_overrides(arms, arm, args.overrides) for arm in arms.arms}
    check_shared({arm: check_arm(args, arm, o, seeds, args.per_gpu) for arm, o in overrides.items()}, args.out)
    return arms, seeds, slots, overrides


def summary_command(args) -> list[str]:
    return ["learn", "summary", "--out", str(args.out), "--report", args.summary or "reports/learning",
            *(["--reference", args.reference] if args.reference else [])]


def main(argv: list[str]) -> int:
    from rl.experiments.sweep_runner import SweepSpec, result_rows, run_base, run_jobs

    args = parse_args(argv)
    try:
        arms, seeds, slots, overrides = plan(args)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    jobs = job_order(list(arms.arms), seeds)
    done = {j for j in jobs if (arm_dir(out, j.arm, j.seed) / "eval.json").exists()}
    queue = SweepQueue(jobs, args.max_resumes, evaluated_before=done)
    spec = SweepSpec(out, args.config, overrides, args.budget_s, args.stagger_s)
    from rl.experiments.sweep_runner import device_name

    devices = [device_name(d) for d in dict.fromkeys(s.device for s in slots)]
    print(f"sweep: {len(arms.arms)} arms x {len(seeds)} seeds = {len(jobs)} runs ({len(done)} evaluated before) on "
          f"{', '.join(devices)}, {len(slots) // len(devices)} at a time per device; logs in {out / 'logs'}", flush=True)
    if args.dry_run:
        from rl.experiments.sweep import assign
        from rl.experiments.sweep_runner import arm_command, device_name

        for job, slot in assign(queue.pending, {}, slots):
            print(f"would start {job.arm} seed {job.seed} on {device_name(slot.device)}: "
                  + " ".join(shlex.quote(a) for a in arm_command(spec, job)))
        return 0
    say = lambda line: print(line, flush=True)  # noqa: E731 - the children's lines interleave with ours
    status = 0
    if args.summary and not (out / "base" / "eval.json").exists():
        status = run_base(spec, [*arms.common, *args.overrides], slots[0].device, say)
    if status == 0:
        status = run_jobs(spec, queue, slots, say)
    print("\n" + format_table(result_rows(out, queue)), flush=True)
    summary = "placerl " + " ".join(shlex.quote(a) for a in summary_command(args))
    if status == 0 and args.summary:
        from launch.learn import main as learn_main

        print(f"\n$ {summary}", flush=True)
        status = learn_main(summary_command(args)[1:])
    elif status == 0:
        print(f"\nthen: {summary}")
    if status == 0 and queue.failed:
        print(f"{len(queue.failed)} run(s) not evaluated: " + ", ".join(j.label for j in queue.failed)
              + f"; see their logs in {out / 'logs'}, and run the same sweep again to retry them", file=sys.stderr)
        return 1
    return status
