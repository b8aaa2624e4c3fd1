"""The SFT-versus-GRPO regime experiment: two controlled runs, then the contrast report.

Two runs that differ only in ``algorithm.loss`` (``sft`` trains on the gold solutions,
``grpo`` on sampled completions and rewards), both with gradient diagnostics on, are
written under one folder (``sft/`` and ``grpo/``); the GRPO run reuses the SFT run's
placement plan file so that both train exactly the same adapters from the same
initialisation. The report folder gets ``report.md``, ``contrasts.json`` and PNG plots
(the numbers come from rl/experiments/regime_report.py, the figures from
rl/experiments/plots.py).

With ``resume`` a run that died continues from its newest checkpoint; a finished run
is reused.

Left out: the command line (launch/regime.py parses it and prints the outcome) and
several seeds per regime.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rl.config import ConfigError, load_config
from rl.data import DataError

REGIMES = ("sft", "grpo")


@dataclass
class RegimeOptions:
    """What ``placerl regime`` was asked for (the command line's fields, one for one)."""
    config: str
    overrides: list[str] = field(default_factory=list)
    steps: int | None = None
    every: int | None = None
    out: str = ""
    report: str = ""
    resume: bool = False


class RegimeRunError(Exception):
    """One regime's run stopped on a configuration or data error; the message names the regime."""


def regime_overrides(opts: RegimeOptions, loss: str, out: Path, plan: str = "") -> list[str]:
    """The user's overrides, then what makes the two runs a controlled pair (these win)."""
    extra = [f"algorithm.loss={loss}", "diagnostics.enabled=true", f"logging.output_dir={out}",
             f"logging.run_name={loss}", f"trainer.resume={'auto' if opts.resume else 'never'}"]
    if opts.steps is not None:
        extra.append(f"trainer.steps={opts.steps}")
    user_every = any(o.startswith("diagnostics.every=") for o in opts.overrides)
    if opts.every is not None or not user_every:
        extra.append(f"diagnostics.every={opts.every or 1}")
    if plan:
        extra.append(f"placement.plan={plan}")
    return [*opts.overrides, *extra]


def prepare_run_dir(run_dir: Path, resume: bool) -> bool:
    """True if a finished run can be reused. Without ``resume`` an earlier run of ours is
    cleared (metrics.jsonl appends); with it, an unfinished run is left for the trainer to resume."""
    if resume and (run_dir / "final_eval.json").exists():
        return True
    if run_dir.exists() and not resume:
        if not (run_dir / "config.yaml").exists():
            raise ValueError(f"--out: {run_dir} exists and is not a run folder; choose another --out")
        shutil.rmtree(run_dir)
    return False


def setup_lines(cfg, step_time: dict[str, float], argv: list[str]) -> list[str]:
    p, r, d = cfg.placement, cfg.rollout, cfg.diagnostics
    return [f"command: `placerl regime {' '.join(argv)}`",
            f"model: {cfg.model.name}; task: {cfg.data.task}; seed {cfg.trainer.seed} (data order seed {cfg.data.seed})",
            f"steps: {cfg.trainer.steps}; prompts per step: {r.prompts_per_step}; GRPO group size: {r.group_size}; "
            f"max new tokens: {r.max_new_tokens}; learning rate {cfg.learner.lr}",
            f"placement: scorer {p.scorer}, rank {p.rank}, alpha {p.alpha} ({p.alpha_policy}), budget "
            f"{p.budget or 'uniform baseline'}, modules {', '.join(p.target_modules)}; the same plan file for both runs",
            f"diagnostics: every {d.every} step(s) on modules {', '.join(d.modules)}; cosine lags {d.lags}, "
            f"sign window {d.window}",
            "training time (sum of logged step times, start-up excluded): "
            + ", ".join(f"{k.upper()} {v:.0f} s" for k, v in step_time.items())]


def write_report(out: Path, report: Path, cfg, argv: list[str]) -> list:
    from rl.diagnostics import records as dr
    from rl.experiments import regime_report as rr
    from rl.experiments import plots as report_plots
    from rl.metrics_log import read_metrics

    sft, grpo = (dr.last_per_step(read_metrics(out / regime)) for regime in REGIMES)
    contrasts = rr.regime_contrasts(sft, grpo)
    step_time = {regime: sum(r.get("time/step_s", 0.0) for r in recs) for regime, recs in zip(REGIMES, (sft, grpo))}
    report.mkdir(parents=True, exist_ok=True)
    plots = [report_plots.regime_statistics(sft, grpo, report), report_plots.regime_importance(sft, grpo, report)]
    title = f"Gradient regimes: SFT vs GRPO on {cfg.model.name} ({cfg.data.task}, {cfg.trainer.steps} steps)"
    (report / "report.md").write_text(rr.markdown(contrasts, sft, grpo, title=title,
                                                  setup=setup_lines(cfg, step_time, argv), plots=plots))
    summary = [{"statistic": c.statistic.key, "gradient": c.kind, "sft": c.sft, "grpo": c.grpo,
                "captures": [c.n_sft, c.n_grpo], "papers_higher": c.statistic.papers_higher, "went": c.went,
                "agrees": c.agrees, "sentence": c.sentence} for c in contrasts]
    (report / "contrasts.json").write_text(json.dumps({"contrasts": summary, "tally": rr.tally(contrasts),
                                                       "step_time_s": step_time}, indent=1, default=str))
    return contrasts


def out_dir(opts: RegimeOptions, base_cfg) -> Path:
    """The folder for both runs: ``--out``, else ``<logging.output_dir>/regime-<recipe>``."""
    return Path(opts.out or Path(base_cfg.logging.output_dir) / f"regime-{Path(opts.config).stem}")


def train_regimes(opts: RegimeOptions, out: Path, cfgs: dict) -> dict:
    """Train SFT, then GRPO on the SFT run's plan (the same adapters, ranks and A initialisation);
    finished runs are reused under ``resume``. Returns the config of each regime."""
    from rl.trainer import train

    for loss in REGIMES:
        try:
            if loss == "grpo":
                cfgs["grpo"] = load_config(opts.config, regime_overrides(opts, "grpo", out, str(out / "sft" / "plan.json")))
            run_dir = out / loss
            if prepare_run_dir(run_dir, opts.resume):
                print(f"{loss}: reusing {run_dir}")
                continue
            train(cfgs[loss], recipe=loss)
        except (ConfigError, DataError, ValueError) as e:
            raise RegimeRunError(f"{loss} run: {e}") from e
    return cfgs
