"""The set of rollout worker actors, as the driver sees it: one call to generate, one to sync.

``generate`` is ``submit`` (returns at once) then ``collect`` (waits), so a driver can keep a
rollout in flight while the learner steps (rl/rollout/overlap.py); ``sync(wait=False)`` queues
the next adapter behind it.

It spreads prompts over the workers, and it is where a dead worker is replaced: a
worker that dies (its process killed, its node lost) is restarted in the same bundle,
given the newest adapter, and its share of the prompts is generated again, so the run
goes on. The adapter is kept by reference only (an ObjectRef in Ray's object store),
so a restart costs no extra copy on the driver.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.evaluate import split_evenly

log = logging.getLogger(__name__)
_DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


def chunk_specs(sampling, sizes: list[int]) -> list:
    """One SamplingSpec per worker chunk, each with its chunk's first prompt index in the
    step (pure), so that workers draw distinct streams for distinct prompts."""
    offsets = [sampling.prompt_offset + sum(sizes[:i]) for i in range(len(sizes))]
    return [dataclasses.replace(sampling, prompt_offset=o) for o in offsets]


def slowest_stages(reports: list[dict]) -> dict[str, float]:
    """Per stage, the longest of the workers' times (pure): a sync waits for its slowest worker.
    Per ``*_error`` (rl/rollout/merged.py), the largest of the workers' errors; per
    ``*_direct_write``, the smallest (1 only where every worker wrote directly)."""
    out: dict[str, float] = {}
    for report in reports:
        for k, v in report.items():
            if k.endswith(("_s", "_error")):
                out[k] = max(out.get(k, 0.0), float(v))
            elif k.endswith("_direct_write"):
                out[k] = min(out.get(k, 1.0), float(v))
    return out


def sync_metrics(stages: dict[str, float]) -> dict[str, float]:
    """A sync's stages as step metrics (pure): seconds as ``time/sync_<stage>``, errors as ``rollout/<name>``."""
    return {(f"time/sync_{k}" if k.endswith("_s") else f"rollout/{k}"): v for k, v in stages.items()}


@dataclass
class PendingRollout:
    """A generate in flight: each worker's prompts, sampling settings and result reference."""

    chunks: list[list[list[int]]]
    specs: list
    refs: dict[int, object]


