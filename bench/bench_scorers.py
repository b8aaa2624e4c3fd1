"""Time every placement scorer on one model and probe, and as a fraction of a training run.

    python bench/bench_scorers.py [--model smollm2-135m-instruct] [--run-steps 3] [--dtype float32]

Each scorer runs once, cold, on the same probe (32 GSM8K training samples by default,
rendered with the chat template), as it would at the start of a run; the wall time
includes the probe's forward/backward passes.

``--run-steps N`` then runs N steps of the GSM8K GRPO recipe (``--run-config``, by default
launch/configs/gsm8k_grpo.yaml; the same model, evaluation off) in this same invocation, so that the fraction compares
times taken on the same (noisy) machine. A 100-step run's time is estimated as the
measured run (start-up included) plus the remaining steps at the mean time of steps
2..N. Checkpoint saves and evaluation are left out, which makes the run shorter and the
printed fractions an upper bound. ``--run-seconds`` gives the run's time instead.

CPU time and the machine's load average are printed too: on a shared machine wall time
alone overstates the cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_BUDGETS = {"uniform": "", "random": "", "page": "", "plop": "", "bmask": "fraction=0.05",
                   "bmask_random": "fraction=0.05", "gradrank": ""}
RUN_STEPS = 100


def hundred_step_run_seconds(recipe: str, model: str, steps: int) -> tuple[float, list[float]]:
    """(estimated wall time of a 100-step run of the recipe, the measured step times)."""
    from bench.recipe_steps import recipe_step_metrics

    start = time.perf_counter()
    rows = recipe_step_metrics(recipe, [f"model.name={model}", f"trainer.steps={steps}", f"trainer.save_every={steps}"])
    wall = time.perf_counter() - start
    step_s = [m["time/step_s"] for m in rows]
    steady = statistics.mean(step_s[1:] or step_s)  # the first step carries engine warm-up
    return wall + (RUN_STEPS - len(step_s)) * steady, step_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=os.environ.get("PLACERL_GSM8K_DIR", ""), help="GSM8K folder or jsonl")
    ap.add_argument("--scorers", default=",".join(DEFAULT_BUDGETS))
    ap.add_argument("--probe-samples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="placement.probe_dtype")
    ap.add_argument("--device", default="", help="cpu or cuda (default: cuda when there is a GPU)")
    ap.add_argument("--run-steps", type=int, default=0, help="measure the GRPO run now, from this many steps (>= 2)")
    ap.add_argument("--run-config", default="launch/configs/gsm8k_grpo.yaml", help="the recipe --run-steps runs")
    ap.add_argument("--run-seconds", type=float, default=0.0, help="wall time of a 100-step GRPO run, same model")
    args = ap.parse_args(argv)
    if args.run_steps == 1:
        ap.error("--run-steps needs at least 2 steps: the first one carries warm-up")

    import torch

    from launch.score import read_jsonl, render_rows
    from placement import Budget, ScorerSettings, build_probe, score_model
    from placement.scoring import load_scoring_model
    from core.models import load_tokenizer, resolve_model

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    model = load_scoring_model(path, args.dtype, args.device or None)
    device = next(model.parameters()).device
    probe = build_probe(tok, render_rows(read_jsonl(args.data), tok, args.probe_samples, 0), "sft", args.max_tokens)
    print(f"model {args.model} ({args.dtype}): {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"probe {probe.num_samples} samples, {probe.num_tokens} tokens; device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'scorer':<14}{'budget':<16}{'wall s':>9}{'cpu s':>9}{'load avg':>10}")
    seconds = {}
    for name in [s for s in args.scorers.split(",") if s]:
        budget = DEFAULT_BUDGETS.get(name, "")
        cpu0 = time.process_time()
        plan = score_model(name, model, probe, Budget.parse(budget), ScorerSettings())
        cpu = time.process_time() - cpu0
        seconds[name] = plan.seconds
        print(f"{name:<14}{budget or '-':<16}{plan.seconds:>9.2f}{cpu:>9.2f}{os.getloadavg()[0]:>10.2f}", flush=True)
    del model

    run_s = args.run_seconds
    if args.run_steps:
        run_s, step_s = hundred_step_run_seconds(args.run_config, args.model, args.run_steps)
        print(f"GRPO run ({args.run_steps} steps of {args.run_config}, load avg "
              f"{os.getloadavg()[0]:.2f}): steps {', '.join(f'{s:.1f}' for s in step_s)} s")
    if run_s:
        print(f"a {RUN_STEPS}-step run: {run_s:.0f} s; each scorer as a fraction of it (goal for bmask and page: < 0.5%)")
        for name, s in seconds.items():
            print(f"  {name:<14}{100 * s / run_s:>8.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
