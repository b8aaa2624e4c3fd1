"""Joining or starting the Ray cluster a run lives on.

A run joins the cluster named by ``cluster.address`` or ``$RAY_ADDRESS`` (this is
what ``ray job submit`` sets for the job's driver); with neither, it starts a private
Ray on loopback. Ray binds the machine's external interface unless told otherwise,
so local clusters pin every address to 127.0.0.1.
"""
from __future__ import annotations

import os
import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on at ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """Environment that keeps a local Ray (and its workers) on loopback."""
    # Nothing but this machine reaches a loopback cluster: Ray 2.60's token auth buys nothing.
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def init_ray(address: str = "", num_cpus: int = 0, object_store_mb: int = 1024,
             runtime_env: dict | None = None, verbose: bool = True):
    """Connect to (or start) Ray and return the context; idempotent. ``verbose=False``
    keeps actors' output in Ray's log files and Ray's own INFO lines off the console."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        # Ray reads this once, when it is first imported, and otherwise binds its agents
        # to the machine's external address: set it before the import (and in the
        # constant, when something imported ray earlier). Only for a private cluster:
        # a driver joining a real cluster must advertise its real address.
        os.environ.update(loopback_env())
    import logging

    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if not address:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    env = {"env_vars": {**loopback_env(), **_passthrough_env()}}
    if runtime_env:
        env = {**runtime_env, "env_vars": {**env["env_vars"], **runtime_env.get("env_vars", {})}}
    if address:
        # Inside `ray job submit` the job's runtime_env (working_dir) is inherited.
        return ray.init(address=address, runtime_env=env if runtime_env else None,
                        log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    return ray.init(
        address="local",  # a private cluster even when another Ray runs on this machine
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=object_store_mb * 1024 * 1024,
        include_dashboard=False,
        _node_ip_address=LOOPBACK,
        runtime_env=env,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )


def _passthrough_env() -> dict[str, str]:
    # Variables the actors need to see as the driver does (caches, vLLM's CPU mode).
    keys = ("PLACERL_CACHE", "PLACERL_GSM8K_DIR", "HF_HUB_OFFLINE", "HF_HOME",
            "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")
    return {k: os.environ[k] for k in keys if k in os.environ}
