"""The SFT-versus-GRPO regime experiment: controlled pairs of runs per seed, a fixed-policy
control, then the contrast report.

Per seed, two runs that differ only in ``algorithm.loss`` (``sft`` trains on the gold
solutions, ``grpo`` on sampled completions and rewards), both with gradient diagnostics
on, are written under ``<out>/seed<N>/`` (``sft/`` and ``grpo/``); the GRPO run reuses
the SFT run's placement plan file so that both train exactly the same adapters from the
same initialisation. A seed sets ``trainer.seed``, ``placement.seed`` and ``data.seed``.

Matched by default: a GRPO step trains ``prompts_per_step x group_size`` sequences, so the
SFT run trains that many gold solutions per step (``rollout.prompts_per_step`` scaled up),
not one per prompt; the tokens per step that result are reported for both. Gold solutions
and sampled completions differ in length, so matched sequences are not matched tokens: with
``loss_tokens`` (``--loss-tokens N``) both runs train on at most N loss tokens per step
(``learner.loss_token_cap``, the longest rows' tails masked first), equal wherever both regimes
have that many. Every linear module type is watched (``diagnostics.modules``, unless
overridden) at every step.

The fixed-policy control (rl/experiments/fixed_policy.py) measures, before training, the
cosine and sign agreement between independent batches of each regime at step 0. Its
batches are whole steps of sequences: the loss-token cap does not reach its probe's loss.

The report folder gets ``report.md``, ``contrasts.json`` and PNG plots (the numbers come
from rl/experiments/regime_report.py, the figures from rl/experiments/plots.py).

With ``resume`` a run that died continues from its newest checkpoint; a finished run
(and a finished control) is reused.

Left out: the command line (launch/regime.py parses it and prints the outcome).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core.lora import DEFAULT_TARGET_MODULES
from rl.config import ConfigError, load_config
from rl.data import DataError

REGIMES = ("sft", "grpo")
CONTROL_FILE = "fixed_policy.json"


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
    seeds: str = "0"
    unmatched: bool = False  # SFT at prompts_per_step sequences per step (the old, unmatched pair)
    control_batches: int = 4  # independent step-0 batches per regime for the fixed-policy control; 0: none
    loss_tokens: int = 0  # learner.loss_token_cap for both regimes (equal loss tokens per step); 0: no cap

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(x) for x in self.seeds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seeds {self.seeds!r} must be a comma list of integers, e.g. 0,1,2") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds {self.seeds!r} must name at least one seed, each once")
        return seeds


class RegimeRunError(Exception):
    """One regime's run stopped on a configuration or data error; the message names the regime."""


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def regime_overrides(opts: RegimeOptions, loss: str, out: Path, plan: str = "", seed: int = 0,
                     base_cfg=None) -> list[str]:
    """The user's overrides, then what makes the two runs a controlled pair (these win).
    ``base_cfg`` (the recipe with the user's overrides) sizes the matched SFT batch."""
    extra = [f"algorithm.loss={loss}", "diagnostics.enabled=true", f"logging.output_dir={seed_dir(out, seed)}",
             f"logging.run_name={loss}", f"trainer.resume={'auto' if opts.resume else 'never'}",
             f"trainer.seed={seed}", f"placement.seed={seed}", f"data.seed={seed}"]
    if opts.steps is not None:
        extra.append(f"trainer.steps={opts.steps}")
    user_every = any(o.startswith("diagnostics.every=") for o in opts.overrides)
    if opts.every is not None or not user_every:
        extra.append(f"diagnostics.every={opts.every or 1}")
    if not any(o.startswith("diagnostics.modules=") for o in opts.overrides):
        extra.append(f"diagnostics.modules=[{','.join(DEFAULT_TARGET_MODULES)}]")
    if loss == "sft" and not opts.unmatched and base_cfg is not None:
        r = base_cfg.rollout
        extra.append(f"rollout.prompts_per_step={r.prompts_per_step * r.group_size}")
    if opts.loss_tokens:
        extra.append(f"learner.loss_token_cap={opts.loss_tokens}")  # both regimes: equal tokens per step
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


