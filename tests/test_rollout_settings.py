"""Rollout settings that decide the GPU path, checked on any host (pure functions, no engine)."""
from __future__ import annotations

import pytest

from rl.config import ConfigError, load_config
from rl.rollout.pool import chunk_specs
from rl.rollout.vllm_settings import (CPU_BATCHED_TOKENS, async_scheduling_args, check_vllm_dtype,
                                    explain_kv_cache_failure, explain_sleep_failure, explained_errors, kv_cache_args,
                                    resolve_enforce_eager, resolve_seed_mode, resolve_sleep_mode,
                                    whole_prefill_args)
from rl.rollout.engine import SamplingSpec, batch_seed, prompt_seed, step_seed
from rl.startup import rollout_settings


def sample_seeds(run_seed: int, step: int, prompts: int, n: int, workers: int) -> list[int]:
    """Every sample's seed in one step, as a pool of ``workers`` engines draws them (vLLM gives
    sample j of a prompt its seed + j)."""
    spec = SamplingSpec(n=n, seed=step_seed(run_seed, step))
    sizes = [len(range(w, prompts, workers)) for w in range(workers)]
    seeds = []
    for chunk_spec, size in zip(chunk_specs(spec, sizes), sizes):
        for i in range(size):
            first = prompt_seed(chunk_spec.seed, chunk_spec.prompt_offset + i, n)
            seeds += [first + j for j in range(n)]
    return seeds


def test_seeds_are_unique_across_steps_prompts_samples_and_workers():
    seeds = [s for step in range(20) for s in sample_seeds(0, step, prompts=32, n=8, workers=3)]
    assert len(seeds) == 20 * 32 * 8 and len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)  # vLLM keeps seeds in int64
    # Another run seed draws other streams; the same run seed draws the same ones.
    assert not set(seeds) & set(sample_seeds(1, 0, prompts=32, n=8, workers=3))
    assert sample_seeds(0, 3, 32, 8, 3) == sample_seeds(0, 3, 32, 8, 3)


def test_workers_get_the_place_of_their_first_prompt():
    specs = chunk_specs(SamplingSpec(n=4, seed=7, prompt_offset=10), [3, 3, 2])
    assert [s.prompt_offset for s in specs] == [10, 13, 16] and {s.seed for s in specs} == {7}
    # The pool's split of a step gives each prompt the seed it would get from one worker.
    one = [prompt_seed(7, 10 + i, 4) for i in range(8)]
    many = [prompt_seed(s.seed, s.prompt_offset + i, 4) for s, size in zip(specs, [3, 3, 2]) for i in range(size)]
    assert one == many


def test_eager_and_sleep_resolution():
    assert resolve_enforce_eager("auto", on_gpu=False) is True
    assert resolve_enforce_eager("auto", on_gpu=True) is False
    assert resolve_enforce_eager(True, on_gpu=True) is True and resolve_enforce_eager(False, on_gpu=False) is False
    assert resolve_sleep_mode("auto", colocated=True, on_gpu=True) is True
    assert resolve_sleep_mode("auto", colocated=False, on_gpu=True) is False  # disaggregated: nothing to share
    assert resolve_sleep_mode("auto", colocated=True, on_gpu=False) is False
    assert resolve_sleep_mode(False, colocated=True, on_gpu=True) is False
    with pytest.raises(ValueError, match=r"^rollout.sleep_mode=true needs vLLM on a GPU.*set rollout.sleep_mode"):
        resolve_sleep_mode(True, colocated=True, on_gpu=False)


def test_installed_vllm_has_what_a_sleep_keeping_the_weights_uses():
    """rollout.sleep_weights=keep reaches into vLLM's sleep-mode allocator (rl/rollout/kv_sleep.py);
    an engine refuses it at start when the installed vLLM lacks any of it. The CPU build of vLLM
    carries the same allocator module as the GPU build (0.26 there), so a vLLM that moved it
    fails here first."""
    from rl.rollout.kv_sleep import kv_sleep_unsupported

    assert kv_sleep_unsupported() is None


