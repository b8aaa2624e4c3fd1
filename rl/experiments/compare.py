"""The placement comparison: one scored, trained and summarised run per (placement, seed), then the report.

A placement is (scorer, alpha policy); every run gets the same budget, the same data
order and, per seed, ``trainer.seed`` and ``placement.seed``. Each run's plan is scored
here first, so that the diagnostics watch module types the plan actually adapts. A run
that fails is a row of the table with its one-line error; the others go on. The report
(``report.md``, ``results.json``, PNG plots) takes its numbers from
rl/experiments/compare_report.py and its figures from rl/experiments/plots.py.

With ``resume``, finished runs are read back and unfinished ones continue from their
newest checkpoint with their saved plan; the wall time of failed attempts is added.

Left out: the command line (launch/compare.py parses it and prints the table) and
running placements in parallel (the runs share the machine's cores).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rl.config import load_config

RUN_FILE = "compare_run.json"
PARTIAL_FILE = "compare_partial.json"  # wall time spent by attempts that did not finish


@dataclass
class CompareOptions:
    """What ``placerl compare`` was asked for (the command line's fields, one for one)."""
    config: str
    placements: str = ""
    seeds: str = "0"
    steps: int | None = None
    budget: str | None = None
    every: int | None = None
    last: int = 3
    out: str = ""
    report: str = ""
    resume: bool = False
    baseline: str = ""  # the placement the others are paired with (default: the first)
    overrides: list[str] = field(default_factory=list)


def run_name(label: str, seed: int) -> str:
    return f"{label.replace(':', '-').replace('+', '_').replace('=', '')}-s{seed}"


def run_overrides(opts: CompareOptions, scorer: str, policy: str, seed: int, out: Path, name: str,
                  arm: tuple[str, ...] = ()) -> list[str]:
    """The user's overrides, what every run of the comparison shares, then the arm's own
    placement keys (``uniform+rank=1``), which win."""
    extra = [f"placement.scorer={scorer}", f"trainer.seed={seed}", f"placement.seed={seed}",
             "diagnostics.enabled=true", f"logging.output_dir={out}", f"logging.run_name={name}",
             f"trainer.resume={'auto' if opts.resume else 'never'}"]
    if policy:
        extra.append(f"placement.alpha_policy={policy}")
    if opts.steps is not None:
        extra.append(f"trainer.steps={opts.steps}")
    if opts.budget is not None:
        extra.append(f"placement.budget={opts.budget}")
    if opts.every is not None or not any(o.startswith("diagnostics.every=") for o in opts.overrides):
        extra.append(f"diagnostics.every={opts.every or 1}")
    return [*opts.overrides, *extra, *arm]


def watched_types(patterns: list[str], plan_modules: list[str]) -> list[str]:
    """The configured diagnostics patterns that match a planned module, else the plan's module types."""
    hit = [p for p in patterns if any(m == p or m.endswith("." + p) for m in plan_modules)]
    return hit or sorted({m.rsplit(".", 1)[-1] for m in plan_modules})


def score_plan(cfg, path: Path):
    """The plan the trainer would build, scored here (same code path) and saved to ``path``."""
    from rl.data import attach_prompts, load_task
    from core.models import load_tokenizer, resolve_model
    from rl.trainer import make_plan

    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    rows = attach_prompts(load_task(cfg.data, "train"), load_tokenizer(model_path), cfg.data)
    plan, _ = make_plan(cfg, model_path, rows)  # also checks every rank against vLLM's cap
    plan.save(path)
    return plan


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_one(opts: CompareOptions, label: str, scorer: str, policy: str, seed: int, out: Path,
            arm: tuple[str, ...] = ()):
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
        if opts.resume and done.exists() and (run_dir / "final_eval.json").exists():
            info = json.loads(done.read_text())
        else:
            if run_dir.exists() and not opts.resume:
                if not (run_dir / "config.yaml").exists() and not scored.exists():
                    raise ValueError(f"--out: {run_dir} exists and is not a run folder; choose another --out")
                shutil.rmtree(run_dir)  # metrics.jsonl appends: a stale run would mix in
            if opts.resume and partial.exists():
                prior = json.loads(partial.read_text())["wall_s"]
            overrides = run_overrides(opts, scorer, policy, seed, out, name, arm)
            cfg = load_config(opts.config, overrides)
            if opts.resume and scored.exists():  # an unfinished run: its plan, then its newest checkpoint
                from placement import PlacementPlan

                plan = PlacementPlan.load(scored)
            else:
                plan = score_plan(cfg, scored)
            modules = watched_types(list(cfg.diagnostics.modules), plan.module_names())
            cfg = load_config(opts.config, [*overrides, f"placement.plan={scored}",
                                            f"diagnostics.modules=[{','.join(modules)}]"])
            train(cfg, recipe=name)
            info = {"wall_s": prior + time.perf_counter() - t, "score_s": plan.seconds, "modules": modules}
            done.write_text(json.dumps(info))
        plan = json.loads((run_dir / "plan.json").read_text())
        params = plan.get("trainable_params") or 0
        records = dr.last_per_step(read_metrics(run_dir))
        return cr.run_result(label, seed, records, plan, params=int(params), wall_s=info["wall_s"],
                             module_types=info["modules"], last=opts.last, run_dir=str(run_dir))
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


def setup_lines(opts: CompareOptions, argv: list[str], cfg, placements: list[str], seeds: list[int]) -> list[str]:
    p, r, d = cfg.placement, cfg.rollout, cfg.diagnostics
    budget = opts.budget if opts.budget is not None else p.budget
    return [f"command: `placerl compare {' '.join(argv)}`",
            f"model: {cfg.model.name}; task: {cfg.data.task}; data order seed {cfg.data.seed} (the same for every run)",
            f"placements: {', '.join(placements)}; seeds: {', '.join(map(str, seeds))} "
            "(trainer.seed and placement.seed)",
            f"budget: {budget or 'the uniform baseline'} (uniform rank {p.rank}, alpha {p.alpha}; "
            f"default alpha policy {p.alpha_policy})",
            f"steps: {opts.steps or cfg.trainer.steps}; prompts per step {r.prompts_per_step}; group size "
            f"{r.group_size}; max new tokens {r.max_new_tokens}; learning rate {cfg.learner.lr}",
            f"evaluation: greedy on {cfg.trainer.eval_size} test problems, {r.eval_max_new_tokens} new tokens at most; "
            f"reward column: mean of the last {opts.last} steps",
            f"diagnostics: every {d.every} step(s) on {', '.join(d.modules)} "
            "(narrowed to the types a plan adapts)",
            "wall time includes scoring the placement"]


def per_problem_marks(results) -> dict[str, list[dict[str, list[float]]]]:
    """Placement -> per seed, the final evaluation's 0/1 marks (strict, flexible) of each finished run."""
    from rl.trainer import EVAL_PROBLEMS_FILE

    out: dict[str, list] = {}
    for r in results:
        path = Path(r.run_dir) / EVAL_PROBLEMS_FILE
        if r.ok and path.exists():
            out.setdefault(r.placement, []).append(json.loads(path.read_text()))
    return out


def write_report(results, report: Path, opts: CompareOptions, argv, cfg, placements, seeds) -> None:
    from rl.experiments import compare_report as cr
    from rl.experiments import plots as report_plots

    report.mkdir(parents=True, exist_ok=True)
    rows = cr.pool(results)
    plots = [report_plots.compare_accuracy(rows, report), report_plots.compare_spread(rows, report)]
    shift = report_plots.compare_rank_shift(results, report)
    if shift:
        plots.append(shift)
    title = f"Placements under one budget: {cfg.model.name} ({cfg.data.task}, {opts.steps or cfg.trainer.steps} steps)"
    paired = cr.paired_against(per_problem_marks(results), opts.baseline or placements[0])
    md = cr.markdown(results, title=title, plots=plots, setup=setup_lines(opts, argv, cfg, placements, seeds))
    md += "\n## Paired against the baseline\n\n" + cr.paired_table(paired) + "\n"
    (report / "report.md").write_text(md)
    (report / "paired.json").write_text(json.dumps(paired, indent=1))

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    (report / "results.json").write_text(json.dumps(clean([dataclasses.asdict(r) for r in results]), indent=1))


def run_placements(opts: CompareOptions, specs: list[tuple[str, str, str, tuple]], seeds: list[int], out: Path):
    """Each (placement, seed) in turn; yields its result as soon as it is done."""
    import ray

    _RAY_WAS_UP[:] = [ray.is_initialized()]
    for label, scorer, policy, arm in specs:
        for seed in seeds:
            yield run_one(opts, label, scorer, policy, seed, out, arm)