def setup_lines(cfgs: dict[str, object], seeds: list[int], per_step: dict[str, dict], argv: list[str]) -> list[str]:
    cfg = cfgs["grpo"]
    p, r, d = cfg.placement, cfg.rollout, cfg.diagnostics
    cap = cfg.learner.loss_token_cap
    capped = [f"loss tokens capped at {cap} per step in both regimes (`--loss-tokens`, learner.loss_token_cap: "
              "the longest rows' tail tokens masked first); steps at the cap, tokens removed per step: " + "; ".join(
                  f"{k.upper()} {v['steps_at_cap']}/{v['steps']}, {v['capped_tokens']:.0f}"
                  for k, v in per_step.items())] if cap else []
    return [f"command: `placerl regime {' '.join(argv)}`",
            f"model: {cfg.model.name}; task: {cfg.data.task}; seeds {', '.join(map(str, seeds))} "
            "(each sets trainer.seed, placement.seed and data.seed; SFT and GRPO share it)",
            f"steps: {cfg.trainer.steps}; GRPO: {r.prompts_per_step} prompts x group size {r.group_size}; "
            f"SFT: {cfgs['sft'].rollout.prompts_per_step} gold solutions per step; max new tokens: "
            f"{r.max_new_tokens}; learning rate {cfg.learner.lr}",
            "per step (mean over steps and seeds): " + "; ".join(
                f"{k.upper()} {v['sequences']:.0f} sequences, {v['tokens']:.0f} loss tokens "
                f"(min {v['tokens_min']:.0f}, max {v['tokens_max']:.0f})" for k, v in per_step.items()),
            *capped,
            f"placement: scorer {p.scorer}, rank {p.rank}, alpha {p.alpha} ({p.alpha_policy}), budget "
            f"{p.budget or 'uniform baseline'}, modules {', '.join(p.target_modules)}; one plan file per seed for both runs",
            f"diagnostics: every {d.every} step(s) on modules {', '.join(d.modules)}; cosine lags {d.lags}, "
            f"sign window {d.window} non-zero captures",
            "training time (sum of logged step times over seeds, start-up excluded): "
            + ", ".join(f"{k.upper()} {v['time_s']:.0f} s" for k, v in per_step.items())]


def per_step_sizes(records: dict[str, list[list[dict]]], cfgs: dict) -> dict[str, dict]:
    """Sequences and loss tokens per step (mean, min, max; the steps that trained exactly the
    loss-token cap and the mean it removed), and the summed step time, per regime over all seeds."""
    out = {}
    for loss, runs in records.items():
        tokens = [r["learner/tokens"] for recs in runs for r in recs if "learner/tokens" in r]
        capped = [r.get("learner/capped_tokens", 0.0) for recs in runs for r in recs if "learner/tokens" in r]
        r, cap = cfgs[loss].rollout, cfgs[loss].learner.loss_token_cap
        nan = float("nan")
        out[loss] = {"sequences": r.prompts_per_step * (r.group_size if loss == "grpo" else 1),
                     "tokens": sum(tokens) / len(tokens) if tokens else nan,
                     "tokens_min": min(tokens, default=nan), "tokens_max": max(tokens, default=nan),
                     "capped_tokens": sum(capped) / len(capped) if capped else nan,
                     "steps": len(tokens), "steps_at_cap": sum(t == cap for t in tokens) if cap else 0,
                     "time_s": sum(x.get("time/step_s", 0.0) for recs in runs for x in recs)}
    return out


