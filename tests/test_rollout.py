"""Both rollout engines (vLLM in-process, plain transformers) against the same checks.

Every engine test runs once per engine on one shared engine per module. The model is
the tiny random Llama with one extra eos id: a token that greedy decoding of prompt
A emits at step 3, so that stopping at eos can be observed on a random model.
References are teacher-forced forwards of plain transformers (+ PEFT).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from rl.config import RolloutConfig
from rl.rollout.engine import Completion, SamplingSpec, make_engine
from rl.rollout.sync import AdapterPayload, make_payload

PROMPT_A = [1, 100, 200, 300]
CANDIDATES_B = [[1, 5, 6, 7, 8, 9, 10], [1, 4000, 17, 923], [1, 77, 78, 79, 80]]
STOP_STEP = 3
MAX_RANK = 16
TOL = 1e-3


def teacher_forced_logprobs(model, prompt, completion, temperature=1.0, top_p=1.0):
    """log p(completion | prompt) per token, under softmax(logits / T) (top-p renormalised)."""
    from rl.rollout.hf_engine import top_p_mask

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    if temperature > 0:
        logits = top_p_mask(logits / temperature, top_p)
    logp = logits.log_softmax(-1)
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def greedy_reference(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def lora_payload(base, config, seed, version, b_std=0.5):
    """A PEFT model with non-zero random A and B, and its payload."""
    from peft import get_peft_model

    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (b_std if "lora_B" in name else 0.2))
    return model.eval(), make_payload(model, version)


@pytest.fixture(scope="module")
def stop_model(tiny_model_path, base_model, tmp_path_factory):
    """The tiny Llama with an extra eos id chosen from its own greedy output; returns (path, facts)."""
    base = base_model
    greedy_a = greedy_reference(base, PROMPT_A, STOP_STEP + 1)
    stop = greedy_a[STOP_STEP]
    stop_at = greedy_a.index(stop)  # greedy stops at the first occurrence
    prompt_b, greedy_b = next((p, g) for p in CANDIDATES_B
                              if stop not in (g := greedy_reference(base, p, 8)))
    dest = tmp_path_factory.mktemp("stop-model")
    for f in os.listdir(tiny_model_path):
        src = os.path.join(tiny_model_path, f)
        if f != "generation_config.json":
            os.symlink(src, dest / f)
    gen_cfg = json.loads(open(os.path.join(tiny_model_path, "generation_config.json")).read())
    gen_cfg["eos_token_id"] = [gen_cfg["eos_token_id"], stop]
    (dest / "generation_config.json").write_text(json.dumps(gen_cfg))
    facts = dict(stop=stop, stop_at=stop_at, greedy_a=greedy_a[:stop_at + 1], prompt_b=prompt_b,
                 greedy_b=greedy_b)
    return str(dest), facts


@pytest.fixture(scope="module")
def base_model(tiny_model_path):
    from core.models import load_model

    return load_model(tiny_model_path, "float32").eval()


@pytest.fixture(scope="module", params=["vllm", "vllm-merged", "hf"])
def engine(request, stop_model):
    # vllm: vLLM's LoRA kernels serve the adapter; vllm-merged: the adapter is folded into
    # the base weights and reloaded in place (rl/rollout/merged.py, the CPU default).
    name, _, sync = request.param.partition("-")
    if name == "vllm":
        request.getfixturevalue("float32_vllm")
    cfg = RolloutConfig(engine=name, max_lora_rank=MAX_RANK, max_model_len=256, cpu_kv_cache_gb=1,
                        weight_sync=sync or "adapter")
    eng = make_engine(cfg, stop_model[0], "float32", seed=0)
    yield eng
    del eng


def _lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"], **kw})


def _check_completion(c: Completion, max_new: int, stop_ids: set[int]):
    assert len(c.token_ids) == len(c.logprobs) >= 1
    assert all(lp <= 1e-6 for lp in c.logprobs)
    assert not any(t in stop_ids for t in c.token_ids[:-1]), "generation ran past an eos token"
    if c.finish_reason == "stop":
        assert c.token_ids[-1] in stop_ids
    else:
        assert c.finish_reason == "length" and len(c.token_ids) == max_new
    assert isinstance(c.text, str)


def test_shapes_n_and_finish_reasons(engine, stop_model):
    _, facts = stop_model
    stop_ids = {2, facts["stop"]}
    prompts = [PROMPT_A, facts["prompt_b"], [1, 42]]
    out = engine.generate(prompts, SamplingSpec(n=3, max_new_tokens=6, temperature=1.0, seed=7))
    assert len(out) == 3 and all(len(row) == 3 for row in out)
    for row in out:
        for c in row:
            _check_completion(c, 6, stop_ids)
        assert len({tuple(c.token_ids) for c in row}) == 3, "the n samples of one prompt are identical"
    assert engine.generate([], SamplingSpec()) == []


def test_stops_at_eos_and_reports_length(engine, stop_model):
    _, facts = stop_model
    a, b = engine.generate([PROMPT_A, facts["prompt_b"]], SamplingSpec(n=2, max_new_tokens=8, temperature=0))
    assert [c.token_ids for c in a] == [facts["greedy_a"]] * 2
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == facts["stop"] for c in a)
    assert [c.token_ids for c in b] == [facts["greedy_b"]] * 2
    assert all(c.finish_reason == "length" for c in b)


def test_vllm_texts_and_logprobs_equal_vllms_own(engine, stop_model):
    """The engine turns off vLLM's per-token detokenizing and logprob dicts and decodes the texts
    once per call (rl/rollout/vllm_outputs.py): same seeds, same engine, the texts, tokens and
    logprobs equal those of vLLM's own output path, for completions that stop on eos and ones
    cut at max_new_tokens (sampled random tokens include broken UTF-8 pieces). Like the test
    above, it needs the base model's greedy stop: it runs before any adapter is loaded."""
    from rl.rollout.vllm_engine import VLLMEngine

    if not isinstance(engine, VLLMEngine):
        pytest.skip("vLLM's own output path")
    _, facts = stop_model
    prompts = [PROMPT_A, facts["prompt_b"], [1, 42], list(range(1, 40))]
    runs = []
    for options in (engine._output_options, {}):  # the engine's, then vLLM's defaults
        kept, engine._output_options = engine._output_options, options
        try:
            runs.append(engine.generate(prompts, SamplingSpec(n=4, max_new_tokens=12, temperature=1.0, seed=11))
                        + engine.generate(prompts[:2], SamplingSpec(n=1, max_new_tokens=8, temperature=0)))
        finally:
            engine._output_options = kept
    lean, own = ([c for row in run for c in row] for run in runs)
    assert engine._output_options.get("detokenize") is False
    assert {c.finish_reason for c in own} == {"stop", "length"}
    assert [c.token_ids for c in lean] == [c.token_ids for c in own]
    assert [c.finish_reason for c in lean] == [c.finish_reason for c in own]
    assert [c.text for c in lean] == [c.text for c in own]
    assert [c.logprobs for c in lean] == [c.logprobs for c in own]
    assert sum(bool(c.text) for c in own) > len(own) // 2


