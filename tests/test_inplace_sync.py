"""vLLM's served adapter updated in place (rl/rollout/vllm_inplace.py) serves what add_lora serves.

A run's first version goes through add_lora; later versions with the same modules and
ranks are written into the served LoRA slot. After several in-place updates with fresh
random adapters (mixed ranks, alphas that change between versions), vLLM's logprobs of
fixed prompts, including one whose KV blocks were cached under the previous version,
equal those after a fresh add_lora of the same adapter, and match the learner's PEFT
model. A change of ranks falls back to add_lora.
"""
from __future__ import annotations

import pickle

import pytest
import torch

from rl.config import RolloutConfig
from rl.rollout.engine import SamplingSpec, make_engine
from rl.rollout.sync import make_payload
from rl.rollout.vllm_inplace import SlotMismatch, adapter_signature, update_served_adapter
from test_sync import learner_model, teacher_forced_logprobs

TOL = 1e-3
MODULES = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Same modules and ranks in every version; the alphas differ (folded into B, so in place).
VERSIONS = [dict(r=4, lora_alpha=8, target_modules=MODULES,
                 rank_pattern={"model.layers.0.self_attn.q_proj": 16, "down_proj": 2},
                 alpha_pattern={"v_proj": alpha, "model.layers.1.mlp.up_proj": 3}) for alpha in (32, 5, 32, 11)]
OTHER_RANKS = dict(VERSIONS[0], rank_pattern={"model.layers.0.self_attn.q_proj": 8, "down_proj": 2})
# The long prompt fills whole KV blocks (vLLM caches full blocks only) and is served before each update.
LONG = [1] + [(13 * i) % 900 + 20 for i in range(299)]
PROMPTS = [LONG, [1, 42, 43], [1, 9000, 12, 13, 14, 15]]
SPEC = SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=5)


@pytest.fixture(scope="module")
def base(tiny_model_path):
    from core.models import load_model

    return load_model(tiny_model_path, "float32").eval()


@pytest.fixture(scope="module")
def engine(tiny_model_path, float32_vllm):
    cfg = RolloutConfig(engine="vllm", max_lora_rank=16, max_model_len=512, cpu_kv_cache_gb=1, weight_sync="adapter")
    return make_engine(cfg, tiny_model_path, "float32", seed=0)


def _payload(model, version):
    # What a learner sends a vLLM worker: folded for vLLM, through pickle as through Ray.
    return pickle.loads(pickle.dumps(make_payload(model, version, serve_dtype=torch.float32)))


def _served(engine):
    out = engine.generate(PROMPTS, SPEC)
    return [[c.token_ids for c in row] for row in out], [[c.logprobs for c in row] for row in out]


def _worst_gap_to(model, served_ids, served_logprobs):
    worst = 0.0
    for prompt, ids_row, lp_row in zip(PROMPTS, served_ids, served_logprobs):
        for ids, lps in zip(ids_row, lp_row):
            ref = teacher_forced_logprobs(model, prompt, ids)
            worst = max(worst, (torch.tensor(lps) - ref).abs().max().item())
    return worst


def _load(engine, payload, inplace: bool) -> dict:
    kept, engine.inplace_sync = engine.inplace_sync, inplace
    try:
        return engine.load_adapter(payload)
    finally:
        engine.inplace_sync = kept


def test_adapter_signature_sees_ranks_not_values():
    a = {"x.lora_A.weight": torch.zeros(4, 8), "x.lora_B.weight": torch.zeros(8, 4)}
    same = {k: torch.randn(v.shape) for k, v in a.items()}
    cfg = {"r": 4, "lora_alpha": 4, "use_rslora": False}
    assert adapter_signature(a, cfg) == adapter_signature(same, dict(cfg))
    other_rank = {"x.lora_A.weight": torch.zeros(2, 8), "x.lora_B.weight": torch.zeros(8, 2)}
    assert adapter_signature(a, cfg) != adapter_signature(other_rank, cfg)
    assert adapter_signature(a, cfg) == adapter_signature({k: v.bfloat16() for k, v in a.items()}, cfg)
    assert adapter_signature(a, cfg) != adapter_signature(dict(a, **{"y.lora_A.weight": torch.zeros(4, 8)}), cfg)


