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
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

from rl.config import ConfigError, load_config
from rl.data import DataError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)
DEFAULT_PLACEMENTS = "uniform,gradrank:proportional,gradrank:fixed,gradrank:rslora,page,plop,bmask,random"
RUN_FILE = "compare_run.json"
PARTIAL_FILE = "compare_partial.json"  # wall time spent by attempts that did not finish


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="placerl compare", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a recipe under launch/configs/")
    ap.add_argument("--placements", default=DEFAULT_PLACEMENTS, help="comma list of scorer[:alpha_policy]")
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


def parse_placement(spec: str) -> tuple[str, str, str]:
    """``gradrank:proportional`` -> (label, scorer, alpha_policy); the policy is '' when not given."""
    from placement import available_scorers
    from placement.settings import ALPHA_POLICIES

    scorer, _, policy = spec.strip().partition(":")
    known = available_scorers()
    if scorer not in known:
        raise ValueError(f"--placements entry {spec!r}: unknown scorer {scorer!r}; choose one of {', '.join(known)}")
    if policy and policy not in ALPHA_POLICIES:
        raise ValueError(f"--placements entry {spec!r}: alpha policy {policy!r} is not one of "
                         f"{', '.join(ALPHA_POLICIES)} (write scorer[:alpha_policy], e.g. gradrank:proportional)")
    return spec.strip(), scorer, policy


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r} must be a comma list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} must name at least one seed, each once")
    return seeds


def run_name(label: str, seed: int) -> str:
    return f"{label.replace(':', '-')}-s{seed}"


def run_overrides(args, scorer: str, policy: str, seed: int, out: Path, name: str) -> list[str]:
    extra = [f"placement.scorer={scorer}", f"trainer.seed={seed}", f"placement.seed={seed}",
             "diagnostics.enabled=true", f"logging.output_dir={out}", f"logging.run_name={name}",
             f"trainer.resume={'auto' if args.resume else 'never'}"]
    if policy:
        extra.append(f"placement.alpha_policy={policy}")
    if args.steps is not None:
        extra.append(f"trainer.steps={args.steps}")
    if args.budget is not None:
        extra.append(f"placement.budget={args.budget}")
    if args.every is not None or not any(o.startswith("diagnostics.every=") for o in args.overrides):
        extra.append(f"diagnostics.every={args.every or 1}")
    return [*args.overrides, *extra]


def watched_types(patterns: list[str], plan_modules: list[str]) -> list[str]:
    """The configured diagnostics patterns that match a planned module, else the plan's module types."""
    hit = [p for p in patterns if any(m == p or m.endswith("." + p) for m in plan_modules)]
    return hit or sorted({m.rsplit(".", 1)[-1] for m in plan_modules})


def score_plan(cfg, path: Path):
    """The plan the trainer would build, scored here (same code path) and saved to ``path``."""
    from rl.data import attach_prompts, load_task
    from rl.models import load_tokenizer, resolve_model
    from rl.trainer import make_plan

    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    rows = attach_prompts(load_task(cfg.data, "train"), load_tokenizer(model_path), cfg.data)
    plan, _ = make_plan(cfg, model_path, rows)  # also checks every rank against vLLM's cap
    plan.save(path)
    return plan


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_one(args, label: str, scorer: str, policy: str, seed: int, out: Path):
    """Score, train and summarise one (placement, seed); errors come back in the result."""
    from rl.experiments import compare_report as cr
    from rl.diagnostics import records as dr
    from rl.metrics_log import read_metrics
    from rl.trainer import train

    name = run_name(label, seed)
    run_dir = out / name
    done, partial, scored = run_dir / RUN_FILE, run_dir / PARTIAL_FILE, run_dir / "scored_plan.json"
    prior, t = 0.0, time.perf_counter()
    try:
        if args.resume and done.exists() and (run_dir / "final_eval.json").exists():
            info = json.loads(done.read_text())
        else:
            if run_dir.exists() and not args.resume:
                if not (run_dir / "config.yaml").exists() and not scored.exists():
                    raise ValueError(f"--out: {run_dir} exists and is not a run folder; choose another --out")
                shutil.rmtree(run_dir)  # metrics.jsonl appends: a stale run would mix in
            if args.resume and partial.exists():
                prior = json.loads(partial.read_text())["wall_s"]
            overrides = run_overrides(args, scorer, policy, seed, out, name)
            cfg = load_config(args.config, overrides)
            if args.resume and scored.exists():  # an unfinished run: its plan, then its newest checkpoint
                from placement import PlacementPlan

                plan = PlacementPlan.load(scored)
            else:
                plan = score_plan(cfg, scored)
            modules = watched_types(list(cfg.diagnostics.modules), plan.module_names())
            cfg = load_config(args.config, [*overrides, f"placement.plan={scored}",
                                            f"diagnostics.modules=[{','.join(modules)}]"])
            train(cfg, recipe=name)
            info = {"wall_s": prior + time.perf_counter() - t, "score_s": plan.seconds, "modules": modules}
            done.write_text(json.dumps(info))
        plan = json.loads((run_dir / "plan.json").read_text())
        params = plan.get("trainable_params") or 0
        records = dr.last_per_step(read_metrics(run_dir))
        return cr.run_result(label, seed, records, plan, params=int(params), wall_s=info["wall_s"],
                             module_types=info["modules"], last=args.last, run_dir=str(run_dir))
    except Exception as e:  # one run's failure is a row of the table, not the end of the comparison
        logging.getLogger("placerl").exception("compare: %s seed %d failed", label, seed)
        if run_dir.exists():  # a resumed attempt adds its time to this one's
            partial.write_text(json.dumps({"wall_s": prior + time.perf_counter() - t}))
        return cr.RunResult(label, seed, error=one_line(e), run_dir=str(run_dir))
    finally:
        _reset_ray()