def test_greedy_is_deterministic_and_logprobs_are_raw(engine, stop_model, base_model):
    _, facts = stop_model
    spec = SamplingSpec(n=1, max_new_tokens=8, temperature=0, top_p=0.5)
    first = engine.generate([facts["prompt_b"]], spec)[0][0]
    again = engine.generate([facts["prompt_b"]], spec)[0][0]
    assert first.token_ids == again.token_ids
    ref = teacher_forced_logprobs(base_model, facts["prompt_b"], first.token_ids, temperature=0)
    torch.testing.assert_close(torch.tensor(first.logprobs), ref, atol=TOL, rtol=0)


def test_seeded_sampling_is_reproducible(engine):
    spec = SamplingSpec(n=2, max_new_tokens=5, temperature=1.0, seed=123)
    one = engine.generate([PROMPT_A, [1, 42]], spec)
    two = engine.generate([PROMPT_A, [1, 42]], spec)
    other = engine.generate([PROMPT_A, [1, 42]], SamplingSpec(n=2, max_new_tokens=5, temperature=1.0, seed=124))
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    assert ids(one) == ids(two)
    assert ids(one) != ids(other)


def test_prompt_offset_draws_other_streams(engine):
    """A worker handed prompts from the middle of a step (prompt_offset) must not replay the
    streams of the step's first prompts: every worker used to restart at index 0."""
    import dataclasses

    spec = SamplingSpec(n=2, max_new_tokens=6, temperature=1.0, seed=321)
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    first = engine.generate([PROMPT_A], spec)
    later = engine.generate([PROMPT_A], dataclasses.replace(spec, prompt_offset=1))
    assert ids(first) != ids(later)
    from rl.rollout.vllm_engine import VLLMEngine

    if isinstance(engine, VLLMEngine):
        # Per-prompt streams: the second prompt of one call draws what it draws alone at offset 1,
        # so a step split over workers samples what one worker would.
        together = engine.generate([[1, 42], PROMPT_A], spec)
        assert ids(together)[1] == ids(later)[0]


