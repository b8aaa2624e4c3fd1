"""End to end: `ray job submit` of the tiny recipe, resume, a killed rollout worker.

These start real Ray clusters, real vLLM engines and real FSDP2 learners on loopback,
so each takes tens of seconds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
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
pytestmark = pytest.mark.slow

# Ports of our own head, away from Ray's defaults so that it cannot meet another cluster.
GCS, DASH, CLIENT, AGENT_HTTP, AGENT_GRPC, METRICS = 6391, 8275, 9011, 52375, 52376, 52377


def _ray_env() -> dict:
    # A loopback-only head: Ray 2.60's default token auth would need the token passed to
    # every client, which buys nothing when only this machine can reach the head.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head(tiny_model_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = _ray_env()
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={GCS}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={DASH}", f"--ray-client-server-port={CLIENT}",
                    f"--dashboard-agent-listen-port={AGENT_HTTP}", f"--dashboard-agent-grpc-port={AGENT_GRPC}",
                    f"--metrics-export-port={METRICS}", "--num-cpus=4", "--object-store-memory=300000000",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{DASH}"
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _submit(address: str, overrides: list[str], config: str = "tiny") -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--working-dir", str(REPO), "--runtime-env", str(REPO / "launch/runtime_env.yaml"), "--",
           "python", "-m", "launch.train", "--config", f"launch/configs/{config}.yaml", *overrides]
    return subprocess.run(cmd, env=_ray_env(), capture_output=True, text=True, timeout=600)


def test_ray_job_submit_writes_checkpoint_then_resumes(ray_head, tmp_path):
    out = [f"logging.output_dir={tmp_path}", "logging.run_name=job", "trainer.save_every=2",
           "trainer.eval_size=4", "logging.progress=false"]
    first = _submit(ray_head, out + ["trainer.steps=2"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "run folder" in first.stdout and "succeeded" in first.stdout
    run = tmp_path / "job"
    ckpt = run / "checkpoints" / "step-000002"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "learner" / "adapter_config.json").exists()
    state = json.loads((ckpt / "driver.json").read_text())
    assert state["sampler"]["position"] == 2 * 4  # two steps of four prompts
    assert (run / "config.yaml").exists() and (run / "plan.json").exists()

    second = _submit(ray_head, out + ["trainer.steps=4"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(run) if "learner/loss" in m or "learner/skipped" in m]
    assert steps == [1, 2, 3, 4]  # the resumed run appended steps 3-4, it did not redo 1-2
    # Each process reports its start-up (Ray, actors, engines) with the first step it takes.
    started = [m["step"] for m in read_metrics(run) if m.get("time/startup_s", 0) > 0]
    assert started == [1, 3]
    # On CPU each version is served merged into the weights (rl/rollout/merged.py): every sync
    # times its merge and says what float32 kept of the update (tests/test_sync.py the math).
    trained = [m for m in read_metrics(run) if "learner/loss" in m]
    assert all(0 <= m["rollout/merged_update_error"] < 0.01 and m["time/sync_merge_s"] > 0 for m in trained)
    final = json.loads((run / "checkpoints" / "step-000004" / "driver.json").read_text())
    assert final["sampler"]["position"] == 4 * 4 and final["adapter_version"] > state["adapter_version"]


def test_quickstart_job_ends_with_a_summary_and_a_reward_curve(ray_head, tmp_path):
    # The README's first command, on the tiny model: GSM8K from the copy shipped in the
    # package (no hub here), evaluation before and after, the summary printed and written.
    r = _submit(ray_head, [f"logging.output_dir={tmp_path}", "model.name=tiny-llama", "trainer.steps=2",
                           "trainer.eval_size=4", "rollout.max_new_tokens=16", "rollout.eval_max_new_tokens=16"],
                config="quickstart")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "quickstart"
    summary = (run / "summary.txt").read_text()
    assert summary.strip() in r.stdout  # printed as written
    for needle in ("before", "after", "test accuracy", "train reward", "step time", "rollout", "learner",
                   str(run / "metrics.jsonl"), str(run / "tensorboard"), str(run / "checkpoints"),
                   str(run / "reward_curve.png")):
        assert needle in summary, (needle, summary)
    assert (run / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    # Quiet by default: no vLLM records ("INFO 11-29 22:58:08 [file.py:1]"), no actor
    # output ("(LearnerRank pid=1)"), one progress bar.
    assert not re.search(r"(INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[", r.stdout), r.stdout[-3000:]
    assert " pid=" not in r.stdout and "Loading weights" not in r.stdout, r.stdout[-3000:]


def test_bad_override_fails_before_the_job_starts_anything(ray_head, tmp_path):
    r = _submit(ray_head, ["learner.lrr=1"])
    assert r.returncode != 0
    assert "did you mean 'learner.lr'" in r.stdout + r.stderr


def test_killed_rollout_worker_is_replaced_and_the_run_finishes(ray_local, tmp_path, tiny_model_path):
    import ray

    from rl.trainer import Trainer

    cfg = load_config(TINY, [f"logging.output_dir={tmp_path}", "logging.run_name=kill", "trainer.steps=4",
                             "trainer.eval_size=0", "logging.progress=false", "logging.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "kill")
    killed = threading.Event()

    def killer():
        while not read_metrics(tmp_path / "kill"):
            time.sleep(0.2)
        ray.kill(trainer.rollout.workers[0], no_restart=True)
        killed.set()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert killed.is_set()
    metrics = read_metrics(tmp_path / "kill")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["rollout/worker_restarts"] >= 1
