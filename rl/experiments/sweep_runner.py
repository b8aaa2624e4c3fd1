"""Running a sweep: each (arm, seed) as its own ``placerl learn arm`` process on a GPU slot.

Separate processes, not threads or Ray tasks: an arm starts and stops its own private Ray
and vLLM engine, so a crash, an out-of-memory kill or a hang stays within that arm. Each
child runs in its own process group (its Ray and vLLM processes with it), so that a stopped
sweep ends every child's whole tree and leaves no engine holding a GPU. rl/experiments/sweep.py
decides what runs where; this file only starts, watches and stops processes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rl.experiments.learning import arm_dir, read_json
from rl.experiments.sweep import CPU, Job, Slot, SweepQueue, assign, startable

# Seconds between polls of the children: starts and exits are minutes apart.
POLL_S = 1.0
# Seconds a stopped child's group has after SIGTERM before SIGKILL: Ray and vLLM shut down.
STOP_GRACE_S = 20.0


@dataclass
class SweepSpec:
    """What every child shares: ``overrides`` maps each arm to its full override list."""
    out: Path
    config: str
    overrides: dict[str, list[str]]
    budget_s: float
    stagger_s: float = 0.0
    python: str = sys.executable


@dataclass
class Child:
    job: Job
    proc: subprocess.Popen
    log: object
    started: float


def log_path(out: Path, job: Job) -> Path:
    return Path(out) / "logs" / f"{job.label}.log"


def arm_command(spec: SweepSpec, job: Job) -> list[str]:
    return [spec.python, "-m", "launch.cli", "learn", "arm", "--out", str(spec.out), "--config", spec.config,
            "--arm", job.arm, "--seed", str(job.seed), "--budget-s", f"{spec.budget_s:g}", *spec.overrides[job.arm]]


def threads_per_child(cpus: int, children: int) -> int:
    """CPU threads each child's torch and BLAS may use: the host's cores shared out. Unset, each
    child takes one thread per core: sixteen arms on 32 cores ran at a load of 75-82 while their
    GPUs sat at 6-38% (reports/learning/RUN.md)."""
    return max(1, cpus // max(1, children))


def child_env(device: str, threads: int = 0) -> dict:
    env = dict(os.environ)
    if device != CPU:
        env["CUDA_VISIBLE_DEVICES"] = device  # the child sees its one GPU as cuda:0
    if threads and "OMP_NUM_THREADS" not in env:  # a user's setting wins
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def device_name(device: str) -> str:
    return "CPU" if device == CPU else f"GPU {device}"


def start_child(command: list[str], device: str, log_file: Path, threads: int = 0) -> tuple[subprocess.Popen, object]:
    """``command`` in a new session (its own process group), output appended to ``log_file``
    (a resumed call continues the same log)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "a")
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=child_env(device, threads), start_new_session=True)
    return proc, log


def stop_children(children: list[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to each child's process group, SIGKILL to those still alive after ``grace_s``."""
    for c in children:
        _signal_group(c.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for c in children:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(c.proc, signal.SIGKILL)  # the group's other processes (Ray, vLLM) too
        c.proc.wait()
        c.log.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


class _StopRequested:
    """SIGINT/SIGTERM handlers that only note the signal: the loop stops the children itself."""

    def __init__(self):
        self.signal = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, sig, frame):
        self.signal = sig

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_jobs(spec: SweepSpec, queue: SweepQueue, slots: list[Slot], say=print) -> int:
    """Run ``queue`` to the end on ``slots``; returns 0, or 128 + the signal that stopped it."""
    running: dict[Slot, Child] = {}
    last_start: dict[str, float] = {}
    with _StopRequested() as stop:
        while not stop.signal:
            for slot, child in list(running.items()):
                status = child.proc.poll()
                if status is None:
                    continue
                child.log.close()
                del running[slot]
                result = queue.finish(child.job, status)
                say(f"finish {child.job.arm} seed {child.job.seed} on {device_name(slot.device)}: exit {status}, "
                    f"{result} ({time.monotonic() - child.started:.0f} s; log {log_path(spec.out, child.job)})")
            if not queue.pending and not running:
                break
            now = time.monotonic()
            ready = {s.device for s in slots if now - last_start.get(s.device, -1e18) >= spec.stagger_s}
            todo = assign(queue.pending, {s: c.job for s, c in running.items()}, slots)
            for job, slot in startable(todo, ready, one_per_device=spec.stagger_s > 0):
                call = queue.start(job)
                proc, log = start_child(arm_command(spec, job), slot.device, log_path(spec.out, job),
                                        threads_per_child(os.cpu_count() or 1, len(slots)))
                running[slot] = Child(job, proc, log, time.monotonic())
                last_start[slot.device] = time.monotonic()
                say(f"start {job.arm} seed {job.seed} on {device_name(slot.device)} (call {call}, pid {proc.pid})")
            time.sleep(POLL_S)
        if stop.signal:
            say(f"stopping: signal {stop.signal}; ending {len(running)} running arm(s) and their processes")
            stop_children(list(running.values()))
            for child in running.values():
                queue.stop(child.job)
            return 128 + stop.signal
    return 0


def result_rows(out: Path, queue: SweepQueue) -> list[dict]:
    """One row per job for :func:`rl.experiments.sweep.format_table`, read from the arms' folders."""
    rows = []
    for job in queue.jobs:
        folder = arm_dir(out, job.arm, job.seed)
        ev = read_json(folder / "eval.json")
        calls = read_json(folder / "calls.json", [])
        steps = ev["steps"] if ev else (calls[-1].get("steps_after") if calls else None)
        rows.append({"arm": job.arm, "seed": job.seed, "steps": steps,
                     "status": queue.outcome.get(job, "not started"),
                     "flexible": ev["test"]["accuracy_flexible"] if ev else None})
    return rows


def run_base(spec: SweepSpec, overrides: list[str], device: str, say=print) -> int:
    """``placerl learn base`` as a child on ``device`` (the summary compares every arm with it)."""
    command = [spec.python, "-m", "launch.cli", "learn", "base", "--out", str(spec.out), "--config", spec.config,
               *overrides]
    log_file = Path(spec.out) / "logs" / "base.log"
    say(f"start base on {device_name(device)} (log {log_file})")
    proc, log = start_child(command, device, log_file)
    with _StopRequested() as stop:
        while proc.poll() is None and not stop.signal:
            time.sleep(POLL_S)
        if stop.signal:
            stop_children([Child(Job("base", 0), proc, log, 0.0)])
            return 128 + stop.signal
    log.close()
    say(f"finish base: exit {proc.returncode}")
    return proc.returncode