def test_request_seeds_survive_a_prefill_spread_over_engine_steps(engine):
    """rollout.seed_mode=request with more prompt tokens than vLLM's scheduler takes in one step:
    on CPU vLLM rewinds a seeded generator after a partial prefill, which its CPU generator
    cannot do ("CPU Generator does not use offset"), so the engine keeps every prefill whole.
    The step, split over two workers, still samples what one worker samples."""
    import dataclasses

    from rl.rollout.vllm_engine import VLLMEngine

    if not isinstance(engine, VLLMEngine):
        pytest.skip("seed_mode is a vLLM setting")
    prompts, n, length = 8, 8, 96
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert prompts * n * length > budget, "the batch must not fit one engine step"
    batch = [[1] + [(7 * i + j) % 1000 + 10 for j in range(length - 1)] for i in range(prompts)]
    spec = SamplingSpec(n=n, max_new_tokens=4, temperature=1.0, seed=17)
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    mode, engine.seed_mode = engine.seed_mode, "request"
    try:
        whole = engine.generate(batch, spec)
        halves = (engine.generate(batch[:4], spec)
                  + engine.generate(batch[4:], dataclasses.replace(spec, prompt_offset=4)))
    finally:
        engine.seed_mode = mode
    assert ids(whole) == ids(halves)
    assert all(len(row) == n for row in whole)


def test_batch_seed_mode_is_reproducible_per_call_without_request_seeds(engine):
    """rollout.seed_mode=batch (the GPU default): no request carries a seed (vLLM would loop
    over them every decode step); the worker reseeds the engine per call instead, so the same
    step and offset draw the same samples, and another step or offset draws others."""
    import dataclasses

    from rl.rollout.vllm_engine import VLLMEngine

    if not isinstance(engine, VLLMEngine):
        pytest.skip("seed_mode is a vLLM setting")
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    spec = SamplingSpec(n=2, max_new_tokens=6, temperature=1.0, seed=99)
    mode, engine.seed_mode = engine.seed_mode, "batch"
    try:
        assert engine._params(spec, 0).seed is None
        one, two = engine.generate([PROMPT_A, [1, 42]], spec), engine.generate([PROMPT_A, [1, 42]], spec)
        other_step = engine.generate([PROMPT_A, [1, 42]], dataclasses.replace(spec, seed=100))
        other_worker = engine.generate([PROMPT_A, [1, 42]], dataclasses.replace(spec, prompt_offset=2))
    finally:
        engine.seed_mode = mode
    assert ids(one) == ids(two)
    assert ids(one) != ids(other_step) and ids(one) != ids(other_worker)
    assert all(len({tuple(c.token_ids) for c in row}) == 2 for row in one), "a prompt's samples are identical"


def test_engine_step_timer_records_each_decode_step(engine, stop_model):
    """bench/vllm_step_timer.py on the real engine: one record per engine step that ran a batch
    (the longest completion's length), the running sequences falling as completions stop, and
    vLLM's own methods back in place afterwards."""
    from bench.vllm_step_timer import EngineStepTimer, step_profile
    from rl.rollout.vllm_engine import VLLMEngine

    if not isinstance(engine, VLLMEngine):
        pytest.skip("times vLLM's engine steps")
    _, facts = stop_model
    llm_engine = engine.llm.llm_engine
    with EngineStepTimer(llm_engine) as timer:
        a, b = engine.generate([PROMPT_A, facts["prompt_b"]], SamplingSpec(n=1, max_new_tokens=8, temperature=0))
    assert len(a[0].token_ids) == len(facts["greedy_a"]) < len(b[0].token_ids) == 8
    running = [s["running"] for s in timer.steps]
    assert running == [2] * len(facts["greedy_a"]) + [1] * (8 - len(facts["greedy_a"]))
    for s in timer.steps:
        assert min(s.values()) >= 0 and s["total"] >= s["schedule"] + s["update"]
    profile = step_profile(timer.steps)
    assert profile["steps"] == 8 and profile["1-8"]["steps"] == 8 and "9-32" not in profile
    assert "step" not in vars(llm_engine) and "schedule" not in vars(engine.llm.llm_engine.engine_core.engine_core.scheduler)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_logprobs_match_teacher_forced_forward(engine, base_model, temperature, top_p):
    spec = SamplingSpec(n=2, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=5)
    prompts = [PROMPT_A, [1, 42, 43]]
    for prompt, row in zip(prompts, engine.generate(prompts, spec)):
        for c in row:
            ref = teacher_forced_logprobs(base_model, prompt, c.token_ids, temperature, top_p)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=TOL, rtol=0)