def test_seed_mode_resolution_and_batch_seeds():
    assert resolve_seed_mode("auto", on_gpu=False, in_process=True) == "request"
    assert resolve_seed_mode("auto", on_gpu=True, in_process=True) == "batch"
    assert resolve_seed_mode("auto", on_gpu=True, in_process=False) == "request"  # a reseed would not reach it
    assert resolve_seed_mode("request", on_gpu=True, in_process=True) == "request"
    with pytest.raises(ValueError, match=r"^rollout.seed_mode=batch needs .*set rollout.seed_mode=request"):
        resolve_seed_mode("batch", on_gpu=True, in_process=False)
    # One seed per (step, worker offset): distinct across 50 steps x 4 workers, stable across calls.
    seeds = {batch_seed(step_seed(0, s), off) for s in range(50) for off in (0, 8, 16, 24)}
    assert len(seeds) == 200 and batch_seed(5, 8) == batch_seed(5, 8)
    with pytest.raises(ConfigError, match="rollout.seed_mode"):
        load_config(None, ["rollout.seed_mode=global"])


def test_float32_vllm_on_a_gpu_fails_in_one_line_naming_the_fix():
    check_vllm_dtype("float32", on_gpu=False)  # vLLM's CPU kernels take float32
    check_vllm_dtype("bfloat16", on_gpu=True)
    with pytest.raises(ValueError, match=r"^rollout.dtype=float32 .* set rollout.dtype=bfloat16") as e:
        check_vllm_dtype("float32", on_gpu=True)
    assert "\n" not in str(e.value)


def test_rollout_settings_resolve_before_anything_starts():
    cfg = load_config("launch/configs/tiny.yaml", ["rollout.sleep_mode=auto"])
    assert rollout_settings(cfg, "float32").sleep_mode is False  # no GPU share here
    assert rollout_settings(load_config("launch/configs/tiny.yaml", ["rollout.engine=hf", "rollout.sleep_mode=true"]),
                            "float32").sleep_mode is False  # the hf engine has nothing to sleep
    # Overlap on a CPU: nothing sleeps, so it runs (correctly, if no faster: one set of cores).
    overlapped = load_config("launch/configs/tiny.yaml", ["trainer.max_staleness=1"])
    assert rollout_settings(overlapped, "float32").sleep_mode is False


@pytest.mark.parametrize("override,ok", [("rollout.enforce_eager=auto", "auto"), ("rollout.enforce_eager=false", False),
                                         ("rollout.sleep_mode=true", True), ("rollout.sleep_mode=auto", "auto"),
                                         ("rollout.async_scheduling=true", True),
                                         ("rollout.async_scheduling=auto", "auto")])
def test_config_takes_auto_or_a_bool(override, ok):
    key = override.split("=")[0].split(".")[1]
    assert getattr(load_config("launch/configs/tiny.yaml", [override]).rollout, key) == ok


def test_config_rejects_other_words():
    with pytest.raises(ConfigError, match=r"rollout.enforce_eager='sometimes' is not allowed: auto, true or false"):
        load_config("launch/configs/tiny.yaml", ["rollout.enforce_eager=sometimes"])
    with pytest.raises(ConfigError, match=r"rollout.async_scheduling='maybe' is not allowed: auto, true or false"):
        load_config("launch/configs/tiny.yaml", ["rollout.async_scheduling=maybe"])


def test_inplace_switches_are_bools_on_by_default():
    cfg = load_config("launch/configs/tiny.yaml", [])
    assert cfg.rollout.inplace_sync is True and cfg.rollout.inplace_direct is True
    assert load_config("launch/configs/tiny.yaml", ["rollout.inplace_direct=false"]).rollout.inplace_direct is False
    with pytest.raises(ConfigError, match=r"rollout.inplace_direct='maybe' has the wrong type: expected true or false"):
        load_config("launch/configs/tiny.yaml", ["rollout.inplace_direct=maybe"])
    cfg.rollout.inplace_direct = "yes"  # set in code, past the loader's types
    with pytest.raises(ConfigError, match=r"rollout.inplace_direct='yes' is not allowed: true or false"):
        cfg.rollout.validate("rollout")


