"""Atomic, resumable checkpoints of a run.

A checkpoint is a folder ``<run>/checkpoints/step-000042`` holding the learner's state
(``learner/``: the adapter in PEFT format, optimizer and scheduler), the driver's state
(``driver.json``: step, data position, adapter version) and the driver's RNG states.
It is written under a temporary name and renamed into place only once complete, then
marked with ``COMPLETE``: a crash or ``ray job stop`` at any moment leaves either the
previous checkpoint or the new one, never a half-written folder that resume trusts.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

MARKER = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, driver_state: dict,
                    write_learner: Callable[[str], None], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; ``write_learner(dir)`` fills ``dir/learner``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_learner(str(tmp / "learner"))
    (tmp / "driver.json").write_text(json.dumps({"step": step, **driver_state}, indent=1))
    with open(tmp / "rng.pkl", "wb") as fh:
        pickle.dump(rng_state(), fh)
    (tmp / MARKER).write_text(str(step))
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step after a resume: replace the old copy
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop stale temporaries."""
    done = complete_checkpoints(root.parent)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def load_driver_state(ckpt: str | Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / MARKER).exists():
        raise FileNotFoundError(f"trainer.resume={str(ckpt)!r} is not a complete checkpoint folder "
                                f"(no {MARKER} marker); point it at <run>/checkpoints/step-N")
    state = json.loads((ckpt / "driver.json").read_text())
    with open(ckpt / "rng.pkl", "rb") as fh:
        state["rng"] = pickle.load(fh)
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
