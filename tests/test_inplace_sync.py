"""vLLM's served adapter updated in place (rl/rollout/vllm_inplace.py) serves what add_lora serves.

A run's first version goes through add_lora; later versions with the same modules and
ranks are written into the served LoRA slot. After several in-place updates with fresh
random adapters (mixed ranks, alphas that change between versions), vLLM's logprobs of
fixed prompts, including one whose KV blocks were cached under the previous version,
equal those after a fresh add_lora of the same adapter, and match the learner's PEFT
model. A change of ranks falls back to add_lora.

After vLLM's own re-activation has served one in-place version, later ones are written
straight into the slots through a verified map (rl/rollout/vllm_slots.py): every slot
then holds, bitwise, what vLLM's own path writes for the same payload, the registered
LoRAModel's CPU tensors hold the new version, and a map that fails its read-back is never
used.
"""
from __future__ import annotations

import pickle

import pytest
import torch

from rl.config import RolloutConfig
from rl.rollout.engine import SamplingSpec, make_engine
from rl.rollout.sync import make_payload
from rl.rollout.vllm_inplace import SlotMismatch, adapter_signature, update_served_adapter
from test_sync import assert_inplace_parts, learner_model, teacher_forced_logprobs

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


def _load(engine, payload, inplace: bool = True, direct: bool = True) -> dict:
    kept = engine.inplace_sync, engine.inplace_direct
    engine.inplace_sync, engine.inplace_direct = inplace, direct
    try:
        return engine.load_adapter(payload)
    finally:
        engine.inplace_sync, engine.inplace_direct = kept


def test_adapter_signature_sees_ranks_not_values():
    a = {"x.lora_A.weight": torch.zeros(4, 8), "x.lora_B.weight": torch.zeros(8, 4)}
    same = {k: torch.randn(v.shape) for k, v in a.items()}
    cfg = {"r": 4, "lora_alpha": 4, "use_rslora": False}
    assert adapter_signature(a, cfg) == adapter_signature(same, dict(cfg))
    other_rank = {"x.lora_A.weight": torch.zeros(2, 8), "x.lora_B.weight": torch.zeros(8, 2)}
    assert adapter_signature(a, cfg) != adapter_signature(other_rank, cfg)
    assert adapter_signature(a, cfg) == adapter_signature({k: v.bfloat16() for k, v in a.items()}, cfg)
    assert adapter_signature(a, cfg) != adapter_signature(dict(a, **{"y.lora_A.weight": torch.zeros(4, 8)}), cfg)


def test_the_scale_vllm_folds_is_one_for_a_folded_payload():
    from rl.rollout.sync import fold_scales_for_vllm
    from rl.rollout.vllm_slots import MapDeclined, vllm_scale

    tensors = {"x.lora_A.weight": torch.zeros(4, 8), "x.lora_B.weight": torch.zeros(8, 4)}
    raw = {"r": 4, "lora_alpha": 32, "use_rslora": True, "alpha_pattern": {"x": 3}}
    assert vllm_scale(fold_scales_for_vllm(tensors, raw)[1]) == 1.0
    assert vllm_scale({"r": 4, "lora_alpha": 8}) == 2.0 and vllm_scale({"r": 4, "lora_alpha": 8, "use_rslora": True}) == 4.0
    with pytest.raises(MapDeclined, match="per-module"):
        vllm_scale(raw)


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
        # The in-place path, not add_lora: no folder, no new id. vLLM's path under an id that add_lora
        # registered, then the slots mapped.
        assert report["sync_path"] == "inplace" and "inplace_s" in report, report
        assert_inplace_parts(report, "inplace", mapped=True)
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
    reason, path, parts = update_served_adapter(engine.llm, 10_000, payload.tensors, payload.peft_config)
    assert reason and "not registered" in reason and path == "" and parts == {}
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


def _slots(worker, lora_id):
    """Runs in vLLM's worker: every LoRA layer's slot of ``lora_id`` and the registered CPU tensors."""
    manager = worker.model_runner.lora_manager._adapter_manager
    index = manager.lora_index_to_id.index(lora_id)
    slots = {f"{name}.{kind}{i}": stacked[index].clone()
             for name, layer in manager.modules.items()
             for kind in ("a", "b") for i, stacked in enumerate(getattr(layer, f"lora_{kind}_stacked"))}
    held = {}
    for name, w in manager.get_adapter(lora_id).loras.items():
        for kind in ("a", "b"):
            for i, t in enumerate(w.lora_a if kind == "a" and isinstance(w.lora_a, list) else
                                  w.lora_b if kind == "b" and isinstance(w.lora_b, list) else
                                  [getattr(w, f"lora_{kind}")]):
                if t is not None:
                    held[f"{name}.{kind}{i}"] = t.clone()
    return slots, held


def _snapshot(engine):
    return engine.llm.collective_rpc(_slots, args=(engine._lora.lora_int_id,))[0]