_RAY_WAS_UP: list[bool] = []  # whether a Ray was running before this command started one


def _reset_ray() -> None:
    """Each run gets a fresh Ray (a failed run may leave actors behind), unless the Ray was
    there before this command: then it belongs to the caller and stays up."""
    try:
        import ray

        if ray.is_initialized() and not _RAY_WAS_UP[0]:
            ray.shutdown()
    except Exception:  # noqa: BLE001 - cleanup must not mask the run's own error
        pass


def setup_lines(args, argv: list[str], cfg, placements: list[str], seeds: list[int]) -> list[str]:
    p, r, d = cfg.placement, cfg.rollout, cfg.diagnostics
    budget = args.budget if args.budget is not None else p.budget
    return [f"command: `placerl compare {' '.join(argv)}`",
            f"model: {cfg.model.name}; task: {cfg.data.task}; data order seed {cfg.data.seed} (the same for every run)",
            f"placements: {', '.join(placements)}; seeds: {', '.join(map(str, seeds))} "
            "(trainer.seed and placement.seed)",
            f"budget: {budget or 'the uniform baseline'} (uniform rank {p.rank}, alpha {p.alpha}; "
            f"default alpha policy {p.alpha_policy})",
            f"steps: {args.steps or cfg.trainer.steps}; prompts per step {r.prompts_per_step}; group size "
            f"{r.group_size}; max new tokens {r.max_new_tokens}; learning rate {cfg.learner.lr}",
            f"evaluation: greedy on {cfg.trainer.eval_size} test problems, {r.eval_max_new_tokens} new tokens at most; "
            f"reward column: mean of the last {args.last} steps",
            f"diagnostics: every {d.every} step(s) on {', '.join(d.modules)} "
            "(narrowed to the types a plan adapts)",
            "wall time includes scoring the placement"]


def write_report(results, report: Path, args, argv, cfg, placements, seeds) -> None:
    from rl.experiments import compare_report as cr
    from rl.experiments import plots as report_plots

    report.mkdir(parents=True, exist_ok=True)
    rows = cr.pool(results)
    plots = [report_plots.compare_accuracy(rows, report), report_plots.compare_spread(rows, report)]
    shift = report_plots.compare_rank_shift(results, report)
    if shift:
        plots.append(shift)
    title = f"Placements under one budget: {cfg.model.name} ({cfg.data.task}, {args.steps or cfg.trainer.steps} steps)"
    (report / "report.md").write_text(cr.markdown(results, title=title, plots=plots,
                                                  setup=setup_lines(args, argv, cfg, placements, seeds)))

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    (report / "results.json").write_text(json.dumps(clean([dataclasses.asdict(r) for r in results]), indent=1))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.steps is not None and args.steps < 1:
            raise ValueError("--steps must be >= 1")
        if args.every is not None and args.every < 1:
            raise ValueError("--every must be >= 1")
        specs = [parse_placement(s) for s in args.placements.split(",") if s.strip()]
        if not specs or len({s[0] for s in specs}) != len(specs):
            raise ValueError(f"--placements {args.placements!r} must name at least one placement, each once")
        seeds = parse_seeds(args.seeds)
        cfg = load_config(args.config, run_overrides(args, specs[0][1], specs[0][2], seeds[0], Path("."), "check"))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(cfg.logging.output_dir) / f"compare-{Path(args.config).stem}")
    import ray

    _RAY_WAS_UP[:] = [ray.is_initialized()]
    results = []
    for label, scorer, policy in specs:
        for seed in seeds:
            res = run_one(args, label, scorer, policy, seed, out)
            results.append(res)
            print(f"{label} seed {seed}: " + ("ok" if res.ok else res.error), flush=True)
    report = Path(args.report) if args.report else out / "report"
    write_report(results, report, args, argv, cfg, [s[0] for s in specs], seeds)
    print(f"report: {report / 'report.md'}")
    from rl.experiments.compare_report import placements_table, pool, sqrt_r_verdict

    rows = pool(results)
    print(placements_table(rows))
    for line in sqrt_r_verdict(rows):
        print(f"  {line}")
    return 0 if any(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
