"""Checkpoints are atomic: a crash mid-write leaves the previous one as the newest."""
import random

import pytest
import torch

from rl import checkpoint as ck


def _writer(payload):
    def write(d):
        import os
        os.makedirs(d)
        open(os.path.join(d, "w.txt"), "w").write(payload)
    return write


def test_save_resume_and_prune(tmp_path):
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, {"sampler": {"epoch": 0, "position": step}}, _writer(str(step)), keep=2)
    done = ck.complete_checkpoints(tmp_path)
    assert [p.name for p in done] == ["step-000002", "step-000003"]
    assert ck.resolve_resume("auto", tmp_path) == done[-1]
    assert ck.resolve_resume("never", tmp_path) is None
    assert ck.resolve_resume(str(tmp_path), "elsewhere") == done[-1]
    state = ck.load_driver_state(done[-1])
    assert state["step"] == 3 and state["sampler"]["position"] == 3


def test_crash_mid_write_keeps_previous(tmp_path):
    ck.save_checkpoint(tmp_path, 1, {}, _writer("1"))

    def crash(d):
        _writer("partial")(d)
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the learner state

    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, {}, crash)
    assert ck.latest_checkpoint(tmp_path).name == "step-000001"
    # the half-written temporary is never mistaken for a checkpoint and is cleaned next time
    ck.save_checkpoint(tmp_path, 3, {}, _writer("3"), keep=5)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step-000001", "step-000003"]


def test_incomplete_folder_is_refused(tmp_path):
    (tmp_path / "step-000009").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.load_driver_state(tmp_path / "step-000009")


def test_rng_state_round_trip(tmp_path):
    ck.save_checkpoint(tmp_path, 1, {}, _writer("x"))
    expected = (random.random(), torch.rand(3))
    ck.set_rng_state(ck.load_driver_state(ck.latest_checkpoint(tmp_path))["rng"])
    got = (random.random(), torch.rand(3))
    assert expected[0] == got[0] and torch.equal(expected[1], got[1])