def _assert_bitwise(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{what}: {len(differ)} of {len(want)} differ, e.g. {differ[:3]}"


def test_direct_writes_equal_what_vllms_own_path_writes(engine, base):
    version = (engine.adapter_version() or 0) + 1
    assert _load(engine, _payload(learner_model(base, VERSIONS[0], seed=200), version), inplace=False)["sync_path"] == "add_lora"
    _served(engine)  # vLLM activates the adapter into a slot on first use
    # The first in-place version goes through vLLM's own re-activation, which the slot map is verified against.
    report = engine.load_adapter(_payload(learner_model(base, VERSIONS[1], seed=201), version + 1))
    assert report["sync_path"] == "inplace" and "inplace_s" in report and "inplace_direct_s" not in report, report
    served_id = engine._lora.lora_int_id
    for i in range(2, 6):  # four versions through the direct write; alphas change between them
        model = learner_model(base, VERSIONS[i % len(VERSIONS)], seed=200 + i)
        payload = _payload(model, version + i)
        report = engine.load_adapter(payload)
        assert report["sync_path"] == "inplace" and "inplace_direct_s" in report and "inplace_s" not in report, report
        assert_inplace_parts(report, "inplace_direct", mapped=False)
        assert engine._lora.lora_int_id == served_id and engine.adapter_version() == version + i
        direct_slots, direct_held = _snapshot(engine)
        direct = _served(engine)
        assert _worst_gap_to(model, *direct) < TOL
        # The same payload through vLLM's own path (rebuild, pack, re-activate): the same bits everywhere.
        report = _load(engine, payload, direct=False)
        assert "inplace_s" in report and "inplace_direct_s" not in report, report
        assert_inplace_parts(report, "inplace", mapped=False)
        vllm_slots, vllm_held = _snapshot(engine)
        _assert_bitwise(direct_slots, vllm_slots, f"version {i}: slots after the direct write vs vLLM's")
        # The registered LoRAModel held the new version too (a re-activation by vLLM serves it).
        _assert_bitwise(direct_held, vllm_held, f"version {i}: registered CPU tensors")
        again = _served(engine)
        assert again[0] == direct[0]
        torch.testing.assert_close(torch.tensor(sum(again[1], [])), torch.tensor(sum(direct[1], [])), atol=0, rtol=0)
    # The direct writes wrote something: the last version's slots differ from the first's.
    assert any(not torch.equal(t, 0 * t) for t in direct_slots.values())
    # And what the last direct version serves is what a fresh add_lora of it serves.
    assert _load(engine, payload, inplace=False)["sync_path"] == "add_lora"
    fresh = _served(engine)
    assert fresh[0] == direct[0]
    torch.testing.assert_close(torch.tensor(sum(fresh[1], [])), torch.tensor(sum(direct[1], [])), atol=1e-5, rtol=0)


def test_a_slot_map_that_fails_verification_is_never_used(engine, base, monkeypatch):
    from rl.rollout import vllm_slots

    real_build = vllm_slots.build_slot_map
    tampered = []

    def tamper_then_build(manager, lora_id, tensors, *args):
        # A slot region that does not hold what vLLM was given, just before the map's read-back.
        layer = next(m for name, m in manager.modules.items() if name.endswith("0.self_attn.qkv_proj"))
        layer.lora_a_stacked[0][manager.lora_index_to_id.index(lora_id), 0, 0, 0] += 1.0
        tampered.append(lora_id)
        return real_build(manager, lora_id, tensors, *args)

    def stored(worker):
        return getattr(worker, vllm_slots.ATTR, None)

    monkeypatch.setattr(vllm_slots, "build_slot_map", tamper_then_build)
    version = (engine.adapter_version() or 0) + 1
    try:
        engine.llm.collective_rpc(vllm_slots.remember, args=(None,))
        assert _load(engine, _payload(learner_model(base, VERSIONS[0], seed=300), version), inplace=False)["sync_path"] == "add_lora"
        _served(engine)
        for i in range(1, 4):
            model = learner_model(base, VERSIONS[i], seed=300 + i)
            report = engine.load_adapter(_payload(model, version + i))
            # vLLM's own path every time: the tampered map was refused and mapping is not retried.
            assert report["sync_path"] == "inplace" and "inplace_s" in report and "inplace_direct_s" not in report
            why = engine.llm.collective_rpc(stored)[0]
            assert isinstance(why, str) and "does not hold the mapped payload" in why, why
            # The tampered region was written again by vLLM: what is served is the learner's adapter.
            assert _worst_gap_to(model, *_served(engine)) < TOL
        assert len(tampered) == 1
    finally:
        engine.llm.collective_rpc(vllm_slots.remember, args=(None,))


def test_a_direct_write_that_does_not_land_falls_back_to_vllms_path(engine, base, monkeypatch):
    from rl.rollout import vllm_slots

    version = (engine.adapter_version() or 0) + 1
    engine.llm.collective_rpc(vllm_slots.remember, args=(None,))
    assert _load(engine, _payload(learner_model(base, VERSIONS[0], seed=400), version), inplace=False)["sync_path"] == "add_lora"
    _served(engine)
    assert "inplace_s" in engine.load_adapter(_payload(learner_model(base, VERSIONS[1], seed=401), version + 1))
    real_write = vllm_slots.write_direct

    def write_then_spoil(slot_map, tensors):
        real_write(slot_map, tensors)
        name, _ = vllm_slots.probe_slices(slot_map, tensors)  # the layer the read-back checks
        slot_map.manager.modules[name].lora_b_stacked[0][slot_map.index, 0, 0, 0] += 1.0

    monkeypatch.setattr(vllm_slots, "write_direct", write_then_spoil)
    try:
        model = learner_model(base, VERSIONS[2], seed=402)
        report = engine.load_adapter(_payload(model, version + 2))
        assert "inplace_s" in report and "inplace_direct_s" not in report, report
        assert _worst_gap_to(model, *_served(engine)) < TOL
        model = learner_model(base, VERSIONS[3], seed=403)
        assert "inplace_s" in engine.load_adapter(_payload(model, version + 3))  # not retried
        assert _worst_gap_to(model, *_served(engine)) < TOL
        assert "direct write failed" in engine.llm.collective_rpc(lambda w: getattr(w, vllm_slots.ATTR))[0]
    finally:
        engine.llm.collective_rpc(vllm_slots.remember, args=(None,))
