"""``placerl regime``: SFT and GRPO on the same model, data, placement and seed, then a report.

    placerl regime --config launch/configs/gsm8k_grpo.yaml --steps 10 [--every 1] [key=value ...]

Two runs that differ only in ``algorithm.loss`` (``sft`` trains on the gold solutions,
``grpo`` on sampled completions and rewards), both with gradient diagnostics on, are
written under ``--out`` (``sft/`` and ``grpo/``); the GRPO run reuses the SFT run's
placement plan file so that both train exactly the same adapters from the same
initialisation. The report folder (``--report``, default ``<out>/report``) gets
``report.md``, ``contrasts.json`` and PNG plots: effective rank, stable rank,
cross-step cosine, sign agreement and importance spread for the rank-free G and for
the LoRA gradients, side by side, with the direction of each contrast stated against
the papers' claims.

With ``--resume`` a run that died (a lost Ray node, an out-of-memory kill) continues
from its newest checkpoint (``trainer.save_every``); a step logged twice keeps its
last record.

Left out: several seeds per regime (run the command again with ``trainer.seed=N``),
and GRPO variants beyond what overrides express.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from rl.config import ConfigError, load_config
from rl.data import DataError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)
REGIMES = ("sft", "grpo")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="placerl regime", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a recipe under launch/configs/")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per regime (default: trainer.steps)")
    ap.add_argument("--every", type=int, default=None,
                    help="capture gradients every k steps (default 1, or diagnostics.every when overridden)")
    ap.add_argument("--out", default="", help="folder for both runs (default <logging.output_dir>/regime-<recipe>)")
    ap.add_argument("--report", default="", help="folder for the report (default <out>/report)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse runs in --out that finished; resume unfinished ones from their newest checkpoint")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to both runs, e.g. rollout.group_size=4")
    return ap.parse_args(argv)


def regime_overrides(args, loss: str, out: Path, plan: str = "") -> list[str]:
    """The user's overrides, then what makes the two runs a controlled pair (these win)."""
    extra = [f"algorithm.loss={loss}", "diagnostics.enabled=true", f"logging.output_dir={out}",
             f"logging.run_name={loss}", f"trainer.resume={'auto' if args.resume else 'never'}"]
    if args.steps is not None:
        extra.append(f"trainer.steps={args.steps}")
    user_every = any(o.startswith("diagnostics.every=") for o in args.overrides)
    if args.every is not None or not user_every:
        extra.append(f"diagnostics.every={args.every or 1}")
    if plan:
        extra.append(f"placement.plan={plan}")
    return [*args.overrides, *extra]


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.steps is not None and args.steps < 2:
        print("error: --steps must be >= 2 (cross-step statistics need two captures)", file=sys.stderr)
        return 2
    if args.every is not None and args.every < 1:
        print("error: --every must be >= 1", file=sys.stderr)
        return 2
    try:
        base = load_config(args.config, args.overrides)
        out = Path(args.out or Path(base.logging.output_dir) / f"regime-{Path(args.config).stem}")
        cfgs = {"sft": load_config(args.config, regime_overrides(args, "sft", out))}
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rl.trainer import train

    for loss in REGIMES:
        try:
            if loss == "grpo":  # the SFT run's plan: the same adapters, ranks and A initialisation
                cfgs["grpo"] = load_config(args.config, regime_overrides(args, "grpo", out, str(out / "sft" / "plan.json")))
            run_dir = out / loss
            if prepare_run_dir(run_dir, args.resume):
                print(f"{loss}: reusing {run_dir}")
                continue
            train(cfgs[loss], recipe=loss)
        except (ConfigError, DataError, ValueError) as e:
            print(f"error: {loss} run: {e}", file=sys.stderr)
            return 2
    report = Path(args.report) if args.report else out / "report"
    contrasts = write_report(out, report, cfgs["grpo"], argv)
    print(f"runs:   {out / 'sft'}  {out / 'grpo'}")
    print(f"report: {report / 'report.md'}")
    for c in contrasts:
        print(f"  {c.sentence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
