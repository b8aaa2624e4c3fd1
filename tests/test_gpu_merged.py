"""vLLM on a GPU serving the adapter merged into its weights (``rollout.weight_sync=merged``).

Skipped where torch sees no GPU (CI). On a GPU host: ``pytest tests/test_gpu_merged.py -q -s``.
The merged weights are written into the running engine's parameters in place (under CUDA
graphs), which only a GPU engine does: the CPU engine reloads every weight instead
(tests/test_rollout.py covers that one).

Tolerances as in tests/test_gpu.py: vLLM in bfloat16 against the learner's PEFT model in
fp32, teacher-forced on vLLM's own samples, mean within 0.05 and median within 0.03, while
the base model is off by more than twice that mean. Merging adds one bf16 rounding of
``W + scale * B @ A`` on top of the LoRA path's; the test adapters' B are far from zero, so
what the rounding drops is small against what they change.
"""
from __future__ import annotations

import pytest
import torch

if torch.cuda.device_count() < 1:
    pytest.skip("no CUDA device: the GPU tests run on a GPU host", allow_module_level=True)

from test_gpu import freed_by_sleep, vllm_vs_learner  # noqa: E402
from test_sync import CASES, PROMPTS, learner_model  # noqa: E402


@pytest.fixture(scope="module")
def merged_vllm(tiny_model_path):
    """bfloat16, CUDA graphs, sleep mode, no LoRA kernels. One engine for the module."""
    from rl.config import RolloutConfig
    from rl.rollout.merged import MergedVLLMEngine

    cfg = RolloutConfig(engine="vllm", max_lora_rank=16, max_model_len=256, gpu_memory_utilization=0.12,
                        sleep_mode=True, weight_sync="merged")
    return MergedVLLMEngine(cfg, tiny_model_path, "bfloat16", seed=0)


def payload_for(tiny_model_path, case: str, seed: int, version: int):
    from core.models import load_model
    from rl.rollout.sync import make_payload

    model = learner_model(load_model(tiny_model_path, "float32").eval(), CASES[case], seed=seed)
    return model, make_payload(model, version=version)


def test_merged_vllm_on_gpu_after_sync_matches_learner_mixed_rank_alpha(merged_vllm, tiny_model_path):
    from rl.rollout.engine import SamplingSpec

    config = merged_vllm.llm.llm_engine.vllm_config
    assert merged_vllm.sleeps and not config.model_config.enforce_eager, "vLLM turned CUDA graphs off"
    assert config.lora_config is None, "the merged engine should run without LoRA kernels"
    model, payload = payload_for(tiny_model_path, "mixed-rank-alpha", seed=11, version=1)
    stages = merged_vllm.load_adapter(payload)
    assert stages["sync_path"] == "merged" and merged_vllm.adapter_version() == 1
    d, gap = vllm_vs_learner(merged_vllm, model, PROMPTS,
                             SamplingSpec(n=4, max_new_tokens=24, temperature=1.0, seed=3))
    print(f"merged vLLM bf16 vs fp32 PEFT: mean {d.mean():.2e} median {d.median():.2e} max {d.max():.2e} "
          f"over {d.numel()} tokens; vs the base model mean {gap.mean():.2e}; the update's error as served "
          f"{stages['merged_update_error']:.2e}; sync stages "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in stages.items() if k.endswith("_s")))
    assert float(d.mean()) < 0.05 and float(d.median()) < 0.03
    assert float(gap.mean()) > max(2 * float(d.mean()), 0.02), "the adapter barely changes the model"


def test_merged_vllm_sleep_wake_serves_each_version_not_the_sum(merged_vllm, tiny_model_path):
    from rl.rollout.engine import SamplingSpec

    model, payload = payload_for(tiny_model_path, "uniform", seed=5, version=(merged_vllm.adapter_version() or 0) + 1)
    merged_vllm.load_adapter(payload)
    greedy = SamplingSpec(n=1, max_new_tokens=16, temperature=0)
    before = merged_vllm.generate(PROMPTS, greedy)
    assert merged_vllm.sleep() is True
    after = merged_vllm.generate(PROMPTS, greedy)  # wakes up first: the merged weights come back
    assert [r[0].token_ids for r in after] == [r[0].token_ids for r in before]
    # A sync while asleep wakes the engine and serves the new version, merged into the base
    # weights and not into the previous version's (each version replaces the last).
    sync_while_asleep_serves_the_new_version(merged_vllm, tiny_model_path, model, seed=6, what="offloaded")


def sync_while_asleep_serves_the_new_version(engine, tiny_model_path, previous, seed: int, what: str) -> None:
    """Put ``engine`` to sleep, sync a new version with the same weights as ``previous``'s (so
    written straight through the map vLLM's loader taught the worker, rl/rollout/param_map.py,
    into parameters that went through a sleep), and check that it serves the new one."""
    from rl.rollout.engine import SamplingSpec

    engine.sleep()
    newer, payload = payload_for(tiny_model_path, "uniform", seed=seed, version=engine.adapter_version() + 1)
    assert engine.load_adapter(payload)["merged_direct_write"] == 1.0
    sample = SamplingSpec(n=2, max_new_tokens=16, temperature=1.0, seed=9)
    d_new, _ = vllm_vs_learner(engine, newer, PROMPTS, sample)
    d_old, _ = vllm_vs_learner(engine, previous, PROMPTS, sample)
    print(f"{what}, after a sync while asleep: vs the new version mean {d_new.mean():.2e}, "
          f"vs the previous {d_old.mean():.2e}")
    assert float(d_new.mean()) < 0.05 and float(d_old.mean()) > 2 * float(d_new.mean())