def test_adapter_changes_outputs_and_each_version_is_served(engine, base_model, stop_model):
    _, facts = stop_model
    spec = SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=11)
    greedy = SamplingSpec(n=1, max_new_tokens=8, temperature=0)
    prompts = [facts["prompt_b"], [1, 42, 43]]
    base_greedy = [r[0].token_ids for r in engine.generate(prompts, greedy)]
    first = (engine.adapter_version() or 0) + 1
    # v1, then v2 with the same config (weights replaced in place), then v3 with another config.
    other = dict(r=4, lora_alpha=4, target_modules=["o_proj", "up_proj"])
    for version, seed, kw in ((first, 1, {}), (first + 1, 2, {}), (first + 2, 3, other)):
        peft_model, payload = lora_payload(copy.deepcopy(base_model), _lora_config(**kw), seed, version)
        report = engine.load_adapter(payload)
        assert engine.adapter_version() == version
        if type(engine).__name__ == "MergedVLLMEngine":  # its stages reach the trainer as time/sync_<stage>_s
            assert report["sync_path"] == "merged" and {"merge_s", "load_s", "reset_s"} <= set(report), report
        if type(engine).__name__ == "VLLMEngine":  # vLLM's LoRA path: the previous id is gone
            assert len(engine.loaded_lora_ids()) == 1
        # The served weights are this version's: logprobs match its PEFT model, not the last one's.
        for prompt, row in zip(prompts, engine.generate(prompts, spec)):
            for c in row:
                ref = teacher_forced_logprobs(peft_model, prompt, c.token_ids, 1.0)
                torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=TOL, rtol=0)
    assert [r[0].token_ids for r in engine.generate(prompts, greedy)] != base_greedy


@pytest.mark.timeout(120)  # an unchecked over-rank adapter hangs in-process vLLM
def test_over_rank_adapter_fails_fast_and_engine_keeps_serving(engine, base_model):
    _, payload = lora_payload(copy.deepcopy(base_model),
                              _lora_config(r=8, rank_pattern={"layers.1.mlp.down_proj": 32}), 3, 99)
    before = engine.adapter_version()
    with pytest.raises(ValueError, match=r"rank 32 .*rollout.max_lora_rank=16; raise") as err:
        engine.load_adapter(payload)
    assert "\n" not in str(err.value)
    assert engine.adapter_version() == before
    out = engine.generate([[1, 42]], SamplingSpec(n=1, max_new_tokens=4, temperature=0))
    assert len(out[0][0].token_ids) >= 1


def test_bad_prompts_fail_in_one_line(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingSpec())
    with pytest.raises(ValueError, match="exceeds rollout.max_model_len=256"):
        engine.generate([[1] * 250], SamplingSpec(max_new_tokens=10))
    with pytest.raises(ValueError, match="sampling.top_p"):
        engine.generate([[1, 2]], SamplingSpec(top_p=0))
    with pytest.raises(ValueError, match="use 0 for greedy"):
        engine.generate([[1, 2]], SamplingSpec(temperature=1e-7))


def test_rollout_worker_actor(ray_local, tiny_model_path, base_model):
    """The Ray actor: ping, generate, and an adapter sent as an object-store reference."""
    from rl.rollout.worker import RolloutWorker

    cfg = RolloutConfig(engine="hf", max_lora_rank=MAX_RANK, max_model_len=256)
    worker = RolloutWorker.remote(cfg, tiny_model_path, "float32", 0)
    try:
        assert ray_local.get(worker.ping.remote()) == "ok"
        assert ray_local.get(worker.adapter_version.remote()) is None
        spec = SamplingSpec(n=2, max_new_tokens=4, temperature=0)
        base = ray_local.get(worker.generate.remote([[1, 42, 43]], spec))
        peft_model, payload = lora_payload(copy.deepcopy(base_model), _lora_config(), 4, 5)
        ref = ray_local.put(payload)
        report = ray_local.get(worker.load_adapter.remote(ref))
        # The version served, and where the sync's time went (learner gather, transfer, engine).
        assert report["version"] == 5 and report["gather_s"] >= 0 and report["transfer_s"] >= 0
        assert report["gc_s"] >= 0  # the collector's share of the engine's load
        assert ray_local.get(worker.adapter_version.remote()) == 5
        tuned = ray_local.get(worker.generate.remote([[1, 42, 43]], spec))
        assert tuned[0][0].token_ids == greedy_reference(peft_model, [1, 42, 43], 4)
        assert tuned[0][0].token_ids != base[0][0].token_ids
    finally:
        ray_local.kill(worker)


def test_unknown_engine_is_one_line():
    with pytest.raises(ValueError, match="rollout.engine='sglang' is not known"):
        make_engine(RolloutConfig(engine="sglang"), "unused", "float32", 0)


def test_adapter_folders_are_cleaned_up(engine, base_model):
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if root is None or type(engine).__name__ != "VLLMEngine":
        pytest.skip("only vLLM's LoRA path writes adapter folders")
    before = {f for f in os.listdir(root) if f.startswith("placerl-lora-")}
    _, payload = lora_payload(copy.deepcopy(base_model), _lora_config(), 8, 1000)
    engine.load_adapter(payload)
    after = {f for f in os.listdir(root) if f.startswith("placerl-lora-")}
    assert after <= before

