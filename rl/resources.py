"""Where actors go: one Ray placement group whose bundles hold learner ranks and rollout workers.

With ``cluster.colocate`` the learner rank i and rollout worker i share bundle i (on GPUs
they split the device by fractional ``num_gpus``); otherwise each gets its own bundle.
Reserving everything in one group up front means a run either gets all its resources
or fails at start, instead of deadlocking half-placed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class ActorLayout:
    placement_group: object
    learner_bundles: list[int]
    rollout_bundles: list[int]


def plan_bundles(num_ranks: int, num_workers: int, colocate: bool, gpus_learner: float,
                 gpus_rollout: float) -> tuple[list[dict], list[int], list[int]]:
    """Bundle resources and the bundle index of each learner rank and rollout worker (pure)."""
    if colocate:
        n = max(num_ranks, num_workers)
        gpu = gpus_learner + gpus_rollout
        bundles = [{"CPU": 1.0, **({"GPU": min(1.0, gpu)} if gpu else {})} for _ in range(n)]
        return bundles, list(range(num_ranks)), list(range(num_workers))
    bundles = [{"CPU": 1.0, **({"GPU": gpus_learner} if gpus_learner else {})} for _ in range(num_ranks)]
    bundles += [{"CPU": 1.0, **({"GPU": gpus_rollout} if gpus_rollout else {})} for _ in range(num_workers)]
    return bundles, list(range(num_ranks)), list(range(num_ranks, num_ranks + num_workers))


def gpu_shortfall(bundles: list[dict], cluster_gpus: float, colocate: bool) -> str | None:
    """Why ``bundles`` cannot fit a cluster with ``cluster_gpus`` GPUs, in one line naming the
    settings to change; None when they fit (pure). Ray would otherwise wait for them until
    ``reserve`` gives up."""
    need = sum(b.get("GPU", 0.0) for b in bundles)
    if need <= cluster_gpus + 1e-9:
        return None
    how = ("colocated, each of the max(learner.num_ranks, rollout.num_workers) bundles takes "
           "cluster.gpus_per_learner_rank + cluster.gpus_per_rollout_worker; e.g. with one rank and two "
           "workers on one GPU set both to 0.25" if colocate else
           "each learner rank takes cluster.gpus_per_learner_rank and each rollout worker "
           "cluster.gpus_per_rollout_worker")
    return (f"the run asks for {need:g} GPUs in {len(bundles)} bundles but the cluster has {cluster_gpus:g}: "
            f"{how}; lower them or learner.num_ranks / rollout.num_workers")


def cpu_threads(configured: int, actors: int, host_cores: int | None = None) -> int:
    """Threads for one of ``actors`` CPU actors of a kind on a host (pure but for the core count).

    Ray gives an actor with a fraction of a CPU one thread. A step rolls out, then updates:
    rollout workers and learner ranks never compute at the same time, so the actors of
    each kind may share all the host's cores (on two cores: a SmolLM2 step 79 s -> 52 s).
    With trainer.max_staleness > 0 they do compute at once, and contend for the same cores
    on a CPU host; cluster.cpu_threads then sets a smaller share.
    """
    if configured:
        return configured
    return max(1, (host_cores or usable_cores()) // max(1, actors))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def reserve(cfg, timeout_s: float = 120.0) -> ActorLayout:
    import ray
    from ray.util.placement_group import placement_group

    bundles, lb, rb = plan_bundles(cfg.learner.num_ranks, cfg.rollout.num_workers, cfg.cluster.colocate,
                                   cfg.cluster.gpus_per_learner_rank, cfg.cluster.gpus_per_rollout_worker)
    if why := gpu_shortfall(bundles, ray.cluster_resources().get("GPU", 0.0), cfg.cluster.colocate):
        raise RuntimeError(why)
    # Actors ask for a fraction of a bundle's CPU so that rank and worker can share one.
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        raise RuntimeError(f"Ray could not reserve {bundles} within {timeout_s:.0f}s; the cluster has "
                           f"{ray.available_resources()}: lower learner.num_ranks / rollout.num_workers "
                           "or the cluster.gpus_* settings")
    return ActorLayout(pg, lb, rb)
