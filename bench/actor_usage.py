"""CPU and memory of a run's Ray actors, sampled from outside while the run goes on.

Ray names an actor's process ``ray::<Class>`` and, while a method runs, ``ray::<Class>.<method>``;
the sampler reads those titles to tell which phase each actor is in. Reported:

- the learner actor's peak resident memory (the kernel's high-water mark, VmHWM);
- the rollout worker's CPU use while the learner is in ``train_step``, in cores: an idle
  actor is near 0, an engine that polls while it waits shows up here as most of a core;
- the learner's own CPU use during ``train_step``, for scale.
"""
from __future__ import annotations

import threading
import time

LEARNER, WORKER, TRAINING = "ray::LearnerRank", "ray::LocalRolloutWorker", "ray::LearnerRank.train_step"


def _hwm_gb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


class ActorUsage:
    """``with ActorUsage() as usage: run()``, then ``usage.summary()``."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.learner_peak_gb = 0.0
        self.train_s = 0.0  # seconds sampled with the learner in train_step
        self.worker_cpu_s = 0.0  # worker CPU seconds over those intervals
        self.learner_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                title = " ".join(p.info["cmdline"] or [])
                if title.startswith((LEARNER, WORKER)):
                    t = p.cpu_times()
                    out[p.pid] = (title, t.user + t.system)
                    if title.startswith(LEARNER):
                        self.learner_peak_gb = max(self.learner_peak_gb, _hwm_gb(p.pid))
            except (OSError, psutil.Error, StopIteration):
                continue  # the process ended between listing and reading
        return out

    def _loop(self) -> None:
        prev, t_prev = self._snapshot(), time.perf_counter()
        while not self._stop.wait(self.interval_s):
            cur, t = self._snapshot(), time.perf_counter()
            training = [pid for pid, (title, _) in cur.items()
                        if title.startswith(TRAINING) and prev.get(pid, ("",))[0].startswith(TRAINING)]
            if training:
                self.train_s += t - t_prev
                for pid, (title, cpu) in cur.items():
                    if pid in prev:
                        delta = cpu - prev[pid][1]
                        if title.startswith(WORKER):
                            self.worker_cpu_s += delta
                        elif pid in training:
                            self.learner_cpu_s += delta
            prev, t_prev = cur, t

    def summary(self) -> dict:
        busy = max(self.train_s, 1e-9)
        return {"learner_peak_rss_gb": self.learner_peak_gb, "learner_train_step_sampled_s": self.train_s,
                "worker_cores_during_train_step": self.worker_cpu_s / busy,
                "learner_cores_during_train_step": self.learner_cpu_s / busy}