def write_report(out: Path, report: Path, cfgs: dict, seeds: list[int], argv: list[str],
                 control: dict | None = None) -> list:
    from rl.diagnostics import records as dr
    from rl.experiments import regime_report as rr
    from rl.experiments import plots as report_plots
    from rl.metrics_log import read_metrics

    runs = {loss: [dr.last_per_step(read_metrics(seed_dir(out, s) / loss)) for s in seeds] for loss in REGIMES}
    window = cfgs["grpo"].diagnostics.window
    contrasts = rr.seeded_contrasts(list(zip(runs["sft"], runs["grpo"])), window=window)
    per_step = per_step_sizes(runs, cfgs)
    report.mkdir(parents=True, exist_ok=True)
    sft, grpo = runs["sft"][0], runs["grpo"][0]
    plots = [report_plots.regime_statistics(sft, grpo, report), report_plots.regime_importance(sft, grpo, report)]
    cfg = cfgs["grpo"]
    title = (f"Gradient regimes: SFT vs GRPO on {cfg.model.name} ({cfg.data.task}, {cfg.trainer.steps} steps, "
             f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    (report / "report.md").write_text(rr.markdown(contrasts, runs["sft"], runs["grpo"], title=title,
                                                  setup=setup_lines(cfgs, seeds, per_step, argv), plots=plots,
                                                  control=control))
    summary = [rr.contrast_record(c) for c in contrasts]
    (report / "contrasts.json").write_text(json.dumps({"seeds": seeds, "contrasts": summary,
                                                       "tally": rr.tally(contrasts), "per_step": per_step,
                                                       "fixed_policy_control": control}, indent=1, default=str))
    return contrasts


def out_dir(opts: RegimeOptions, base_cfg) -> Path:
    """The folder for all runs: ``--out``, else ``<logging.output_dir>/regime-<recipe>``."""
    return Path(opts.out or Path(base_cfg.logging.output_dir) / f"regime-{Path(opts.config).stem}")


def regime_config(opts: RegimeOptions, loss: str, out: Path, seed: int, sft_done: bool = True):
    """One regime's config. GRPO trains on the SFT run's plan file; before the SFT run has
    written it (``sft_done=False``: the up-front check and the control), the GRPO config is
    loaded without it, since a plan path that does not exist yet is refused at load."""
    base = load_config(opts.config, opts.overrides)
    sft_plan = seed_dir(out, seed) / "sft" / "plan.json"
    plan = str(sft_plan) if loss == "grpo" and (sft_done or sft_plan.exists()) else ""
    return load_config(opts.config, regime_overrides(opts, loss, out, plan, seed, base))


def run_control(opts: RegimeOptions, out: Path, cfgs: dict) -> dict | None:
    """The fixed-policy control for both regimes (seed of the first run), or None when switched off."""
    if opts.control_batches == 0:
        return None
    path = out / CONTROL_FILE
    if opts.resume and path.exists():
        return json.loads(path.read_text())
    from rl.data import attach_prompts, load_task
    from rl.experiments.fixed_policy import control
    from core.models import load_tokenizer, resolve_model

    cfg = cfgs["grpo"]
    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    rows = attach_prompts(load_task(cfg.data, "train"), load_tokenizer(model_path), cfg.data)
    try:
        result = {loss: control(cfgs[loss], loss, model_path, rows, opts.control_batches, cfg.trainer.seed)
                  for loss in REGIMES}
    except (ConfigError, DataError, ValueError) as e:
        raise RegimeRunError(f"fixed-policy control: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def train_regimes(opts: RegimeOptions, out: Path) -> dict:
    """Per seed, train SFT, then GRPO on the SFT run's plan (the same adapters, ranks and A
    initialisation); finished runs are reused under ``resume``. Returns the last seed's configs."""
    from rl.trainer import train

    cfgs = {}
    for seed in opts.seed_list():
        for loss in REGIMES:
            try:
                cfgs[loss] = regime_config(opts, loss, out, seed)
                run_dir = seed_dir(out, seed) / loss
                if prepare_run_dir(run_dir, opts.resume):
                    print(f"seed {seed} {loss}: reusing {run_dir}")
                    continue
                train(cfgs[loss], recipe=loss)
            except (ConfigError, DataError, ValueError) as e:
                raise RegimeRunError(f"seed {seed} {loss} run: {e}") from e
    return cfgs
