"""What a run prints: placerl's own lines and one progress bar, unless ``logging.verbose``.

vLLM, Ray and transformers each print to the console by default: INFO records, a
progress bar per actor and per weight file, deprecation warnings from deep inside
their imports. A 4-step run printed hundreds of lines. Quiet (the default):

- the driver keeps placerl's INFO records and WARNING and above from everyone else;
- actors do not forward their output to the driver (Ray's ``log_to_driver``): it stays
  in Ray's log folder (``/tmp/ray/session_latest/logs``), and errors still reach the
  driver as the exceptions of the calls that failed;
- actors start with the libraries' own switches turned down (:func:`actor_env`), so
  those log files stay short too.

``logging.verbose=true`` turns all of it back on.
"""
from __future__ import annotations

import logging
import os
import warnings

# Environment of quiet actors: each library's documented switch.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and the hub's bars
    "TQDM_DISABLE": "1",  # every other tqdm bar (vLLM's weight loading); actors draw none of ours
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore",
}


def actor_env(verbose: bool) -> dict:
    """``runtime_env`` for an actor: the quiet environment, or nothing when verbose.

    Given per actor, so that it merges with a job's own runtime_env under ``ray job submit``.
    """
    return {} if verbose else {"env_vars": dict(QUIET_ENV)}


def configure(verbose: bool) -> None:
    """Console logging of this (driver) process."""
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s" if verbose else "%(message)s"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=fmt, force=True)
    logging.getLogger("placerl").setLevel(logging.INFO)
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    except ImportError:
        pass


def progress_fields(m: dict) -> dict[str, str]:
    """The progress bar's numbers for one step: reward, accuracy where a GSM8K reward runs, step time."""
    out = {}
    if "reward/mean" in m:
        out["reward"] = f"{m['reward/mean']:.3f}"
    if "reward/gsm8k_flexible/mean" in m:
        out["acc"] = f"{m['reward/gsm8k_flexible/mean']:.3f}"
    if "learner/loss" in m and "reward/mean" not in m:
        out["loss"] = f"{m['learner/loss']:.4f}"
    out["step"] = f"{m['time/step_s']:.1f}s"
    return out
