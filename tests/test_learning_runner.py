"""`placerl learn` end to end on the tiny Llama: base eval, an arm stopped by its budget and
resumed, its evaluation, and summary.json's shape. Each phase runs as its own process, as
on a GPU host (each arm starts and stops its own Ray)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(1500)

COMMON = ["trainer.steps=2", "trainer.save_every=1", "data.val_size=16", "rollout.eval_max_new_tokens=8",
          "rollout.max_new_tokens=8", "rollout.prompts_per_step=4", "rollout.group_size=2",
          "logging.progress=false", "logging.tensorboard=false"]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, **kw)


def _learn(*args: str) -> subprocess.CompletedProcess:
    return _run(["-m", "launch.cli", "learn", *args])


def test_learn_base_arm_budget_resume_and_summary(tiny_model_path, tmp_path):
    out, report = tmp_path / "learning", tmp_path / "report"
    config = "launch/configs/tiny.yaml"
    r = _learn("base", "--out", str(out), "--config", config, *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    base = json.loads((out / "base" / "eval.json").read_text())
    assert (base["val"]["n"], base["test"]["n"]) == (16, 64)  # synthetic: 256 train rows, the last 16 are val
    again = _learn("base", "--out", str(out), "--config", config, *COMMON)
    assert again.returncode == 0 and "cached" in again.stdout

    # A zero budget: the first chunk (one step) always runs, then the call stops at its checkpoint.
    code = ("from rl.experiments.learning import run_arm; import sys; "
            f"sys.exit(run_arm({config!r}, {COMMON + ['learner.lr=1e-3']!r}, {str(out)!r}, 'lr1e-3', 0, "
            "budget_s=0.0, start_s=0.0, close_s=0.0) != 'training')")
    r = _run(["-c", code])
    assert r.returncode == 0, r.stderr[-3000:]
    folder = out / "arms" / "lr1e-3" / "seed-0"
    assert [p.name for p in (folder / "run" / "checkpoints").glob("step-*")] == ["step-000001"]
    assert not (folder / "eval.json").exists()

    # Different settings than the ones the folder was started with: one line, nothing runs.
    bad = _learn("arm", "--out", str(out), "--config", config, "--arm", "lr1e-3", *COMMON, "data.val_size=8")
    assert bad.returncode == 2 and "data" in bad.stderr and "another --out" in bad.stderr

    r = _learn("arm", "--out", str(out), "--config", config, "--arm", "lr1e-3", "--budget-s", "3000",
               *COMMON, "learner.lr=1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "time/step_s" in m] == [1, 2]  # resumed at step 1, not redone
    driver = json.loads((folder / "run" / "checkpoints" / "step-000002" / "driver.json").read_text())
    # The sampler draws from the 240 train rows only (the val rows are not in its range),
    # and continues where the stopped call left it: 2 steps x 4 prompts.
    assert driver["sampler"]["size"] == 240 and driver["sampler"]["position"] == 8
    ev = json.loads((folder / "eval.json").read_text())
    assert len((folder / "completions-test.jsonl").read_text().splitlines()) == 64
    assert ev["train_rows"] == 240 and ev["steps"] == 2 and ev["test"]["n"] == 64
    calls = json.loads((folder / "calls.json").read_text())
    assert [(c["steps_before"], c["steps_after"]) for c in calls] == [(0, 1), (1, 2)]

    r = _learn("summary", "--out", str(out), "--report", str(report))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((report / "summary.json").read_text())
    assert s["model"] == "tiny-llama" and s["n_test"] == 64 and s["n_val"] == 16 and s["steps"] == 2
    assert set(s["base"]) >= {"flexible", "strict"} and all(0 <= s["base"][k] <= 1 for k in ("flexible", "strict"))
    arm = s["arms"]["lr1e-3"]
    assert arm["seeds"] == [0] and len(arm["flexible"]) == len(arm["strict"]) == 1
    assert all(0 <= x <= 1 for x in arm["flexible"] + arm["strict"] + arm["val_flexible"])
    assert arm["flexible"][0] == ev["test"]["accuracy_flexible"]
    d = arm["paired_vs_base_flexible"][0]
    assert d["lo"] <= d["diff"] <= d["hi"] and d["n"] == 64
    pooled = arm["paired_vs_base_pooled"]["flexible"]
    assert pooled["n"] == 64 and pooled["seeds"] == 1 and pooled["diff"] == pytest.approx(d["diff"])
    assert s["selection"]["chosen"] == "lr1e-3" and "validation" in s["selection"]["rule"]
    assert s["command"].startswith("placerl learn summary") and "learner.lr=1e-3" in s["commands"]["arms"]["lr1e-3"][0]
    text = (report / "README.md").read_text()
    assert "| lr1e-3 (chosen) | 0 | 2 |" in text and (report / "reward_curves.png").stat().st_size > 0
    assert len((report / "problems" / "lr1e-3-seed-0-test.jsonl").read_text().splitlines()) == 64
