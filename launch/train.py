"""Entry point of a training run: ``python -m launch.train --config FILE key=value ...``.

Runs the same way directly and as a Ray job (``ray job submit -- python -m
launch.train ...``): inside a job, ``$RAY_ADDRESS`` names the cluster and the driver
joins it; otherwise a private Ray starts on loopback. Configuration and data errors
are reported in one line before any actor starts.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from rl.config import ConfigError, load_config
from rl.data import DataError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="placerl train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a recipe under launch/configs/")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5 trainer.steps=20")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rl.console import configure

    configure(cfg.logging.verbose)
    from rl.learner.group import LearnerDied
    from rl.run_summary import summarize
    from rl.trainer import StartupError, train

    # `ray job stop` and a scheduler's kill send SIGTERM: end like Ctrl-C, so that a checkpoint
    # being written is discarded whole and the actors and reserved resources are released.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    try:
        run_dir = train(cfg, recipe=Path(args.config).stem)
    except StartupError as e:  # found while loading the model, data, plan or rewards
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LearnerDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summarize(run_dir, title=f"{Path(args.config).stem}: {cfg.trainer.steps} {cfg.algorithm.loss} steps of "
                                  f"{cfg.model.name} on {cfg.data.task}, run folder {run_dir}"), flush=True)
    return 0


def _stop(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
