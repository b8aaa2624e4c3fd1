"""``placerl learn``: does a GRPO run make the model better at GSM8K? Base, arms, report.

    placerl learn base    --out runs/learning --config RECIPE [key=value ...]
    placerl learn arm     --out runs/learning --config RECIPE --arm lr1e-4 --seed 0 --budget-s 480 \\
                          learner.lr=1e-4 [key=value ...]
    placerl learn summary --out runs/learning --report reports/learning
    placerl learn sweep   --out runs/learning --config RECIPE --arms ARMS.yaml --seeds 0,1,2 --gpus 0,1 \\
                          --per-gpu 6 --budget-s 3000 [--summary reports/learning --reference ARM] [key=value ...]

``base`` evaluates the base model once (greedy, val and all test problems, strict and
flexible; cached). ``arm`` trains one arm (a name for a set of overrides) and seed until
its last step, then evaluates its final adapter; when ``--budget-s`` is nearly spent it
stops at a checkpoint, and the same command resumes it. Arms may run at the same time
as separate processes (each starts its own Ray). ``summary`` writes summary.json,
README.md, reward_curves.png and the per-problem correctness under ``--report``; the
arm is chosen on validation accuracy only. ``sweep`` runs a grid of arms x seeds as
concurrent ``arm`` processes spread over the host's GPUs (launch/learn_sweep.py).
rl/experiments/learning.py describes the
folder layout. Exit status: 0 done, 3 not finished within the budget (run it again),
2 bad arguments.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from rl.config import ConfigError, load_config
from rl.data import DataError
from rl.experiments.sweep import ARM_NAME

RECIPE = "launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml"


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="placerl learn", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    # Listed for --help only: main() hands `sweep` to launch/learn_sweep.py before parsing.
    sub.add_parser("sweep", help="arms x seeds as concurrent `arm` processes over the GPUs (see sweep --help)",
                   add_help=False)
    for name in ("base", "arm", "summary"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="results folder, shared by every phase and call")
        if name == "summary":
            p.add_argument("--report", default="reports/learning", help="where summary.json and README.md go")
            p.add_argument("--reference", default="",
                           help="an arm to compare every other arm with at equal steps (paired, e.g. uniform-r8)")
            continue
        p.add_argument("--config", default=RECIPE)
        if name == "arm":
            p.add_argument("--arm", required=True, help="the arm's name (letters, digits, . _ -)")
            p.add_argument("--seed", type=int, default=0, help="trainer.seed and placement.seed of this arm")
            p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of this call (s)")
            p.add_argument("--eval-at-budget", action="store_true",
                           help="if the budget ends before trainer.steps, evaluate the step reached")
        p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. learner.lr=1e-4")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from launch.learn_sweep import main as sweep_main

        return sweep_main(argv[1:])
    args = parse_args(argv)
    command = "placerl learn " + " ".join(shlex.quote(a) for a in argv)
    from placement.scorers import check_budget
    from rl.experiments.learning import LearningError, run_arm, run_base

    try:
        if args.phase == "summary":
            from rl.experiments.learning_report import write_report

            summary = write_report(args.out, args.report, command, args.reference)
            print(f"report: {args.report}/summary.json, README.md; chosen arm (on val): "
                  f"{summary['selection'].get('chosen')}")
            print(open(f"{args.report}/README.md").read())
            return 0
        cfg = load_config(args.config, args.overrides)  # a bad override fails here, before anything starts
        if args.phase == "base":
            run_base(args.config, args.overrides, args.out, command)
            return 0
        if not ARM_NAME.fullmatch(args.arm):
            raise LearningError(f"--arm {args.arm!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        try:  # e.g. bmask without an entry budget: here, not after the probe's rollout
            if not cfg.placement.plan:
                check_budget(cfg.placement.scorer, cfg.placement.budget)
        except ValueError as e:
            raise LearningError(str(e)) from None
        status = run_arm(args.config, args.overrides, args.out, args.arm, args.seed, args.budget_s, command,
                         eval_at_budget=args.eval_at_budget)
        return 0 if status == "evaluated" else 3
    except (ConfigError, DataError, LearningError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
