"""``placerl regime``: SFT and GRPO on the same model, data, placement and seeds, then a report.

    placerl regime --config launch/configs/gsm8k_grpo.yaml --steps 30 --seeds 0,1,2 [key=value ...]

Per seed, two runs that differ only in ``algorithm.loss`` (``sft`` trains on the gold
solutions, ``grpo`` on sampled completions and rewards), with the same number of
sequences per step (``--unmatched``: SFT trains one gold solution per prompt), at most ``--loss-tokens``
loss tokens per step in both (0, the default: no cap; see below), every
linear module type watched at every step (``--every``), written under
``--out``/seed<N>/ (``sft/`` and ``grpo/``); the GRPO run reuses the SFT run's placement
plan file. Before training, the fixed-policy control measures the cosine between
``--control-batches`` independent step-0 batches of each regime (0 skips it). The
report folder (``--report``, default ``<out>/report``) gets ``report.md``,
``contrasts.json`` and PNG plots: per statistic the seed-level mean with its 95%
bootstrap CI, its chance level, and the GRPO-minus-SFT difference's CI, against the
papers' claims.

Gold solutions and sampled completions differ in length, so equal sequences are not equal
tokens. ``--loss-tokens N`` caps both regimes' steps at N loss tokens
(``learner.loss_token_cap``: the longest rows lose their tail tokens first), so the two train
on the same tokens per step wherever both have at least N; choose N at or below the smaller
regime's usual tokens per step (the report's setup lists each regime's mean, min and max)::

    placerl regime --config launch/configs/gsm8k_grpo.yaml --steps 30 --seeds 0,1,2 --loss-tokens 4000

With ``--resume`` a run that died (a lost Ray node, an out-of-memory kill) continues
from its newest checkpoint (``trainer.save_every``); finished runs and the control are
reused.

The experiment itself (the runs, the control and the report) lives in
rl/experiments/regime.py; this file parses the command line and prints the outcome.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rl.config import ConfigError, load_config
from rl.data import DataError
from rl.experiments.regime import (REGIMES, RegimeOptions, RegimeRunError, out_dir, regime_config, run_control,
                                   train_regimes, write_report)

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="placerl regime", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a recipe under launch/configs/")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to both runs, e.g. rollout.group_size=4")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per regime (default: trainer.steps)")
    ap.add_argument("--every", type=int, default=None,
                    help="capture gradients every k steps (default 1, or diagnostics.every when overridden)")
    ap.add_argument("--out", default="", help="folder for both runs (default <logging.output_dir>/regime-<recipe>)")
    ap.add_argument("--report", default="", help="folder for the report (default <out>/report)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse runs in --out that finished; resume unfinished ones from their newest checkpoint")
    ap.add_argument("--seeds", default="0", help="comma list of seeds; each runs both regimes (default 0)")
    ap.add_argument("--unmatched", action="store_true",
                    help="SFT trains prompts_per_step gold solutions per step instead of prompts_per_step x group_size")
    ap.add_argument("--loss-tokens", type=int, default=0, metavar="N",
                    help="at most this many loss tokens per step in both regimes (learner.loss_token_cap; the "
                         "longest rows' tails go first), so they train on equal tokens; 0: no cap (default)")
    ap.add_argument("--control-batches", type=int, default=4,
                    help="independent step-0 batches per regime for the fixed-policy control (0: skip it)")
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
    if args.control_batches == 1 or args.control_batches < 0:
        print("error: --control-batches must be 0 (no control) or >= 2", file=sys.stderr)
        return 2
    if args.loss_tokens < 0:
        print("error: --loss-tokens must be >= 0 (0: no cap; N: at most N loss tokens per step)", file=sys.stderr)
        return 2
    opts = RegimeOptions(**vars(args))
    try:
        seeds = opts.seed_list()
        out = out_dir(opts, load_config(args.config, args.overrides))
        first = {loss: regime_config(opts, loss, out, seeds[0], sft_done=False) for loss in REGIMES}
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        control = run_control(opts, out, first)
        cfgs = train_regimes(opts, out)
    except RegimeRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = Path(args.report) if args.report else out / "report"
    contrasts = write_report(out, report, cfgs, seeds, argv, control)
    print(f"runs:   {out}/seed<N>/sft, grpo for seeds {', '.join(map(str, seeds))}")
    print(f"report: {report / 'report.md'}")
    for c in contrasts:
        print(f"  {c.sentence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