def test_async_scheduling_reaches_vllm_only_where_it_exists():
    assert async_scheduling_args("auto") == {}  # vLLM's own default, on any vLLM
    assert async_scheduling_args(True) == {"async_scheduling": True}  # the installed vLLM has it
    assert async_scheduling_args(False, engine_fields={"async_scheduling"}) == {"async_scheduling": False}
    assert async_scheduling_args(False, engine_fields={"model"}) == {}  # a vLLM without it never schedules ahead
    with pytest.raises(ValueError, match=r"^rollout.async_scheduling=true: this vLLM has no async scheduling; set"):
        async_scheduling_args(True, engine_fields={"model"})


def test_cudagraph_max_batch_is_checked():
    assert load_config("launch/configs/tiny.yaml", ["rollout.cudagraph_max_batch=1024"]).rollout.cudagraph_max_batch == 1024
    with pytest.raises(ConfigError, match=r"rollout.cudagraph_max_batch=-1 is not allowed: must be >= 0"):
        load_config("launch/configs/tiny.yaml", ["rollout.cudagraph_max_batch=-1"])


def test_sleep_assertion_of_a_shared_gpu_becomes_one_line_naming_the_fix():
    # The message vLLM 0.26's gpu_worker.sleep asserts when another process allocated meanwhile.
    explained = explain_sleep_failure(AssertionError("Memory usage increased after sleeping."))
    assert isinstance(explained, RuntimeError)
    message = str(explained)
    assert "\n" not in message and "several processes share this GPU" in message
    assert "rollout.sleep_mode=false" in message
    # Any other error is left to propagate unchanged.
    assert explain_sleep_failure(AssertionError("some other vLLM check")) is None
    assert explain_sleep_failure(RuntimeError("Memory usage increased after sleeping.")) is None


def test_no_kv_cache_memory_at_start_becomes_one_line_naming_the_fix():
    # The message vLLM's kv_cache_utils raises when start-up left no memory for the KV cache.
    vllm_error = ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                            "when initializing the engine (this flag also controls CPU memory reservation on the "
                            "CPU backend, despite its name). See https://docs.vllm.ai/en/latest/configuration/"
                            "conserving_memory/ for more details.")
    explained = explain_kv_cache_failure(vllm_error)
    assert isinstance(explained, RuntimeError)
    message = str(explained)
    assert "\n" not in message and message.startswith("vLLM found no memory for its KV cache")
    assert "another process on the same GPU" in message
    for fix in ("rollout.gpu_kv_cache_gb", "one after another", "its own GPU"):
        assert fix in message
    assert explain_kv_cache_failure(ValueError("some other vLLM check")) is None
    # At engine construction: the recognised error is replaced (and chained), any other passes unchanged.
    with pytest.raises(RuntimeError, match="^vLLM found no memory for its KV cache") as raised:
        with explained_errors(explain_kv_cache_failure):
            raise vllm_error
    assert raised.value.__cause__ is vllm_error
    other = ValueError("max_model_len is too large")
    with pytest.raises(ValueError) as passed:
        with explained_errors(explain_kv_cache_failure):
            raise other
    assert passed.value is other


def test_kv_cache_is_fixed_on_cpu_and_on_a_gpu_only_when_configured(monkeypatch):
    from rl.config import RolloutConfig

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = RolloutConfig(cpu_kv_cache_gb=1.5)
    assert kv_cache_args(cfg, on_cpu=True) == {"kv_cache_memory_bytes": 3 * 2**29}
    # On a GPU vLLM measures the device unless told a size: several runs sharing one GPU are told.
    assert kv_cache_args(cfg, on_cpu=False) == {}
    cfg.gpu_kv_cache_gb = 3
    assert kv_cache_args(cfg, on_cpu=False) == {"kv_cache_memory_bytes": 3 * 2**30}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # vLLM's own setting wins on CPU
    assert kv_cache_args(cfg, on_cpu=True) == {}
    with pytest.raises(ConfigError, match="rollout.gpu_kv_cache_gb"):
        load_config("launch/configs/tiny.yaml", ["rollout.gpu_kv_cache_gb=-1"])


def test_cpu_engine_never_splits_a_prefill():
    # Without chunked prefill vLLM needs a step budget of at least max_model_len.
    assert whole_prefill_args(1024) == {"enable_chunked_prefill": False, "max_num_batched_tokens": CPU_BATCHED_TOKENS}
    assert whole_prefill_args(8192)["max_num_batched_tokens"] == 8192
