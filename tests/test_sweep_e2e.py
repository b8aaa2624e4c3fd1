"""`placerl learn sweep` for real on CPU: the tiny Llama, two arms x one seed as `learn arm`
processes (one at a time: no CUDA here), the base model evaluated for the summary, the table,
and a second sweep that finds both pairs evaluated and starts nothing. Also: a stopped sweep
ends each child's whole process group."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.experiments.sweep import CPU
from rl.experiments.sweep_runner import Child, start_child, stop_children

REPO = Path(__file__).resolve().parent.parent

ARMS = """\
common: [trainer.steps=1, trainer.save_every=1, rollout.eval_max_new_tokens=8, rollout.max_new_tokens=8,
         rollout.prompts_per_step=4, rollout.group_size=2, logging.progress=false, logging.tensorboard=false]
arms:
  uniform: []
  rank1: [placement.rank=1]
"""


def _sweep(out: Path, arms: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "launch.cli", "learn", "sweep", "--out", str(out), "--config",
                           "launch/configs/tiny.yaml", "--arms", str(arms), "--seeds", "0", "--budget-s", "600",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.timeout(1200)
def test_sweep_runs_two_arms_evaluates_them_and_skips_them_next_time(tiny_model_path, tmp_path):
    out, report, arms = tmp_path / "learning", tmp_path / "report", tmp_path / "arms.yaml"
    arms.write_text(ARMS)
    r = _sweep(out, arms, "--summary", str(report), "--reference", "uniform")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for arm in ("uniform", "rank1"):
        ev = json.loads((out / "arms" / arm / "seed-0" / "eval.json").read_text())
        assert ev["steps"] == 1 and ev["seed"] == 0 and ev["test"]["n"] == 64
        assert f"finish {arm} seed 0 on CPU: exit 0, evaluated" in r.stdout
        assert (out / "logs" / f"{arm}-s0.log").stat().st_size > 0
        row = next(line.split() for line in r.stdout.splitlines() if line.startswith(arm + " "))
        assert row[:4] == [arm, "0", "evaluated", "1"] and float(row[4]) == ev["test"]["accuracy_flexible"]
    # Seed-major order: uniform, then rank1; the base model first, for the summary.
    assert r.stdout.index("start base") < r.stdout.index("start uniform seed 0") < r.stdout.index("start rank1 seed 0")
    assert [line.split() for line in r.stdout.splitlines() if line.startswith("arm ")] == \
        [["arm", "seed", "status", "steps", "test", "flexible"]]
    s = json.loads((report / "summary.json").read_text())
    assert set(s["arms"]) == {"uniform", "rank1"} and s["steps"] == 1
    assert "placement.rank=1" in s["commands"]["arms"]["rank1"][0]

    again = _sweep(out, arms)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 evaluated before" in again.stdout and "start " not in again.stdout
    assert "placerl learn summary --out" in again.stdout  # the command to run, as no --summary was given
    assert sum(line.split()[2:4] == ["evaluated", "before"] for line in again.stdout.splitlines()) == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_stopping_a_child_ends_its_whole_process_group(tmp_path):
    # The child starts a grandchild, as `learn arm` starts Ray and vLLM processes.
    pid_file = tmp_path / "grandchild.pid"
    proc, log = start_child(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], CPU, tmp_path / "c.log")
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0) and os.getpgid(grandchild) == proc.pid
    stop_children([Child(None, proc, log, 0.0)], grace_s=5.0)
    assert proc.returncode is not None and not _alive(grandchild)
