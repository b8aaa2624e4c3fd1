"""``placerl compare``: several placements under one budget and the same seeds, then a table and plots.

    placerl compare --config launch/configs/gsm8k_grpo.yaml \\
        --placements uniform,gradrank:proportional,gradrank:fixed,page --seeds 0,1 --steps 8 [key=value ...]

A placement is ``scorer[:alpha_policy]``: ``gradrank:proportional`` runs with
``placement.scorer=gradrank placement.alpha_policy=proportional``; without a policy the
config's ``placement.alpha_policy`` holds. Every run gets the same budget
(``placement.budget``, or ``--budget``; empty means the uniform baseline), the same
data order (``data.seed``) and, per seed, ``trainer.seed`` and ``placement.seed``.

Each run's plan is scored here first, so that the diagnostics can watch module types
the plan actually adapts (a DomLoRA plan adapts one module): the watched types are the
configured ``diagnostics.modules`` that the plan holds, or the plan's own types. A run
that fails (scoring, a rank above vLLM's cap, a crash) is recorded in the table with
its one-line error and the others go on.

Output under ``--out`` (default ``<logging.output_dir>/compare-<recipe>``): one run
folder per (placement, seed), and ``report/`` with ``report.md``, ``results.json`` and
PNG plots (accuracy with Wilson intervals, importance spread on LoRA gradients and on
G, assigned rank against importance shift).

With ``--resume``, finished runs are read back and unfinished ones continue from their
newest checkpoint (``trainer.save_every``) with their saved plan; the wall time of the
failed attempts is added to theirs.

Left out: running placements in parallel (the runs share the machine's cores) and
statistical tests between placements.

The experiment itself (scoring, training and summarising each run, the report) lives
in rl/experiments/compare.py; this file parses the command line and prints the table.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rl.config import ConfigError, load_config
from rl.data import DataError
from rl.experiments.compare import CompareOptions, run_overrides, run_placements, write_report

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)
DEFAULT_PLACEMENTS = "uniform,gradrank:proportional,gradrank:fixed,gradrank:rslora,page,plop,bmask,random"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="placerl compare", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a recipe under launch/configs/")
    ap.add_argument("--placements", default=DEFAULT_PLACEMENTS,
                    help="comma list of scorer[:alpha_policy][+key=value...], e.g. uniform+rank=1")
    ap.add_argument("--baseline", default="",
                    help="the placement every other one is compared with, problem by problem (default: the first)")
    ap.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: trainer.steps)")
    ap.add_argument("--budget", default=None, help="placement.budget for every run ('' = the uniform baseline)")
    ap.add_argument("--every", type=int, default=None, help="diagnostics every k steps (default 1)")
    ap.add_argument("--last", type=int, default=3, help="steps at the end whose mean reward is reported")
    ap.add_argument("--out", default="", help="folder for the runs (default <logging.output_dir>/compare-<recipe>)")
    ap.add_argument("--report", default="", help="folder for the report (default <out>/report)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse runs in --out that finished; resume unfinished ones from their newest checkpoint")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    return ap.parse_args(argv)


ARM_KEYS_FIXED = ("placement.scorer", "placement.seed", "placement.plan", "placement.alpha_policy")


def parse_placement(spec: str) -> tuple[str, str, str, tuple[str, ...]]:
    """``scorer[:alpha_policy][+key=value...]`` -> (label, scorer, alpha_policy, arm overrides).

    ``gradrank:proportional`` runs gradrank with alpha proportional to rank; ``uniform+rank=1``
    runs uniform LoRA at rank 1; ``bmask+budget=fraction=0.05`` gives bmask its own budget.
    A key without a dot is a ``placement`` key. The policy is '' when not given.
    """
    from placement import available_scorers
    from placement.settings import ALPHA_POLICIES

    head, *extras = spec.strip().split("+")
    scorer, _, policy = head.partition(":")
    known = available_scorers()
    if scorer not in known:
        raise ValueError(f"--placements entry {spec!r}: unknown scorer {scorer!r}; choose one of {', '.join(known)}")
    if policy and policy not in ALPHA_POLICIES:
        raise ValueError(f"--placements entry {spec!r}: alpha policy {policy!r} is not one of "
                         f"{', '.join(ALPHA_POLICIES)} (write scorer[:alpha_policy], e.g. gradrank:proportional)")
    arm = []
    for e in extras:
        key, eq, value = e.partition("=")
        key = key.strip() if "." in key else f"placement.{key.strip()}"
        if not eq or not key.startswith("placement.") or key in ARM_KEYS_FIXED:
            raise ValueError(f"--placements entry {spec!r}: {e!r} must be key=value for a placement key other than "
                             f"scorer, seed, plan and alpha_policy (e.g. uniform+rank=1, bmask+budget=fraction=0.05)")
        arm.append(f"{key}={value}")
    return spec.strip(), scorer, policy, tuple(arm)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r} must be a comma list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} must name at least one seed, each once")
    return seeds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    opts = CompareOptions(**vars(args))
    try:
        if args.steps is not None and args.steps < 1:
            raise ValueError("--steps must be >= 1")
        if args.every is not None and args.every < 1:
            raise ValueError("--every must be >= 1")
        specs = [parse_placement(s) for s in args.placements.split(",") if s.strip()]
        if not specs or len({s[0] for s in specs}) != len(specs):
            raise ValueError(f"--placements {args.placements!r} must name at least one placement, each once")
        seeds = parse_seeds(args.seeds)
        cfgs = [load_config(args.config, run_overrides(opts, spec[1], spec[2], seeds[0], Path("."), "check", spec[3]))
                for spec in specs]  # every arm's config is checked before anything runs
        cfg = cfgs[0]
        if args.baseline and args.baseline not in {s[0] for s in specs}:
            raise ValueError(f"--baseline {args.baseline!r} is not one of --placements")
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(cfg.logging.output_dir) / f"compare-{Path(args.config).stem}")
    results = []
    for res in run_placements(opts, specs, seeds, out):
        results.append(res)
        print(f"{res.placement} seed {res.seed}: " + ("ok" if res.ok else res.error), flush=True)
    report = Path(args.report) if args.report else out / "report"
    write_report(results, report, opts, argv, cfg, [s[0] for s in specs], seeds)
    print(f"report: {report / 'report.md'}")
    from rl.experiments.compare_report import placements_table, pool, sqrt_r_verdict

    rows = pool(results)
    print(placements_table(rows))
    for line in sqrt_r_verdict(rows):
        print(f"  {line}")
    return 0 if any(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
