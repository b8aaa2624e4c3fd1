"""Checkpoints are atomic and durable: a crash, a signal or an OS crash mid-write leaves the
previous one as the newest, re-saving never opens a window without one, and one run owns
its folder."""
import json
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

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


def test_every_file_the_marker_and_the_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the files behind descriptors")
    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(a), str(b)))
        real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = ck.save_checkpoint(tmp_path, 1, {}, _writer("x"))
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    tmp = events[publish][1]
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    written = [str(Path(tmp) / p.relative_to(final)) for p in final.rglob("*")] + [tmp]
    assert set(written) <= synced_before, sorted(set(written) - synced_before)
    assert str(Path(tmp) / ck.MARKER) in synced_before
    assert ("fsync", str(final.parent)) in events[publish + 1:]  # the rename itself reaches the disk


def _crashing_rmtree(path, *args, **kwargs):
    """Power lost while deleting: every file is unlinked, the folders are not."""
    if not os.path.exists(path):
        return
    for here, _, files in os.walk(path):
        for name in files:
            os.unlink(os.path.join(here, name))
    raise KeyboardInterrupt


def test_resaving_a_step_has_no_moment_without_a_complete_copy(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, {"v": "old"}, _writer("old"))
    monkeypatch.setattr(ck.shutil, "rmtree", _crashing_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 1, {"v": "new"}, _writer("new"))
    monkeypatch.undo()
    newest = ck.latest_checkpoint(tmp_path)
    assert newest is not None, "the re-save deleted the only copy of step 1"
    state = ck.load_driver_state(newest)
    assert (newest / "learner" / "w.txt").read_text() == state["v"]  # one whole copy, old or new, never a mix


def test_pruning_leaves_temporaries_of_live_and_foreign_processes(tmp_path):
    root = tmp_path / "checkpoints"
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = root / f".tmp-step-000005-{host}-{sleeper.pid}"
        dead_tmp = root / f".tmp-step-000005-{host}-{dead.pid}"
        foreign = root / ".tmp-step-000005-another-host-1"
        for d in (live_tmp, dead_tmp, foreign):
            d.mkdir(parents=True)
        ck.save_checkpoint(tmp_path, 6, {}, _writer("x"))
        assert live_tmp.exists(), "pruning deleted a live process's checkpoint in progress"
        assert foreign.exists() and not dead_tmp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_resume_state_is_json_and_tensors_never_a_pickle(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, {}, _writer("x"))
    done = ck.latest_checkpoint(tmp_path)
    assert not list(done.rglob("*.pkl"))
    json.loads((done / "rng.json").read_text())

    def refuse(*a, **k):
        raise AssertionError("a resume read a pickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    expected = (random.random(), torch.rand(3))
    ck.set_rng_state(ck.load_driver_state(done)["rng"])
    assert (random.random(), torch.rand(3))[0] == expected[0]


_HOLD = """
import sys, time
from rl.checkpoint import RunLock
lock = RunLock(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_the_same_folder_is_refused_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ck.RunInUse, match=rf"in use by pid {holder.pid} on .*choose another logging.run_name"):
            ck.RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock = ck.RunLock(tmp_path)  # the OS dropped the dead holder's lock
    lock.release()


def test_where_the_os_cannot_swap_folders_the_old_copy_is_found_aside(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, {"v": "old"}, _writer("old"))
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(a, b):  # the process dies between moving the old copy aside and the new one in
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 1, {"v": "new"}, _writer("new"))
    monkeypatch.undo()
    newest = ck.latest_checkpoint(tmp_path)
    assert newest is not None and newest.name.startswith(".replaced-step-000001")
    assert ck.load_driver_state(newest)["v"] == "old" and (newest / "learner" / "w.txt").read_text() == "old"


def test_a_crash_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, {}, _writer(str(step)), keep=5)

    def crash_in_subfolders(path, *args, **kwargs):  # the learner's files go first, the marker stays
        for here, _, files in os.walk(path):
            if here != str(path):
                for name in files:
                    os.unlink(os.path.join(here, name))
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.shutil, "rmtree", crash_in_subfolders)
    with pytest.raises(KeyboardInterrupt):
        ck.prune(tmp_path / "checkpoints", keep=1)
    monkeypatch.undo()
    for p in ck.complete_checkpoints(tmp_path):  # whatever is listed is whole
        assert (p / "learner" / "w.txt").exists(), f"{p.name} is listed as complete but lost its files"
    assert ck.latest_checkpoint(tmp_path).name == "step-000002"


def test_metrics_rewind_to_the_resumed_step_drops_lost_work_and_torn_lines(tmp_path):
    from types import SimpleNamespace

    from rl.metrics_log import MetricsLog, read_metrics

    log = MetricsLog(tmp_path, SimpleNamespace(tensorboard=False, wandb=False))
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log._fh.write('{"step": 4, "lo')  # a crash in the middle of a line
    log._fh.flush()
    log.rewind(2)
    log.log(3, {"loss": 30.0})
    log.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
