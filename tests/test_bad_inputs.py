"""Every bad input ends in one line naming the field and the fix, before Ray or any actor starts.

``rl.cluster.init_ray`` is replaced by a tripwire: reaching it means the run got as far
as starting a cluster with an input that could have been rejected first.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from launch import train as train_cli
from rl import cluster

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")


@pytest.fixture
def run(tmp_path, monkeypatch, capsys, tiny_model_path):
    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was reported")

    monkeypatch.setattr(cluster, "init_ray", tripwire)

    def call(*overrides: str) -> str:
        rc = train_cli.main(["--config", TINY, f"logging.output_dir={tmp_path}", "logging.run_name=bad",
                             "logging.progress=false", *overrides])
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error: ")]
        assert rc == 2 and len(errors) == 1, err[-20:]
        assert "Traceback" not in "\n".join(err)
        return errors[0]
    return call


def test_a_target_module_that_matches_nothing(run):
    line = run("placement.target_modules=[q_proj,nope_proj]")
    assert "placement.target_modules=['nope_proj'] match no Linear module" in line and "q_proj" in line


def test_a_rank_above_the_rollout_cap_is_refused_before_scoring(run):
    line = run("placement.rank=32")
    assert "placement.rank=32" in line and "rollout.max_lora_rank=16" in line


def test_a_budget_too_small_for_one_module(run):
    line = run("placement.scorer=page", "placement.budget=params=10", "placement.probe_samples=2")
    assert "placement.budget" in line and "raise" in line


def test_a_missing_plan_file(run, tmp_path):
    line = run(f"placement.plan={tmp_path / 'no-plan.json'}")
    assert "placement.plan=" in line and "no such file" in line and "placerl score" in line


def test_a_data_path_that_does_not_exist(run, tmp_path):
    line = run("data.task=gsm8k", f"data.path={tmp_path / 'nowhere'}")
    assert "does not exist; set data.path" in line


def test_a_model_that_is_nowhere(run):
    line = run("model.name=no-such-org/no-such-model")
    assert "model.name='no-such-org/no-such-model' is not a local folder, a .gguf file, a builtin" in line


def test_a_run_folder_in_use(run, tmp_path):
    from rl.checkpoint import RunLock

    lock = RunLock(tmp_path / "bad")
    try:
        line = run()
    finally:
        lock.release()
    assert "is in use by pid" in line and "logging.run_name" in line


def test_gsm8k_neither_on_the_hub_nor_shipped(monkeypatch, tmp_path):
    from rl import bundled, data

    monkeypatch.delenv(data.ENV_DIR, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(bundled, "GSM8K", tmp_path / "absent")
    with pytest.raises(data.DataError, match=r"not reachable on the hub .* set data.path or \$PLACERL_GSM8K_DIR"):
        data.load_gsm8k("train")


def test_overlap_where_the_rollout_sleeps_on_the_learners_gpu(run, monkeypatch):
    import torch

    # A GPU host as the start-up checks see it: colocated ranks and workers share a GPU, so the
    # rollout sleeps (vLLM sleep mode) whenever the learner steps and nothing could overlap.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    line = run("trainer.max_staleness=1", "cluster.gpus_per_learner_rank=1", "cluster.gpus_per_rollout_worker=1")
    assert "trainer.max_staleness=1 cannot overlap rollout and learning here" in line
    assert "set trainer.max_staleness=0, or cluster.colocate=false" in line
