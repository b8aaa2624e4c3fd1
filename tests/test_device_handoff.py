"""rollout.weight_transfer: when an adapter version may stay on the learner's GPU (CUDA IPC).

The handoff itself needs a GPU (tests/test_gpu_merged.py); what decides it, and refuses it in
one line, runs here.
"""
from __future__ import annotations

import pytest

from rl.config import ConfigError, load_config
from rl.rollout.device_handoff import resolve_weight_transfer


def test_auto_takes_cuda_ipc_only_where_it_can_run():
    assert resolve_weight_transfer("auto", merged=True, max_staleness=0, workers_see_learner_gpu=True) == "cuda_ipc"
    for merged, staleness, sees in [(True, 0, None), (False, 0, True), (True, 1, True), (True, 0, False)]:
        assert resolve_weight_transfer("auto", merged, staleness, sees) == "object_store"
    assert resolve_weight_transfer("object_store", True, 0, True) == "object_store"


@pytest.mark.parametrize("merged,staleness,sees,why", [
    (True, 0, None, "the learner has no GPU"),
    (False, 0, True, "rollout.weight_sync=merged"),
    (True, 2, True, "trainer.max_staleness=0"),
    (True, 0, False, "does not see the learner's GPU"),
])
def test_explicit_cuda_ipc_that_cannot_run_fails_in_one_line(merged, staleness, sees, why):
    with pytest.raises(ValueError) as err:
        resolve_weight_transfer("cuda_ipc", merged, staleness, sees)
    msg = str(err.value)
    assert "\n" not in msg and why in msg
    assert msg.startswith("rollout.weight_transfer=cuda_ipc") and "rollout.weight_transfer=object_store" in msg


def test_unknown_transfer_is_refused():
    with pytest.raises(ValueError, match="choose one of auto, object_store, cuda_ipc"):
        resolve_weight_transfer("nccl", True, 0, True)


def test_config_refuses_cuda_ipc_before_any_actor_starts():
    with pytest.raises(ConfigError, match="rollout.weight_transfer='cuda_ipc'.*weight_sync=merged"):
        load_config(None, ["rollout.weight_transfer=cuda_ipc"])
    with pytest.raises(ConfigError, match="rollout.weight_transfer='cuda_ipc'.*max_staleness=0"):
        load_config(None, ["rollout.weight_transfer=cuda_ipc", "rollout.weight_sync=merged",
                           "trainer.max_staleness=1"])
    with pytest.raises(ConfigError, match="rollout.weight_transfer"):
        load_config(None, ["rollout.weight_transfer=ipc"])
    cfg = load_config(None, ["rollout.weight_transfer=cuda_ipc", "rollout.weight_sync=merged"])
    assert cfg.rollout.weight_transfer == "cuda_ipc"