def test_inplace_updates_serve_what_a_fresh_add_lora_serves(engine, base):
    assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    assert len(LONG) >= 2 * engine.llm.llm_engine.vllm_config.cache_config.block_size
    first = (engine.adapter_version() or 0) + 1
    report = engine.load_adapter(_payload(learner_model(base, VERSIONS[0], seed=100), first))
    assert report["sync_path"] == "add_lora"
    served_id = engine._lora.lora_int_id
    previous = _served(engine)  # caches LONG's blocks under the served adapter's name
    for i, config in enumerate(VERSIONS[1:], start=1):
        model = learner_model(base, config, seed=100 + i)
        payload = _payload(model, first + i)
        report = engine.load_adapter(payload)
        # The in-place path, not add_lora: no folder, no new id.
        assert report["sync_path"] == "inplace" and "inplace_s" in report, report
        assert not {"write_s", "add_lora_s", "remove_s"} & set(report)
        assert engine._lora.lora_int_id == served_id and engine.loaded_lora_ids() == {served_id}
        assert engine.adapter_version() == first + i
        inplace = _served(engine)
        assert inplace[0] != previous[0], "the update changed nothing that was served"
        worst = _worst_gap_to(model, *inplace)
        assert worst < TOL, f"version {i}: max |vLLM in place - learner| logprob = {worst:.2e}"
        # The same adapter through add_lora (a new id, nothing cached for it): the same samples.
        assert _load(engine, payload, inplace=False)["sync_path"] == "add_lora"
        fresh = _served(engine)
        assert fresh[0] == inplace[0]
        torch.testing.assert_close(torch.tensor(sum(fresh[1], [])), torch.tensor(sum(inplace[1], [])),
                                   atol=1e-5, rtol=0)
        # Back to the in-place path for the next version, from an id that add_lora registered.
        served_id, previous = engine._lora.lora_int_id, fresh


def test_changed_ranks_fall_back_to_add_lora(engine, base):
    version = (engine.adapter_version() or 0) + 1
    engine.load_adapter(_payload(learner_model(base, VERSIONS[0], seed=7), version))
    old_id = engine._lora.lora_int_id
    model = learner_model(base, OTHER_RANKS, seed=8)
    report = engine.load_adapter(_payload(model, version + 1))
    assert report["sync_path"] == "add_lora" and "add_lora_s" in report and "inplace_s" not in report
    assert engine._lora.lora_int_id != old_id and engine.loaded_lora_ids() == {engine._lora.lora_int_id}
    assert _worst_gap_to(model, *_served(engine)) < TOL
    # The new structure is the served one now: its next version goes in place again.
    model = learner_model(base, OTHER_RANKS, seed=9)
    assert engine.load_adapter(_payload(model, version + 2))["sync_path"] == "inplace"
    assert _worst_gap_to(model, *_served(engine)) < TOL


def test_unregistered_id_is_declined_and_the_slot_read_back_catches_stale_values(engine, base):
    version = (engine.adapter_version() or 0) + 1
    payload = _payload(learner_model(base, VERSIONS[0], seed=11), version)
    engine.load_adapter(payload)
    reason = update_served_adapter(engine.llm, 10_000, payload.tensors, payload.peft_config)
    assert reason and "not registered" in reason
    lora_id = engine._lora.lora_int_id

    def read_back(worker, tensors):
        from rl.rollout.vllm_inplace import _check_slot, _probe, _weights_mapper

        manager = worker.model_runner.lora_manager._adapter_manager
        name, slices = _probe(manager, tensors, _weights_mapper(manager.model))
        index = manager.lora_index_to_id.index(lora_id)
        _check_slot(manager.modules[name], index, slices, name)
        return name

    # The slot holds the payload; values that are not there are caught in one line.
    assert engine.llm.collective_rpc(read_back, args=(payload.tensors,))
    stale = {k: v + 1 if k.endswith("lora_B.weight") else v for k, v in payload.tensors.items()}
    with pytest.raises(SlotMismatch, match=r"does not hold the adapter just written in place; set rollout\.inplace_sync"):
        engine.llm.collective_rpc(read_back, args=(stale,))