class RolloutPool:
    def __init__(self, rollout_cfg, model_path: str, dtype: str, seed: int, layout, cluster_cfg,
                 runtime_env: dict | None = None):
        from rl.rollout.worker import RolloutWorker

        self._cls, self._cfg, self._path, self._dtype, self._seed = RolloutWorker, rollout_cfg, model_path, dtype, seed
        self._layout, self._gpus, self._threads = layout, cluster_cfg.gpus_per_rollout_worker, cluster_cfg.cpu_threads
        self._runtime_env = runtime_env or {}  # rl.console.actor_env: quiet or verbose workers
        self._adapter = None  # ObjectRef of the newest AdapterPayload
        self._loading: dict[int, object] = {}  # worker index -> its adapter load not yet checked
        self.restarts = 0
        self.last_call_s: dict[str, float] = {}  # the last stream's engine seconds (the slowest worker's)
        self.workers = [self._start(i) for i in range(rollout_cfg.num_workers)]
        ray.get([w.ping.remote() for w in self.workers])

    def _start(self, i: int):
        strategy = PlacementGroupSchedulingStrategy(
            self._layout.placement_group, placement_group_bundle_index=self._layout.rollout_bundles[i])
        return self._cls.options(num_cpus=0.5, num_gpus=self._gpus, scheduling_strategy=strategy,
                                 max_concurrency=1, runtime_env=self._runtime_env or None).remote(self._cfg, self._path, self._dtype, self._seed + 7919 * i,
                                                           self._threads, i)

    def _restart(self, i: int) -> None:
        log.warning("rollout worker %d died; restarting it and re-syncing the adapter", i)
        self.restarts += 1
        self._loading.pop(i, None)  # a fresh worker gets the newest adapter below
        try:
            ray.kill(self.workers[i])
        except Exception:  # already gone
            pass
        self.workers[i] = self._start(i)
        if self._adapter is not None:
            ray.get(self.workers[i].load_adapter.remote(self._adapter))

    def submit(self, prompt_ids: list[list[int]], sampling) -> "PendingRollout":
        """Start generating and return at once; ``collect`` waits for the completions. Each
        worker runs its calls in order, so anything sent to it later (an adapter sync) runs after."""
        chunks = split_evenly(prompt_ids, len(self.workers))
        specs = chunk_specs(sampling, [len(c) for c in chunks])
        refs = {i: self.workers[i].generate.remote(c, specs[i]) for i, c in enumerate(chunks) if c}
        return PendingRollout(chunks, specs, refs)

    def collect(self, pending: "PendingRollout", retries: int = 2) -> "Groups":
        """The completions in prompt order; their ``call_s`` is the slowest worker's, part by part."""
        from rl.rollout.worker import Groups

        out: dict[int, list] = {}
        for i, ref in pending.refs.items():
            for attempt in range(retries + 1):
                try:
                    out[i] = ray.get(ref)
                    break
                except _DEAD:
                    if attempt == retries:
                        raise
                    self._restart(i)
                    ref = self.workers[i].generate.remote(pending.chunks[i], pending.specs[i])
        self._settle()  # syncs queued behind this rollout
        order = sorted(out)
        return Groups([group for i in order for group in out[i]], slowest_stages([out[i].call_s for i in order]))

    def generate(self, prompt_ids: list[list[int]], sampling, retries: int = 2) -> "Groups":
        return self.collect(self.submit(prompt_ids, sampling), retries)

    def stream(self, prompt_ids: list[list[int]], sampling, groups_per_part: int, retries: int = 2):
        """Yield ``(positions, Groups)`` as the workers' groups finish, ``positions`` indexing
        ``prompt_ids`` (``trainer.stream_groups``). Seeds as in ``generate``. When the stream is
        done, ``last_call_s`` is the slowest worker's engine seconds for the whole call. A worker
        that dies is restarted and its prompts not yet handed out are generated again."""
        chunks = split_evenly(prompt_ids, len(self.workers))
        specs = chunk_specs(sampling, [len(c) for c in chunks])
        # A worker's stream -> (worker index, the positions it was sent, those not yet handed out).
        streams: dict = {}
        attempts, call_s = [0] * len(self.workers), {}

        def launch(i: int, positions: list[int]) -> None:
            stream = self.workers[i].generate_parts.options(num_returns="streaming").remote(
                [prompt_ids[p] for p in positions], specs[i], groups_per_part)
            streams[stream] = (i, positions, set(positions))

        first = 0
        for i, chunk in enumerate(chunks):
            if chunk:
                launch(i, list(range(first, first + len(chunk))))
            first += len(chunk)
        while streams:
            (ready,), _ = ray.wait(list(streams), num_returns=1)
            i, sent, left = streams.pop(ready)
            try:
                local, groups = ray.get(next(ready))
            except StopIteration:
                continue
            except _DEAD:
                if attempts[i] == retries:
                    raise
                attempts[i] += 1
                self._restart(i)
                launch(i, sorted(left))
                continue
            positions = [sent[k] for k in local]
            call_s[i] = groups.call_s
            streams[ready] = (i, sent, left - set(positions))
            yield positions, groups
        self._settle()  # syncs queued behind this rollout
        self.last_call_s = slowest_stages(list(call_s.values()))

    def sync(self, payload_ref, wait: bool = True) -> dict[str, float]:
        """Serve ``payload_ref`` (an AdapterPayload in the object store) on every worker, all
        loading at once; returns seconds per sync stage, the slowest worker's for each. With
        ``wait=False`` the loads are queued behind the workers' calls in flight and checked at
        the next ``collect`` or ``sync`` (and no stages are returned)."""
        self._settle()
        self._adapter = payload_ref
        now = time.time()
        self._loading = {i: w.load_adapter.remote(payload_ref, now) for i, w in enumerate(self.workers)}
        return self._settle() if wait else {}

    def _settle(self) -> dict[str, float]:
        loading, self._loading = self._loading, {}
        reports = []
        for i, ref in loading.items():
            try:
                reports.append(ray.get(ref))
            except _DEAD:
                self._restart(i)
        return slowest_stages(reports)

    def sleep(self, wait: bool = True) -> list:
        """Free the workers' accelerator memory while the learner steps (engines without
        sleep mode ignore it); the next ``wake_up``, ``sync`` or ``generate`` restores it.
        With ``wait=False`` it returns the calls in flight at once, for ``finish``."""
        pending = self._each("sleep")
        if not wait:
            return pending
        self.finish(pending)
        return []

    def sees_gpu(self, uuid: str) -> bool:
        """Whether every worker's process sees the GPU with this UUID."""
        return all(uuid in seen for seen in ray.get([w.gpu_uuids.remote() for w in self.workers]))

    def wake_up(self) -> None:
        self.finish(self._each("wake_up"))

    def _each(self, method: str) -> list:
        """``method`` called on every worker at once: the calls in flight."""
        return [getattr(w, method).remote() for w in self.workers]

    def finish(self, pending: list) -> None:
        """Wait for per-worker calls (``sleep(wait=False)``'s), replacing a worker that died."""
        for i, ref in enumerate(pending):
            try:
                ray.get(ref)
            except _DEAD:  # a fresh worker is awake; its generate/sync will find that out
                self._restart(i)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:
                pass
