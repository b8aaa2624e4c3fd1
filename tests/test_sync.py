"""Learner -> rollout adapter sync: after a sync, vLLM computes what the learner's PEFT model computes.

In fp32, vLLM's per-token logprobs of its own samples must match the HF+PEFT model's
teacher-forced logprobs within 1e-3 for a uniform adapter, a single-module adapter,
a mixed-rank/mixed-alpha adapter (rank_pattern + alpha_pattern) and an rsLoRA one.
Every adapter has non-zero random A and B, so a wrong scale or a stale adapter shows.
"""
from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch

from core.lora import lora_config_from_dict
from rl.config import RolloutConfig
from rl.rollout.engine import SamplingSpec, make_engine
from rl.rollout.pool import slowest_stages, sync_metrics
from rl.rollout.vllm_inplace import PARTS
from rl.rollout.sync import (
    AdapterPayload,
    check_ranks,
    check_unfolded,
    fold_scales_for_vllm,
    gather_lora_state,
    make_payload,
    module_scales,
    write_peft_adapter,
)

MAX_RANK = 16
TOL = 1e-3


def assert_inplace_parts(seconds: dict, path: str, mapped: bool, prefix: str = "") -> None:
    """An in-place sync's report (``prefix``: "time/sync_" in a step's metrics) holds every part
    of its ``path`` stage (rl/rollout/vllm_inplace.py PARTS; ``slot_map`` only where ``mapped``),
    each non-negative, together within the stage: they are pieces of it, timed one after another."""
    parts = {p: seconds[f"{prefix}{p}_s"] for p in PARTS if f"{prefix}{p}_s" in seconds}
    assert set(parts) == set(PARTS) - (set() if mapped else {"slot_map"}), sorted(seconds)
    assert all(v >= 0 for v in parts.values()), parts
    assert sum(parts.values()) <= seconds[f"{prefix}{path}_s"] + 1e-4, (parts, seconds[f"{prefix}{path}_s"])
PROMPTS = [[1, 100, 200, 300], [1, 42, 43], [1, 9000, 12, 13, 14, 15]]

CASES = {
    "uniform": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"]),
    "single-module": dict(r=4, lora_alpha=32, target_modules=["model.layers.1.mlp.down_proj"]),
    "mixed-rank-alpha": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 16, "down_proj": 2},
        alpha_pattern={"v_proj": 32, "model.layers.1.mlp.up_proj": 3}),
    "rslora-mixed-rank": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["v_proj", "o_proj"],
                              rank_pattern={"o_proj": 2}),
}


