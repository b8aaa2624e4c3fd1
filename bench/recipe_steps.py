"""Run a training recipe for a few steps, as the benchmarks do, and return its step metrics.

Evaluation, TensorBoard and progress bars are off; the run writes to a fresh temporary
folder; vLLM runs in-process. Shared by bench_grpo_step.py and bench_scorers.py so that
both time the same system the same way.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def recipe_step_metrics(recipe: str, overrides: list[str]) -> list[dict]:
    """The metrics rows of every step (those with ``time/step_s``) of ``recipe`` plus ``overrides``."""
    return recipe_run(recipe, overrides)[0]


def recipe_run(recipe: str, overrides: list[str]) -> tuple[list[dict], Path]:
    """As :func:`recipe_step_metrics`, and the run's folder (its profile, its checkpoints)."""
    from rl.config import load_config
    from rl.metrics_log import read_metrics
    from rl.rollout.vllm_settings import use_in_process_engine
    from rl.trainer import train

    use_in_process_engine()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(tempfile.mkdtemp(prefix="placerl-bench-"))
    cfg = load_config(REPO / recipe, ["trainer.eval_size=0", "logging.run_name=bench", f"logging.output_dir={out}",
                                      "logging.tensorboard=false", "logging.progress=false", *overrides])
    train(cfg, "bench")
    return [m for m in read_metrics(out / "bench") if "time/step_s" in m], out / "bench"
