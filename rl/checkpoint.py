"""Durable, resumable checkpoints of a run, and the lock that keeps one run per run folder.

A checkpoint is a folder ``<run>/checkpoints/step-000042`` holding the learner's state
(``learner/``: the adapter in PEFT format, optimizer and scheduler), the driver's state
(``driver.json``: step, data position, adapter version) and the driver's RNG states
(``rng.json``). Nothing a resume reads is a pickle: JSON, safetensors, and tensors that
``torch.load(weights_only=True)`` reads, so a checkpoint folder cannot run code.

Durability, in the order a save happens:
1. everything is written under a temporary name ``.tmp-step-N-<host>-<pid>``;
2. the ``COMPLETE`` marker is written last; every file, the marker and every folder
   are fsynced, so an OS crash or power cut cannot publish a folder whose data is
   still in the page cache;
3. the folder is renamed into place and the checkpoints folder is fsynced. Re-saving
   a step that exists swaps the two folders in one ``renameat2(RENAME_EXCHANGE)``
   call, so there is no moment without a complete ``step-N`` (where the OS lacks it,
   the old copy is renamed aside first and a resume still finds it there).
Pruning renames a folder out of the ``step-*`` namespace before deleting it, so a
crash mid-delete never leaves a half-deleted folder that looks complete, and it
removes a temporary only when it belongs to a dead process of this host.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import torch

MARKER = "COMPLETE"
_ASIDE = (".tmp-step-", ".replaced-step-", ".deleting-step-")  # prefixes of our temporaries
log = logging.getLogger(__name__)


class RunInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


# ----------------------------------------------------------------------------- fsync, rename

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first, ``root`` last."""
    for here, dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(here) / name)
        _fsync_path(Path(here))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2); False where the OS cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot
        return False
    raise OSError(err, os.strerror(err), str(a))


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _owned_by_dead_process(name: str) -> bool:
    """True for a temporary of this host whose writing process has exited."""
    host_pid = name.split("-", 3)[-1]  # <prefix>-step-<N>-<host>-<pid>, host may hold dashes
    host, _, pid = host_pid.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's (a shared filesystem) or an unknown name: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


# ----------------------------------------------------------------------------- RNG as JSON

def rng_state() -> dict:
    """The driver's RNG states as plain JSON-able lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ----------------------------------------------------------------------------- save, find, prune

def save_checkpoint(run_dir: str | Path, step: int, driver_state: dict,
                    write_learner: Callable[[str], None], keep: int = 2) -> Path:
    """Write checkpoint ``step`` durably; ``write_learner(dir)`` fills ``dir/learner``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{_owner_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_learner(str(tmp / "learner"))
        (tmp / "driver.json").write_text(json.dumps({"step": step, **driver_state}, indent=1))
        (tmp / "rng.json").write_text(json.dumps(rng_state()))
        (tmp / MARKER).write_text(str(step))
        fsync_tree(tmp)
    except BaseException:  # Ctrl-C, SIGTERM turned into SystemExit, a failed write
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):  # ``tmp`` now holds the old copy
        _fsync_path(root)
        shutil.rmtree(tmp)
    else:
        aside = root / f".replaced-step-{step:06d}-{_owner_tag()}"
        os.rename(final, aside)  # still complete, and found by complete_checkpoints meanwhile
        os.rename(tmp, final)
        _fsync_path(root)
        shutil.rmtree(aside)
    _fsync_path(root)
    prune(root, keep)
    return final


def _step_of(p: Path) -> int:
    return int(p.name.split("-")[1] if p.name.startswith("step-") else p.name.split("-")[2])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; a copy set aside by an interrupted re-save stands
    in for its step when the step's own folder is missing."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = {_step_of(p): p for p in root.glob("step-*") if (p / MARKER).exists()}
    for p in root.glob(".replaced-step-*"):
        if (p / MARKER).exists():
            found.setdefault(_step_of(p), p)
    return [found[s] for s in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove temporaries of dead processes."""
    for old in [p for p in complete_checkpoints(root.parent) if p.name.startswith("step-")][:-keep]:
        doomed = root / f".deleting-{old.name}-{_owner_tag()}"
        os.rename(old, doomed)  # out of the step-* namespace first: never half-deleted and trusted
        shutil.rmtree(doomed, ignore_errors=True)
    for tmp in root.iterdir():
        if not (tmp.name.startswith(_ASIDE) and _owned_by_dead_process(tmp.name)):
            continue
        own = root / f"step-{_step_of(tmp):06d}"
        if tmp.name.startswith(".replaced-") and (tmp / MARKER).exists() and not own.exists():
            os.rename(tmp, own)  # a re-save died between its two renames: the old copy goes back
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def load_driver_state(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / MARKER).exists():
        raise FileNotFoundError(f"trainer.resume={str(ckpt)!r} is not a complete checkpoint folder "
                                f"(no {MARKER} marker); point it at <run>/checkpoints/step-N")
    state = json.loads((ckpt / "driver.json").read_text())
    rng = ckpt / "rng.json"
    if rng.exists():
        state["rng"] = json.loads(rng.read_text())
    else:  # written before RNG states were JSON: its rng.pkl is not read (a pickle can run code)
        log.warning("%s has no rng.json; the driver's random state starts afresh", ckpt)
        state["rng"] = None
    return state


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` (newest in this run), ``never``, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if (p / "checkpoints").is_dir():  # a run folder: take its newest checkpoint
        return latest_checkpoint(p)
    return p


# ----------------------------------------------------------------------------- one run per folder

class RunLock:
    """An exclusive lock on ``<run>/.lock`` for the life of a run: a second run that names the
    same folder stops at once, in one line, instead of interleaving checkpoints with the first.
    The OS drops the lock when its process dies, so a crashed run never leaves it stuck."""

    def __init__(self, run_dir: str | Path):
        import fcntl

        self.path = Path(run_dir) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise RunInUse(f"run folder {str(self.path.parent)!r} is in use by {holder}; wait for that run "
                           "to end or choose another logging.run_name") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