def teacher_forced_logprobs(model, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logp = (logits / temperature).log_softmax(-1)
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def learner_model(base, config_kwargs, seed):
    """The learner's view: a PEFT model with non-zero random A and B (as after some updates)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_B" in name else 0.2))
    return model.eval()


@pytest.fixture(scope="module")
def base(tiny_model_path):
    from core.models import load_model

    return load_model(tiny_model_path, "float32").eval()


@pytest.fixture(scope="module", params=["adapter", "merged"])
def vllm_engine(request, tiny_model_path, float32_vllm):
    # Both ways of serving: vLLM's LoRA kernels (scales folded into B), and the adapter
    # merged into the base weights and reloaded in place (rl/rollout/merged.py).
    cfg = RolloutConfig(engine="vllm", max_lora_rank=MAX_RANK, max_model_len=256, cpu_kv_cache_gb=1,
                        weight_sync=request.param)
    return make_engine(cfg, tiny_model_path, "float32", seed=0)


@pytest.mark.parametrize("folded", [False, True], ids=["as-peft", "folded-on-learner"])
@pytest.mark.parametrize("case", list(CASES))
def test_vllm_after_sync_matches_learner(case, folded, base, vllm_engine):
    if folded and type(vllm_engine).__name__ != "VLLMEngine":
        pytest.skip("only vLLM's LoRA path takes an adapter folded on the learner")
    model = learner_model(base, CASES[case], seed=len(case))
    # Folded: what the learner sends a vLLM worker (rl.rollout.engine.payload_dtype), through pickle as through Ray.
    payload = make_payload(model, version=(vllm_engine.adapter_version() or 0) + 1,
                           serve_dtype=torch.float32 if folded else None)
    if folded:
        payload = pickle.loads(pickle.dumps(payload))
    if case == "single-module":
        assert len(payload.tensors) == 2, sorted(payload.tensors)
    if case.startswith(("mixed", "rslora")):
        assert len(set(module_scales(payload.tensors, payload.peft_config).values())) > 1
    vllm_engine.load_adapter(payload)
    spec = SamplingSpec(n=2, max_new_tokens=12, temperature=1.0, seed=3)
    worst, base_gap = 0.0, 0.0
    for prompt, row in zip(PROMPTS, vllm_engine.generate(PROMPTS, spec)):
        for c in row:
            got = torch.tensor(c.logprobs)
            worst = max(worst, (got - teacher_forced_logprobs(model, prompt, c.token_ids)).abs().max().item())
            with model.disable_adapter():
                off = teacher_forced_logprobs(model, prompt, c.token_ids)
            base_gap = max(base_gap, (got - off).abs().max().item())
    assert worst < TOL, f"{case}: max |vLLM - learner| logprob = {worst:.2e}"
    # The adapter matters: the base model's logprobs of the same tokens are far off.
    assert base_gap > 10 * TOL, f"{case}: the adapter barely changes the model ({base_gap:.2e})"


@pytest.mark.parametrize("case", ["single-module", "mixed-rank-alpha", "rslora-mixed-rank"])
def test_merged_weights_are_peft_merge_and_unload(case, base):
    from rl.rollout.merged import adapted_weights, merged_weights

    model = learner_model(base, CASES[case], seed=7)
    payload = make_payload(model, version=1)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    merged, error = merged_weights(base_sd, payload.tensors, payload.peft_config)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], base_sd[k])]
    assert len(changed) == len(payload.tensors) // 2  # one weight per adapted module, the rest untouched
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(base_sd[k], v) for k, v in base.state_dict().items())  # the base copy is kept
    # What a GPU engine writes in place: exactly the changed weights, the same values.
    adapted, same_error = adapted_weights(base_sd, payload.tensors, payload.peft_config)
    assert sorted(adapted) == sorted(changed)
    assert all(torch.equal(adapted[k], merged[k]) for k in adapted)
    assert error == same_error < 1e-4  # float32 keeps the update, up to float32's own rounding


def test_merge_chunks_give_the_same_weights(base, monkeypatch):
    """Modules of one shape and rank are merged together, in chunks bounded by size: a chunk of one
    module and chunks of all of them give the same weights and the same error."""
    import rl.rollout.merged as merged_mod

    model = learner_model(base, CASES["rslora-mixed-rank"], seed=3)
    payload = make_payload(model, version=1)
    base_sd = {k: v.clone().to(torch.bfloat16) for k, v in base.state_dict().items()}
    together, error = merged_mod.adapted_weights(base_sd, payload.tensors, payload.peft_config)
    monkeypatch.setattr(merged_mod, "_CHUNK_ELEMENTS", 1)
    alone, error_alone = merged_mod.adapted_weights(base_sd, payload.tensors, payload.peft_config)
    assert sorted(together) == sorted(alone) and len(together) == len(payload.tensors) // 2
    assert all(w.dtype == torch.bfloat16 for w in together.values())
    torch.testing.assert_close(together, alone, atol=0, rtol=0)
    assert error == pytest.approx(error_alone, rel=1e-5)


def test_merged_update_error_is_what_bf16_rounding_takes_from_the_update():
    from rl.rollout.merged import adapted_weights

    torch.manual_seed(0)
    module = "model.layers.0.mlp.down_proj"
    base = {f"{module}.weight": torch.randn(64, 32).to(torch.bfloat16)}
    config = {"r": 4, "lora_alpha": 4, "target_modules": ["down_proj"]}

    def error(b_scale: float) -> float:
        tensors = {f"base_model.model.{module}.lora_A.weight": torch.randn(4, 32),
                   f"base_model.model.{module}.lora_B.weight": b_scale * torch.randn(64, 4)}
        return adapted_weights(base, tensors, config)[1]

    # bf16 keeps 8 significant bits: an update far below half a unit in the last place of
    # weights of order 1 (about 2e-3) is rounded away whole; one far above it survives to within
    # that half unit; a zero update (B = 0, a run's first version) has no error.
    assert error(1e-6) == pytest.approx(1.0, abs=1e-3)
    assert error(1.0) < 0.01
    assert 0.01 < error(1e-3) < 1.0
    assert error(0.0) == 0.0


@pytest.mark.timeout(120)
def test_over_rank_adapter_fails_fast_in_one_line(base, vllm_engine):
    model = learner_model(base, dict(r=8, lora_alpha=16, target_modules=["v_proj", "down_proj"],
                                     rank_pattern={"model.layers.1.mlp.down_proj": 32}), seed=1)
    payload = make_payload(model, version=1000)
    with pytest.raises(ValueError) as err:
        vllm_engine.load_adapter(payload)
    msg = str(err.value)
    assert "\n" not in msg
    assert "32" in msg and "model.layers.1.mlp.down_proj" in msg and "rollout.max_lora_rank=16" in msg
    assert "raise rollout.max_lora_rank" in msg
    # The engine was never handed the adapter and still serves.
    assert vllm_engine.adapter_version() != 1000
    assert vllm_engine.generate([[1, 2, 3]], SamplingSpec(n=1, max_new_tokens=2, temperature=0))


def test_check_ranks_reads_tensors_too():
    cfg = dict(r=8, lora_alpha=16, rank_pattern={})
    check_ranks(cfg, 8)
    tensors = {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(64, 4)}
    with pytest.raises(ValueError, match=r"rank 64 of module 'model.layers.0.mlp.down_proj' exceeds"):
        check_ranks(cfg, 32, tensors)
    with pytest.raises(ValueError, match=r"rank 8 of module r \(the default rank\)"):
        check_ranks(cfg, 4)


def test_fold_multiplies_each_b_by_its_peft_scale(base):
    model = learner_model(base, CASES["mixed-rank-alpha"], seed=2)
    payload = make_payload(model, version=1)
    folded, cfg = fold_scales_for_vllm(payload.tensors, payload.peft_config)
    # The exported global scale is exactly 1 and no pattern is left for a server to misread.
    assert cfg["lora_alpha"] == cfg["r"] == 16 and not cfg["use_rslora"]
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    # Against PEFT's own per-module scaling of the live model.
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len({m.scaling["default"] for _, m in layers}) > 1
    for name, module in layers:
        key = f"base_model.model.{name.removeprefix('base_model.model.')}"
        b = payload.tensors[key + ".lora_B.weight"]
        torch.testing.assert_close(folded[key + ".lora_B.weight"], b * module.scaling["default"])
        torch.testing.assert_close(folded[key + ".lora_A.weight"], payload.tensors[key + ".lora_A.weight"])
    assert payload.tensors is not folded  # inputs untouched


@pytest.mark.parametrize("case", ["mixed-rank-alpha", "rslora-mixed-rank"])
def test_payload_folded_on_learner_is_the_worker_fold_then_the_served_cast(case, base):
    model = learner_model(base, CASES[case], seed=4)
    plain = make_payload(model, version=3)
    expected, expected_cfg = fold_scales_for_vllm(plain.tensors, plain.peft_config)
    for dtype in (torch.float32, torch.bfloat16):
        sent = make_payload(model, version=3, serve_dtype=dtype)
        got = pickle.loads(pickle.dumps(sent))  # as Ray's object store carries it
        assert got.folded and got.peft_config == expected_cfg and set(got.tensors) == set(expected)
        for k, v in expected.items():
            # Folded in float32 before the cast: bit for bit what vLLM made of the old payload.
            assert got.tensors[k].dtype == dtype and torch.equal(got.tensors[k], v.to(dtype)), k
        assert got.timings["gather_s"] >= 0 and got.timings["sent_at"] > 0 and "unpack_s" in got.timings
    with pytest.raises(ValueError, match="folded for vLLM's LoRA kernels"):
        check_unfolded(sent)
    check_unfolded(plain)


def test_payload_pickles_as_one_flat_buffer_per_dtype():
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn((i % 5 + 1, 7), generator=gen).to(torch.bfloat16 if i % 3 else torch.float32)
               for i in range(300)}
    payload = AdapterPayload(9, tensors, {"r": 4}, timings={"sent_at": 1.0})
    blob = pickle.dumps(payload)
    # Tensor by tensor, 300 small tensors pickled to several times their bytes.
    assert len(blob) < payload.num_bytes() + 20_000, (len(blob), payload.num_bytes())
    back = pickle.loads(blob)
    assert back.version == 9 and back.peft_config == {"r": 4} and not back.folded
    assert list(back.tensors) == list(tensors)
    for k, v in tensors.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k], v)
    back.tensors["t1"].mul_(2)  # writable, and its own memory: the sender's tensors are untouched
    assert torch.equal(tensors["t1"], pickle.loads(blob).tensors["t1"])


def test_slowest_stages_takes_each_stage_from_the_slowest_worker():
    reports = [{"version": 3, "add_lora_s": 0.2, "fold_s": 0.01}, {"version": 3, "add_lora_s": 0.1, "fold_s": 0.05}]
    assert slowest_stages(reports) == {"add_lora_s": 0.2, "fold_s": 0.05}
    assert slowest_stages([]) == {}
    # Merged weights: the worst worker's error, and each kind of value under its own metric name.
    # A direct write counts only where every worker made it.
    merged = [{"sync_path": "merged", "merge_s": 0.1, "merged_update_error": 0.2, "merged_direct_write": 1.0},
              {"sync_path": "merged", "merge_s": 0.3, "merged_update_error": 0.1, "merged_direct_write": 0.0}]
    assert sync_metrics(slowest_stages(merged)) == {"time/sync_merge_s": 0.3, "rollout/merged_update_error": 0.2,
                                                    "rollout/merged_direct_write": 0.0}
    assert slowest_stages(merged[:1])["merged_direct_write"] == 1.0


def test_written_adapter_loads_in_peft_and_computes_the_same(base, tmp_path):
    from peft import PeftModel

    model = learner_model(base, CASES["mixed-rank-alpha"], seed=4)
    payload = make_payload(model, version=3)
    json.dumps(payload.peft_config)
    folder = write_peft_adapter(payload, tmp_path / "adapter")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base).eval(), folder).eval()
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    cfg = lora_config_from_dict(payload.peft_config)
    assert cfg.rank_pattern == CASES["mixed-rank-alpha"]["rank_pattern"]


def _fsdp_gather(rank: int, world: int, init_file: str, model_path: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from core.models import load_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = learner_model(load_model(model_path, "float32"), CASES["mixed-rank-alpha"], seed=6)
        expected = {k: v.clone() for k, v in make_payload(model, 1).tensors.items()}
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert any(isinstance(p, DTensor) for n, p in model.named_parameters() if "lora_" in n)
        got = gather_lora_state(model)
        if world == 3 and rank == 2:  # a rank-2 module over 3 ranks: shards of 1, 1 and 0 rows, gathered at once
            assert any(p.to_local().shape[0] == 0 for n, p in model.named_parameters() if "lora_A" in n)
        if rank == 0:
            torch.save({"expected": expected, "got": got}, out)
        # Both ranks reach teardown together: a rank that tears gloo down while its peer
        # still holds the pair connection can abort the peer ("terminate called ...", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3], ids=["two-ranks", "three-ranks-uneven-and-empty-shards"])
def test_gather_lora_state_under_fsdp2(world, tiny_model_path, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "gathered.pt")
    mp.spawn(_fsdp_gather, args=(world, str(tmp_path / "init"), tiny_model_path, out), nprocs=world, join=True)
    result = torch.load(out)
    assert set(result["got"]) == set(result["expected"]) and result["got"]
    for k, v in result["expected"].items():
        assert result["got"][k].device.type == "cpu" and not hasattr(result["got"][k], "full_tensor")
        torch.testing.assert_close(result["got"][k], v, rtol=0, atol=0)


@pytest.mark.slow
def test_training_steps_log_each_sync_stage(ray_local, tiny_model_path, tmp_path):
    """The real trainer with vLLM's LoRA path: every step logs where its sync's time went."""
    from rl.config import load_config
    from rl.metrics_log import read_metrics
    from rl.trainer import Trainer

    recipe = os.path.join(os.path.dirname(__file__), "..", "launch", "configs", "tiny.yaml")
    cfg = load_config(recipe, [f"logging.output_dir={tmp_path}", "logging.run_name=stages", "trainer.steps=2",
                               "trainer.eval_size=0", "logging.progress=false", "logging.tensorboard=false",
                               "rollout.weight_sync=adapter", "trainer.save_every=10"])
    trainer = Trainer(cfg, tmp_path / "stages")
    try:
        trainer.fit()
    finally:
        trainer.close()
    steps = [m for m in read_metrics(tmp_path / "stages") if "time/step_s" in m]
    assert len(steps) == 2
    # The run's first version goes through add_lora; the next has the same structure and is
    # written into vLLM's LoRA slot in place (rl/rollout/vllm_inplace.py).
    paths = [("write", "add_lora", "remove"), ("inplace",)]
    for m, path in zip(steps, paths):
        # vLLM's own call and the rows built from it lie inside the rollout the driver timed.
        engine_s = m["time/rollout_generate_s"] + m["time/rollout_rows_s"]
        assert 0 < m["time/rollout_generate_s"] <= engine_s <= m["time/rollout_s"]
        stages = {k for k in m if k.startswith("time/sync_") and k != "time/sync_s"}
        assert {f"time/sync_{s}_s" for s in ("gather", "transfer", "unpack", "fold", *path)} <= stages, sorted(stages)
        other = {"time/sync_inplace_s"} if "write" in path else {"time/sync_write_s", "time/sync_add_lora_s"}
        assert not other & stages, sorted(stages)
        assert all(m[k] >= 0 for k in stages)
        parts = {f"time/sync_{p}_s" for p in PARTS}
        if "inplace" in path:  # vLLM's path, then the slot map for the direct writes that follow
            assert_inplace_parts(m, "inplace", mapped=True, prefix="time/sync_")
        else:
            assert not parts & stages, sorted(stages)
        # The stages after the gather happen one after another inside the sync (unpack is part of
        # transfer, the in-place parts are parts of the in-place stage): together they cannot
        # exceed it. The gather is asked for before the wake and may lie before the sync's clock.
        after_gather = stages - parts - {"time/sync_unpack_s", "time/sync_gather_s"}
        assert sum(m[k] for k in after_gather) <= m["time/sync_s"] + 0.05


def test_a_merger_kept_across_versions_merges_each_as_a_fresh_one(base):
    """The engine keeps one AdapterMerger while versions keep their structure: its buffers are
    reused, so version 2 must come out exactly as a merger built for it alone would give it,
    and version 1's results are overwritten, not added to."""
    from rl.rollout.merged import AdapterMerger, adapted_weights

    base_sd = {k: v.clone().to(torch.bfloat16) for k, v in base.state_dict().items()}
    first = make_payload(learner_model(base, CASES["mixed-rank-alpha"], seed=1), version=1)
    second = make_payload(learner_model(base, CASES["mixed-rank-alpha"], seed=2), version=2)
    kept = AdapterMerger(base_sd, first.tensors, first.peft_config)
    assert kept.structure == AdapterMerger.signature(second.tensors, second.peft_config)
    kept.merge(first.tensors)
    again, error = kept.merge(second.tensors)
    fresh, fresh_error = adapted_weights(base_sd, second.tensors, second.peft_config)
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)
    assert error == pytest.approx(fresh_error, rel=1e-6)
    other = make_payload(learner_model(base, CASES["uniform"], seed=3), version=3)
    assert AdapterMerger.signature(other.tensors, other.peft_config) != kept.structure  # a new merger then
