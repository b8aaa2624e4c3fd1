"""The rollout worker: one engine and its adapter state, run as a Ray actor in its own process.

:class:`LocalRolloutWorker` is the plain class (tests drive it in-process);
:data:`RolloutWorker` is the same class as a Ray actor, built on first use so that this
module imports on hosts without Ray. The engine interface is :mod:`rl.rollout.engine`.
"""
from __future__ import annotations

import os
import time

from rl.rollout.engine import SamplingSpec, make_engine
from rl.rollout.gc_pauses import GcPauses
from rl.rollout.sync import AdapterPayload


class Groups(list):
    """A generate's ``[prompt][n]`` completions, with ``call_s``: seconds the engine itself spent
    in the call, by part (vLLM's: ``generate_s``, its engine call, and ``rows_s``, the rows built
    from its outputs); empty where the engine does not time its parts. Set against the driver's
    rollout time, they say whether a slow rollout was the engine's or the way around it."""

    def __init__(self, groups=(), call_s: dict | None = None):
        super().__init__(groups)
        self.call_s = dict(call_s or {})


class LocalRolloutWorker:
    """One engine and its adapter state; :data:`RolloutWorker` runs it as a Ray actor in its own process."""

    def __init__(self, rollout_cfg, model_path: str, dtype: str, seed: int, cpu_threads: int = 0,
                 index: int = 0):
        """``cpu_threads``: cluster.cpu_threads (0: automatic, rl/resources.py); ``index``:
        this worker's place among the pool's workers, which picks the cores it binds."""
        from rl.resources import cpu_threads as threads_for, usable_cores

        n = threads_for(cpu_threads, rollout_cfg.num_workers)
        cores = usable_cores()
        first = (index * n) % cores
        # Ray set one thread for this fractional-CPU actor. vLLM's CPU backend binds its
        # threads itself and, left to "auto", keeps a core back for a scheduler process
        # that the in-process engine does not have: name the cores instead.
        os.environ["OMP_NUM_THREADS"] = str(n)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{first}-{min(first + n, cores) - 1}")
        import torch

        torch.set_num_threads(n)
        self.engine = make_engine(rollout_cfg, model_path, dtype, seed)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec) -> Groups:
        groups = self.engine.generate(prompt_ids, sampling)
        return self._stamped(groups, getattr(self.engine, "last_call_s", {}))

    def generate_parts(self, prompt_ids: list[list[int]], sampling: SamplingSpec, groups_per_part: int):
        """Yield ``(positions, Groups)`` as prompts' groups finish, ``groups_per_part`` at a time
        (``trainer.stream_groups``; a Ray streaming generator). An engine that cannot stream
        (the hf engine) yields one part: the whole call."""
        stream = getattr(self.engine, "generate_stream", None)
        if stream is None:
            yield list(range(len(prompt_ids))), self.generate(prompt_ids, sampling)
            return
        for positions, groups, call_s in stream(prompt_ids, sampling, groups_per_part):
            yield positions, self._stamped(groups, call_s)

    def _stamped(self, groups: list, call_s: dict) -> Groups:
        # The actor runs one call at a time, so no adapter load happened during this generate.
        version = self.engine.adapter_version() or 0
        for group in groups:
            for c in group:
                c.adapter_version = version
        return Groups(groups, call_s)

    def load_adapter(self, payload: AdapterPayload, requested_at: float | None = None) -> dict[str, float]:
        """Serve ``payload``; returns ``version`` and seconds per sync stage: the learner's
        (carried in the payload), ``transfer`` (from the later of the learner's hand-over and
        ``requested_at``, the driver's wall clock when it asked for this load, to this call:
        object store, deserialization, queueing), the engine's own stages, and ``gc`` (the part
        of the engine's stages this process spent in the garbage collector)."""
        # Pass the payload as an object-store reference (ray.put once, every worker
        # reads it); Ray resolves a top-level reference before this method runs.
        arrived = time.time()
        report = {k: v for k, v in payload.timings.items() if k != "sent_at"}
        if "sent_at" in payload.timings:
            # A payload exported before the load was asked for (while the rollout woke) did not
            # wait on the transfer until then.
            start = max(payload.timings["sent_at"], requested_at or 0.0)
            report["transfer_s"] = max(0.0, arrived - start)
        with GcPauses() as pauses:
            report.update(self.engine.load_adapter(payload) or {})
        report["gc_s"] = pauses.seconds
        report["version"] = payload.version
        return report

    def adapter_version(self) -> int | None:
        return self.engine.adapter_version()

    def gpu_uuids(self) -> list[str]:
        """The GPUs this worker's process sees (rl/rollout/device_handoff.py)."""
        from rl.rollout.device_handoff import device_uuids

        return device_uuids()

    def sleep(self) -> bool:
        """Release accelerator memory until the next use; False where the engine cannot."""
        return bool(getattr(self.engine, "sleep", lambda: False)())

    def wake_up(self) -> None:
        getattr(self.engine, "wake_up", lambda: None)()

    def ping(self) -> str:
        return "ok"


_ACTOR = None


def __getattr__(name: str):
    # Built on first use so that this module imports on hosts without Ray (the hf engine alone).
    global _ACTOR
    if name == "RolloutWorker":
        if _ACTOR is None:
            import ray

            _ACTOR = ray.remote(LocalRolloutWorker)
        return _ACTOR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
