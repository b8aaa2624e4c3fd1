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

from test_gpu import vllm_vs_learner  # noqa: E402
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
    merged_vllm.sleep()
    newer, payload = payload_for(tiny_model_path, "uniform", seed=6, version=merged_vllm.adapter_version() + 1)
    merged_vllm.load_adapter(payload)
    sample = SamplingSpec(n=2, max_new_tokens=16, temperature=1.0, seed=9)
    d_new, _ = vllm_vs_learner(merged_vllm, newer, PROMPTS, sample)
    d_old, _ = vllm_vs_learner(merged_vllm, model, PROMPTS, sample)
    print(f"after a sync while asleep: vs the new version mean {d_new.mean():.2e}, vs the previous {d_old.mean():.2e}")
    assert float(d_new.mean()) < 0.05 and float(d_old.mean()) > 2 * float(d_new.mean())