def test_merged_vllm_sleep_keeping_weights_frees_only_the_kv_cache(merged_vllm, tiny_model_path):
    """``rollout.sleep_weights: keep``: the KV cache's memory goes back to the device, the weights
    stay mapped (nothing offloaded), and the engine wakes serving the same merged version, then
    takes a new one written through the map while asleep."""
    from rl.rollout.engine import SamplingSpec
    from rl.rollout.kv_sleep import pool_state

    merged_vllm.keeps_weights = True  # the fixture's engine has vLLM's sleep-mode pool; only the mode changes
    try:
        model, payload = payload_for(tiny_model_path, "uniform", seed=7, version=(merged_vllm.adapter_version() or 0) + 1)
        merged_vllm.load_adapter(payload)
        greedy = SamplingSpec(n=1, max_new_tokens=16, temperature=0)
        before = merged_vllm.generate(PROMPTS, greedy)
        freed = freed_by_sleep(merged_vllm)
        [state] = merged_vllm.llm.collective_rpc(pool_state)
        print(f"sleep keeping the weights: {state}; the device's free memory grew by {freed} bytes")
        assert state["kv_cache"] > 0 and state["kv_cache_asleep"] == state["kv_cache"]
        assert state["weights"] > 0 and state["weights_asleep"] == 0
        # What was released is the KV cache, and no more (the weights stayed).
        assert abs(freed - state["kv_cache"]) < state["weights"] // 2 + 2**21
        after = merged_vllm.generate(PROMPTS, greedy)  # wakes: the KV cache is mapped again
        [state] = merged_vllm.llm.collective_rpc(pool_state)
        assert state["kv_cache_asleep"] == 0 and state["weights_asleep"] == 0
        assert [r[0].token_ids for r in after] == [r[0].token_ids for r in before]
        sync_while_asleep_serves_the_new_version(merged_vllm, tiny_model_path, model, seed=8, what="kept weights")
    finally:
        merged_vllm.wake_up()
        merged_vllm.keeps_weights = False


def _open_in_child(requests, replies) -> None:
    """A worker's side in its own process: open each handoff it is sent, reply with the sums of
    what it got and of the first handoff's tensors (kept: they must be its own copy)."""
    from rl.rollout.device_handoff import open_tensors

    first = None
    while (shared := requests.get()) is not None:
        got = open_tensors(shared)
        first = first or got
        replies.put(({k: float(v.sum()) for k, v in got.items()}, {k: float(v.sum()) for k, v in first.items()},
                     {k: str(v.device) for k, v in got.items()}))


def test_device_buffers_hand_each_version_to_another_process():
    """CUDA IPC between two processes on one GPU: the learner's buffers are reused (one handle,
    opened once), so every version must still reach the worker, and the worker's tensors must be its
    own copy, untouched when the learner writes the next version."""
    import torch.multiprocessing as mp

    from rl.rollout.device_handoff import DeviceBuffers

    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_open_in_child, args=(requests, replies), daemon=True)
    child.start()
    buffers = DeviceBuffers()
    try:
        sums = []
        for version in range(3):
            g = torch.Generator(device="cuda").manual_seed(version)
            tensors = {"a": torch.randn(16, 64, device="cuda", generator=g),
                       "b": torch.randn(128, 16, device="cuda", generator=g),
                       "half": torch.randn(8, 8, device="cuda", generator=g).to(torch.bfloat16)}
            requests.put(buffers.share(tensors))
            got, first, devices = replies.get(timeout=120)
            want = {k: float(v.sum()) for k, v in tensors.items()}
            assert got == pytest.approx(want, rel=1e-5), f"version {version}: the worker read another version"
            assert all(d.startswith("cuda") for d in devices.values())
            sums.append(want)
            assert first == pytest.approx(sums[0], rel=1e-5), "the worker's first version changed under it"
        assert len(buffers._flat) == 2  # one buffer per dtype, reused by every version
    finally:
        requests.put(None)
        child.join(timeout=60)


def test_tiny_run_merged_hands_the_adapter_over_on_the_gpu(ray_local, tiny_model_path, tmp_path):
    """The tiny recipe colocated with merged weights: rollout.weight_transfer=auto takes CUDA IPC,
    and the served adapter is the learner's at every step (the learner's logprobs of the rollout's
    tokens stay as close as bf16 allows)."""
    from rl.metrics_log import read_metrics
    from test_gpu import run_tiny

    _, seen = run_tiny(tmp_path, steps=3, before_fit=lambda trainer: {"on_gpu": trainer.export_as[1]},
                       engine="vllm", extra=["rollout.weight_sync=merged"])
    assert seen["on_gpu"] is True
    metrics = read_metrics(tmp_path / "gpu")[1:]
    assert len(metrics) == 3
    for i, m in enumerate(metrics):
        print({k: round(v, 5) for k, v in m.items() if k.startswith(("time/sync", "learner/logprob_mismatch",
                                                                       "rollout/merged"))})
        assert m["learner/logprob_mismatch_abs_diff_mean"] < 0.05
        assert i == 0 or m["rollout/merged_direct_write"] == 1.0  # written through the verified map
        assert m["time/sync_s"] > 0 and 0 <= m["rollout/merged_update_error"] <= 1
