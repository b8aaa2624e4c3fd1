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

The experiment itself (the two runs and the report) lives in rl/experiments/regime.py;
this file parses the command line and prints the outcome.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rl.config import ConfigError, load_config
from rl.data import DataError
from rl.experiments.regime import (RegimeOptions, RegimeRunError, out_dir, regime_overrides, train_regimes,
                                   write_report)

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)


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
    opts = RegimeOptions(**vars(args))
    try:
        out = out_dir(opts, load_config(args.config, args.overrides))
        cfgs = {"sft": load_config(args.config, regime_overrides(opts, "sft", out))}
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfgs = train_regimes(opts, out, cfgs)
    except RegimeRunError as e:
        print(f"error: {e}", file=sys.stderr)
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
