"""Faults injected on purpose into real runs (tiny Llama, real Ray, vLLM, FSDP2 on loopback):
nothing is lost, nothing is left held, and the same command carries on.

- start-up fails after Ray resources were reserved: they are given back;
- a learner rank is killed mid-step: one clear message, and the same command resumes from
  the last complete checkpoint at the same data position;
- SIGTERM (what `ray job stop` sends) while a checkpoint is written: the half-written one
  is discarded, the previous one stays complete and is the one resumed;
- a reward that segfaults its worker process (in the same run as the killed learner): the
  run goes on, the failures are counted.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rl.config import load_config
from rl.metrics_log import read_metrics

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "launch" / "configs" / "tiny.yaml"
FNS = REPO / "tests" / "data" / "reward_fns.py"
pytestmark = pytest.mark.slow

QUIET = ["trainer.eval_size=0", "logging.progress=false", "logging.tensorboard=false"]


def _free_cpus(ray) -> float:
    return ray.available_resources().get("CPU", 0.0)


def test_startup_failure_after_reserving_gives_everything_back(ray_local, tmp_path, monkeypatch):
    from rl.checkpoint import RunLock
    from rl.rollout import pool
    from rl.trainer import Trainer

    ray = ray_local
    free = _free_cpus(ray)

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected: the rollout engine failed to start")

    monkeypatch.setattr(pool.RolloutPool, "__init__", broken)
    cfg = load_config(TINY, [f"logging.output_dir={tmp_path}", *QUIET])
    with pytest.raises(RuntimeError, match="injected"):
        Trainer(cfg, tmp_path / "run")
    deadline = time.monotonic() + 30
    while _free_cpus(ray) < free and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _free_cpus(ray) == free, "the placement group or the learner actors are still held"
    RunLock(tmp_path / "run").release()  # and the run folder is free again


def test_learner_killed_mid_step_stops_clearly_and_the_same_command_resumes(ray_local, tmp_path, tiny_model_path,
                                                                           caplog):
    from rl.learner.group import LearnerDied
    from rl.trainer import Trainer

    ray = ray_local
    run = tmp_path / "kill"
    cfg = load_config(TINY, [f"logging.output_dir={tmp_path}", "logging.run_name=kill", "trainer.steps=3",
                             "trainer.save_every=1", "reward.executor=process", "reward.workers=2",
                             "reward.timeout_s=30", *QUIET])
    # The same run also meets a reward that segfaults its worker process on its first call.
    marker = tmp_path / "crashed-once"
    cfg.reward.functions = [{"name": "gsm8k_flexible", "weight": 1.0},
                            {"name": f"{FNS}:segfaults_once", "weight": 0.5, "kwargs": {"marker": str(marker)}}]
    trainer = Trainer(cfg, run)
    saved = run / "checkpoints" / "step-000002" / "COMPLETE"

    def killer():
        while not saved.exists():
            time.sleep(0.01)
        ray.kill(trainer.learner.ranks[0], no_restart=True)  # step 3 is under way

    threading.Thread(target=killer, daemon=True).start()
    try:
        with pytest.raises(LearnerDied) as err:
            trainer.fit()
    finally:
        trainer.close()
    msg = str(err.value)
    assert "learner rank 0 died" in msg and "during step 3" in msg and "step-000002 (step 2)" in msg
    assert "run the same command again to resume" in msg and "\n" not in msg

    position = json.loads((saved.parent / "driver.json").read_text())["sampler"]
    again = Trainer(cfg, run)  # the same command
    try:
        with caplog.at_level(logging.INFO, logger="placerl"):
            again.fit()
    finally:
        again.close()
    assert f"resumed from {saved.parent} at step 2" in caplog.text
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]  # step 3 once, steps 1-2 not redone
    assert all(m["rollout/staleness"] == 0.0 for m in metrics)  # the synchronous loop: always on-policy
    assert position["position"] == 2 * cfg.rollout.prompts_per_step
    # The segfaulting reward: counted on step 1, its samples ungraded; the run went on regardless.
    assert marker.exists() and metrics[0]["reward/segfaults_once/errors"] > 0
    assert metrics[0]["reward/failed_samples"] > 0 and metrics[1]["reward/failed_samples"] == 0
    final = json.loads((run / "checkpoints" / "step-000003" / "driver.json").read_text())
    assert final["sampler"]["position"] == 3 * cfg.rollout.prompts_per_step


# Runs the real command in a child process whose learner is stopped by SIGTERM, sent to the
# process itself right after the learner's files of step 2 are written (before the marker).
_SIGTERM_DURING_SAVE = """
import os, signal, sys
from rl.learner.group import LearnerGroup
from launch import train

real_save = LearnerGroup.save
def save(self, directory):
    real_save(self, directory)
    if "step-000002" in directory:
        os.kill(os.getpid(), signal.SIGTERM)
LearnerGroup.save = save
sys.exit(train.main(sys.argv[1:]))
"""


def _train(args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "launch.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_sigterm_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_model_path):
    args = ["--config", str(TINY), f"logging.output_dir={tmp_path}", "logging.run_name=term", "trainer.steps=2",
            "trainer.save_every=1", "cluster.num_cpus=3", *QUIET]
    stopped = _train(args, _SIGTERM_DURING_SAVE)
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    ckpts = tmp_path / "term" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001"]  # no half-written step 2 left
    assert "stopped at step 2; the last complete checkpoint is" in stopped.stderr
    assert str(ckpts / "step-000001") in stopped.stderr

    resumed = _train(args)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / 'step-000001'} at step 1" in resumed.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "term")] == [1, 2]
    state = json.loads((ckpts / "step-000002" / "driver.json").read_text())
    assert state["sampler"]["position"] == 2 * 4
