"""Rollouts overlapping learning, measured: one recipe with trainer.max_staleness 0 and 1, in one run.

    python -m bench.bench_overlap --steps 20 --out reports/gpu/bench_overlap.json        # a 2-GPU host
    python -m bench.bench_overlap --arms sync --steps 20 --out reports/gpu/bench_overlap.json
    python -m bench.bench_overlap --arms overlap --steps 20 --out reports/gpu/bench_overlap.json
    python -m bench.bench_overlap --smoke --out /tmp/overlap.json                        # a CPU check
    python -m bench.bench_overlap --steps 16 --out ... learner.lr=2e-4                   # recipe overrides last

Each arm is the GPU recipe (launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml) disaggregated:
the learner rank on one GPU, the vLLM worker on the other (cluster.colocate=false, one GPU each, no
sleep mode), the same prompts, seeds, batch and number of steps; ``sync`` alternates rollout and
update (max_staleness=0), ``overlap`` launches step t+1's rollout before step t trains
(max_staleness=1). Each arm runs in its own process (a vLLM engine's GPU memory is not freed inside
a process) and ends with a greedy evaluation on the first ``--eval-size`` test problems (1319: all
of GSM8K's test set).

Written to ``--out`` (merged with what the file holds, so the arms can be run by separate calls)
and printed: per arm, the mean step time after the first step and its breakdown (rollout = launch
to completions, rollout_wait = the part the driver waited for, reward, learner, sync), staleness,
and accuracy (strict, flexible) with its Wilson 95% interval; then the step-time ratio overlap/sync
(goal <= 0.6) and the paired accuracy difference on the same problems with its 95% interval (goal:
the overlapped arm's accuracy inside the synchronous arm's interval). On a CPU (``--smoke``) the
two arms share the same cores: the smoke run checks the plumbing, its ratio means nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GPU_RECIPE = "launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml"
SMOKE_RECIPE = "launch/configs/tiny.yaml"
TWO_GPUS = ["cluster.colocate=false", "cluster.gpus_per_learner_rank=1", "cluster.gpus_per_rollout_worker=1",
            "rollout.gpu_memory_utilization=0.8"]
ARMS = {"sync": 0, "overlap": 1}
KEYS = ("time/step_s", "time/rollout_s", "time/rollout_wait_s", "time/reward_s", "time/learner_s", "time/sync_s",
        "rollout/staleness", "learner/logprob_mismatch_kl_k3", "throughput/rollout_tokens_per_s")


def arm_overrides(args, staleness: int, out_dir: str) -> list[str]:
    common = [f"trainer.max_staleness={staleness}", f"trainer.steps={args.steps}", f"trainer.save_every={args.steps}",
              "trainer.eval_every=0", f"trainer.eval_size={args.eval_size}", f"logging.output_dir={out_dir}",
              f"logging.run_name=staleness-{staleness}", "logging.tensorboard=false", "logging.progress=false"]
    if args.smoke:
        return common + ["rollout.engine=vllm"] + args.overrides
    return common + [f"model.name={args.model}"] + TWO_GPUS + args.overrides


def run_arm(args) -> None:
    """In the child process: train one arm, write its step metrics and per-problem evaluation."""
    from rl.config import load_config
    from rl.metrics_log import read_metrics
    from rl.rollout.vllm_settings import use_in_process_engine
    from rl.trainer import EVAL_PROBLEMS_FILE, train

    use_in_process_engine()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = tempfile.mkdtemp(prefix="placerl-overlap-")
    cfg = load_config(REPO / (SMOKE_RECIPE if args.smoke else GPU_RECIPE), arm_overrides(args, ARMS[args.arm], out))
    t = time.perf_counter()
    run = train(cfg, "bench")
    steps = [{k: m[k] for k in KEYS if k in m} for m in read_metrics(run) if "time/step_s" in m]
    problems = json.loads((run / EVAL_PROBLEMS_FILE).read_text()) if (run / EVAL_PROBLEMS_FILE).exists() else {}
    Path(args.arm_out).write_text(json.dumps({"steps": steps, "problems": problems, "config": cfg.to_dict(),
                                              "wall_s": round(time.perf_counter() - t, 1)}))


def arm_summary(result: dict) -> dict:
    """Mean of each timing after the first step, and accuracy with its Wilson 95% interval (pure)."""
    from rl.experiments.compare_report import wilson_interval

    timed = result["steps"][1:] or result["steps"]
    out = {k.split("/")[-1]: round(statistics.mean(m.get(k, 0.0) for m in timed), 4) for k in KEYS}
    for which, marks in result.get("problems", {}).items():
        k, n = int(sum(marks)), len(marks)
        out[f"accuracy_{which}"] = {"accuracy": k / n, "n": n, "ci95": [round(x, 4) for x in wilson_interval(k, n)]}
    return out


def compare(results: dict) -> dict:
    """The ratio and the accuracy checks from the arms that are there (pure)."""
    from rl.experiments.learning_stats import paired_difference

    out = {name: arm_summary(r) for name, r in results.items() if r.get("steps")}
    if "sync" in out and "overlap" in out:
        ratio = out["overlap"]["step_s"] / out["sync"]["step_s"]
        out["step_s_overlap_over_sync"] = round(ratio, 3)
        out["step_time_goal_0.6"] = "met" if ratio <= 0.6 else "NOT met"
        for which in ("strict", "flexible"):
            base, arm = (results[a].get("problems", {}).get(which) for a in ("sync", "overlap"))
            if base and arm and len(base) == len(arm):
                lo, hi = out["sync"][f"accuracy_{which}"]["ci95"]
                acc = out["overlap"][f"accuracy_{which}"]["accuracy"]
                out[f"accuracy_{which}_overlap_minus_sync"] = paired_difference([int(x) for x in base],
                                                                                [int(x) for x in arm])
                out[f"accuracy_{which}_within_sync_ci"] = lo <= acc <= hi
    return out


def orchestrate(args) -> int:
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("arms", {})
    doc.setdefault("runs", []).append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
                                       "host": os.uname().nodename, "smoke": args.smoke})
    for arm in args.arms.split(","):
        if arm not in ARMS:
            raise SystemExit(f"--arms: {arm!r} is not known; choose from {', '.join(ARMS)}")
        arm_file = out.with_name(f".{out.name}.{arm}.arm.json")
        arm_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.bench_overlap", "--arm", arm, "--arm-out", str(arm_file),
               "--steps", str(args.steps), "--eval-size", str(args.eval_size), "--model", args.model,
               *args.overrides]
        print(f"=== {arm}: trainer.max_staleness={ARMS[arm]}, {args.steps} steps", flush=True)
        proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), cwd=REPO, stderr=subprocess.PIPE, text=True)
        if proc.returncode or not arm_file.exists():
            tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            doc["arms"][arm] = {"error": f"exit {proc.returncode}: {tail[0][:400]}"}
            sys.stderr.write(proc.stderr[-4000:])
        else:
            doc["arms"][arm] = json.loads(arm_file.read_text())
            arm_file.unlink()
        doc["summary"] = compare(doc["arms"])
        out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="model.name: a builtin, a folder or a .gguf")
    ap.add_argument("--arms", default="sync,overlap", help="comma-separated from sync,overlap (run in this order)")
    ap.add_argument("--steps", type=int, default=20, help="GRPO steps per arm (the first is not timed)")
    ap.add_argument("--eval-size", type=int, default=None,
                    help="test problems evaluated after the last step; default 1319 (all of GSM8K's test set), 8 with --smoke")
    ap.add_argument("--out", default="bench_overlap.json", help="the JSON, merged with what it already holds")
    ap.add_argument("--smoke", action="store_true", help="the tiny recipe on a CPU: a check of the plumbing")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for both arms, e.g. learner.lr=2e-4")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--arm-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.eval_size is None:
        args.eval_size = 8 if args.smoke else 1319
    if args.arm:
        run_arm(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
