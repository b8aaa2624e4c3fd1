"""``placerl learn``: does a GRPO run make the model better at GSM8K? Base, arms, report.

    placerl learn base    --out runs/learning --config RECIPE [key=value ...]
    placerl learn arm     --out runs/learning --config RECIPE --arm lr1e-4 --seed 0 --budget-s 480 \\
                          learner.lr=1e-4 [key=value ...]
    placerl learn summary --out runs/learning --report reports/learning

``base`` evaluates the base model once (greedy, val and all test problems, strict and
flexible; cached). ``arm`` trains one arm (a name for a set of overrides) and seed until
its last step, then evaluates its final adapter; when ``--budget-s`` is nearly spent it
stops at a checkpoint, and the same command resumes it. Arms may run at the same time
as separate processes (each starts its own Ray). ``summary`` writes summary.json,
README.md, reward_curves.png and the per-problem correctness under ``--report``; the
arm is chosen on validation accuracy only. rl/experiments/learning.py describes the
folder layout. Exit status: 0 done, 3 not finished within the budget (run it again),
2 bad arguments.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys

from rl.config import ConfigError, load_config
from rl.data import DataError

RECIPE = "launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml"


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="placerl learn", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
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
    args = parse_args(argv)
    command = "placerl learn " + " ".join(shlex.quote(a) for a in argv)
    from rl.experiments.learning import LearningError, run_arm, run_base

    try:
        if args.phase == "summary":
            from rl.experiments.learning_report import write_report

            summary = write_report(args.out, args.report, command, args.reference)
            print(f"report: {args.report}/summary.json, README.md; chosen arm (on val): "
                  f"{summary['selection'].get('chosen')}")
            print(open(f"{args.report}/README.md").read())
            return 0
        load_config(args.config, args.overrides)  # a bad override fails here, before anything starts
        if args.phase == "base":
            run_base(args.config, args.overrides, args.out, command)
            return 0
        if not re.fullmatch(r"[A-Za-z0-9._-]+", args.arm):
            raise LearningError(f"--arm {args.arm!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        status = run_arm(args.config, args.overrides, args.out, args.arm, args.seed, args.budget_s, command,
                         eval_at_budget=args.eval_at_budget)
        return 0 if status == "evaluated" else 3
    except (ConfigError, DataError, LearningError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
