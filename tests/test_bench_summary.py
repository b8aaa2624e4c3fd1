"""The GPU benchmark's summary: ratios and goal checks from whatever parts ran (pure)."""
from bench.vllm_gpu_summary import summarise
from bench.vllm_sleep_decode import after_wake_over_awake, turn_order


def test_seed_modes_compared_by_median_over_turns():
    turns = [{"seed_mode": "batch", "tokens_per_s": 21000.0}, {"seed_mode": "request", "tokens_per_s": 28000.0},
             {"seed_mode": "batch", "tokens_per_s": 27000.0}, {"seed_mode": "request", "tokens_per_s": 26000.0}]
    out = summarise({"rollout-graphs": {"128x8": {"tokens_per_s": 21000.0, "seed_mode": "batch"},
                                        "128x8_seed_mode_turns": turns}})
    assert out["graphs_128x8_tokens_per_s_by_seed_mode"] == {"batch": [21000.0, 27000.0], "request": [28000.0, 26000.0]}
    assert out["graphs_128x8_batch_over_request_seeds_median"] == round(24000 / 27000, 3)
    assert out["graphs_128x8_goal_25k_tokens_per_s_by_seed_mode"] == {"batch": "NOT met", "request": "met"}
    assert out["graphs_128x8_goal_25k_tokens_per_s"] == "NOT met"  # the first run, in the default mode


def test_step_ratio_and_sync_share_goals():
    ours = {"step_s": 5.0, "sync_over_step": 0.019}
    out = summarise({"step-placerl": {"mean_after_first": ours}, "step-trl": {"mean_after_first": {"step_s": 7.0}}})
    assert out["placerl_over_trl_step"] == round(5 / 7, 3) and out["placerl_over_trl_goal_0.5"] == "NOT met"
    assert out["sync_over_step_goal_2%"] == "met"
    assert "graphs_128x8_tokens_per_s_by_seed_mode" not in out  # parts that did not run give no ratio


def test_compiled_step_ratio_keeps_the_compiling_first_step_apart():
    compiled = {"mean_after_first": {"step_s": 3.5}, "steps": [{"step_s": 120.0}, {"step_s": 3.4}, {"step_s": 3.6}]}
    out = summarise({"step-placerl-compile": compiled, "step-trl": {"mean_after_first": {"step_s": 7.0}}})
    assert out["placerl_compiled_over_trl_step"] == 0.5
    assert out["placerl_compiled_first_step_s"] == 120.0
    assert "placerl_over_trl_step" not in out


def test_merged_against_the_adapter_path_in_the_same_call():
    adapter = {"step_s": 4.8, "rollout_s": 2.85, "logprob_mismatch_abs_diff_mean": 0.0139}
    merged = {"step_s": 4.35, "rollout_s": 2.43, "logprob_mismatch_abs_diff_mean": 0.0143}
    out = summarise({"step-placerl-compile": {"mean_after_first": adapter, "steps": [{"step_s": 9.0}]},
                     "step-placerl-merged-compile": {"mean_after_first": merged},
                     "step-trl": {"mean_after_first": {"step_s": 7.2}}})
    assert out["step-placerl-merged-compile_over_step-placerl-compile"] == {"step_s": round(4.35 / 4.8, 3),
                                                                            "rollout_s": round(2.43 / 2.85, 3)}
    assert out["step-placerl-merged-compile_vs_step-placerl-compile_logprob_mismatch_abs_diff_mean"] == [0.0143, 0.0139]
    assert out["placerl_merged_compiled_over_trl_step"] == round(4.35 / 7.2, 3)
    assert "step-placerl-merged_over_step-placerl" not in out  # the eager pair did not run


def test_awake_merged_step_against_trl_is_reported_without_a_goal_verdict():
    # TRL's vLLM sleeps while it trains; placerl's awake run keeps its KV cache beside the
    # learner, so its ratio comes with both peaks and no verdict on the 0.5 goal.
    out = summarise({"step-placerl-merged-compile-nosleep": {"mean_after_first": {"step_s": 3.77},
                                                             "memory": {"peak_gpu_used_gib": 78.55}},
                     "step-trl": {"mean_after_first": {"step_s": 7.88}, "memory": {"peak_gpu_used_gib": 46.69}}})
    assert out["placerl_merged_compiled_nosleep_over_trl_step"] == round(3.77 / 7.88, 3)
    assert out["placerl_merged_compiled_nosleep_vs_trl_peak_gpu_gib"] == [78.55, 46.69]
    assert not any(k.startswith("placerl_merged_compiled_nosleep") and "goal" in k for k in out)


def test_rollout_after_a_wake_against_awake_by_medians():
    calls = [{"turn": "after_wake", "seconds": 2.8}, {"turn": "awake", "seconds": 2.2},
             {"turn": "awake", "seconds": 2.4}, {"turn": "after_wake", "seconds": 2.6},
             {"turn": "after_wake", "seconds": 9.0}]  # one slow call moves a median less than a mean
    assert after_wake_over_awake(calls) == round(2.8 / 2.3, 3)
    assert after_wake_over_awake([c for c in calls if c["turn"] == "awake"]) is None  # one kind only: no ratio
    assert after_wake_over_awake(calls, "after_wake_churn") is None
    assert turn_order(2, True) == ["after_wake", "awake", "after_wake_churn", "awake", "after_wake_churn", "after_wake"]
    assert turn_order(2, False) == ["awake"] * 6
    out = summarise({"rollout-sleep": {"after_wake_over_awake": 1.217, "churn_over_awake": 1.3, "median_s": {"after_wake": 2.8, "awake": 2.3}},
                     "rollout-awake": {"median_s": {"awake": 2.0}}})
    assert out["rollout_after_wake_over_awake"] == 1.217
    assert out["rollout_churn_over_awake"] == 1.3
    assert out["rollout_sleep_engine_awake_over_plain"] == 1.15
    assert "rollout_sleep_engine_awake_over_plain" not in summarise({"rollout-sleep": {"median_s": {"awake": 2.3}}})


def test_both_awake_against_trl_awake_with_both_peaks():
    out = summarise({"step-placerl-merged-compile-nosleep": {"mean_after_first": {"step_s": 3.5},
                                                             "memory": {"peak_gpu_used_gib": 78.5}},
                     "step-trl-nosleep": {"mean_after_first": {"step_s": 7.2}, "memory": {"peak_gpu_used_gib": 80.1}}})
    assert out["placerl_merged_compiled_nosleep_over_trl_nosleep_step"] == round(3.5 / 7.2, 3)
    assert out["placerl_merged_compiled_nosleep_over_trl_nosleep_goal_0.5"] == "met"
    assert out["placerl_merged_compiled_nosleep_vs_trl_nosleep_peak_gpu_gib"] == [78.5, 80.1]
    assert "placerl_nosleep_over_trl_nosleep_step" not in out  # no such part ran


def test_step_profile_buckets_steps_by_running_sequences():
    from bench.vllm_step_timer import step_profile

    def step(running, total, schedule=0.001, update=0.001, outputs=0.001):
        return {"running": running, "total": total, "schedule": schedule, "update": update,
                "execute": total - schedule - update - outputs, "outputs": outputs}

    steps = [step(256, 0.010), step(250, 0.012), step(40, 0.006), step(3, 0.003), step(1, 0.002), step(1, 0.004)]
    out = step_profile(steps)
    assert out["steps"] == 6 and out["seconds"] == 0.037
    assert out["129+"] == {"steps": 2, "seconds": 0.022, "median_ms": {"total": 11.0, "schedule": 1.0, "execute": 8.0,
                                                                       "update": 1.0, "outputs": 1.0}}
    assert out["33-128"]["steps"] == 1 and "9-32" not in out
    assert out["1-8"]["steps"] == 3 and out["1-8"]["median_ms"]["total"] == 3.0
    assert step_profile([]) == {"steps": 0, "seconds": 0}


def test_a_part_with_overrides_of_its_own_is_compared_with_trl_as_it_sleeps():
    from bench.vllm_gpu_summary import step_part_sleeps

    two = "step-placerl-merged-compile@rollout.num_workers=2@cluster.gpus_per_rollout_worker=0.25"
    awake = "step-placerl-merged-compile@rollout.sleep_mode=false"
    assert step_part_sleeps(two) and step_part_sleeps("step-placerl-merged-compile")
    assert not step_part_sleeps(awake) and not step_part_sleeps("step-placerl-merged-compile-nosleep@x=1")
    out = summarise({two: {"mean_after_first": {"step_s": 3.5, "sync_over_step": 0.012}},
                     awake: {"mean_after_first": {"step_s": 3.0, "sync_over_step": 0.03}},
                     "step-placerl-merged-compile": {"mean_after_first": {"step_s": 4.5, "sync_over_step": 0.025}},
                     "step-trl": {"mean_after_first": {"step_s": 7.5}},
                     "step-trl-nosleep": {"mean_after_first": {"step_s": 9.0}}})
    assert out[f"{two}_over_step_trl_step"] == round(3.5 / 7.5, 3) and out[f"{two}_over_step_trl_goal_0.5"] == "met"
    assert out[f"{awake}_over_step_trl_nosleep_step"] == round(3.0 / 9.0, 3)
    assert out[f"{two}_sync_goal_2%"] == "met" and out[f"{awake}_sync_goal_2%"] == "NOT met"
    assert out["step-placerl-merged-compile_sync_over_step"] == 0.025
    assert "step-placerl-merged-compile_over_step_trl_step" not in out  # named parts keep their own keys


def test_part_overrides_are_checked_before_any_part_starts():
    import pytest

    from bench.bench_vllm_gpu import part_and_settings

    assert part_and_settings("step-placerl@rollout.num_workers=2@a.b=c") == ("step-placerl", ["rollout.num_workers=2",
                                                                                              "a.b=c"])
    assert part_and_settings("step-trl") == ("step-trl", [])
    with pytest.raises(SystemExit, match="only placerl's step parts"):
        part_and_settings("step-trl@rollout.num_workers=2")
    with pytest.raises(SystemExit, match="write @KEY=VALUE"):
        part_and_settings("step-placerl@rollout.num_workers")


def test_a_part_repeated_in_one_call_keeps_each_run_and_each_is_compared_with_trl():
    from bench.bench_vllm_gpu import result_keys

    kept = "step-placerl-merged-compile@rollout.sleep_weights=keep"
    assert result_keys([kept, "step-trl", kept, kept]) == [kept, "step-trl", f"{kept}#2", f"{kept}#3"]
    assert result_keys(["step-placerl-merged-compile", "step-trl"]) == ["step-placerl-merged-compile", "step-trl"]
    out = summarise({kept: {"mean_after_first": {"step_s": 3.9, "sync_over_step": 0.01}},
                     f"{kept}#2": {"mean_after_first": {"step_s": 4.2, "sync_over_step": 0.03}},
                     "step-placerl-merged-compile#2": {"mean_after_first": {"step_s": 3.6, "sync_over_step": 0.01}},
                     "step-trl": {"mean_after_first": {"step_s": 8.0}}})
    assert out[f"{kept}_over_step_trl_step"] == round(3.9 / 8.0, 3)
    assert out[f"{kept}#2_over_step_trl_step"] == round(4.2 / 8.0, 3) and out[f"{kept}#2_sync_goal_2%"] == "NOT met"
    assert out["step-placerl-merged-compile#2_over_step_trl_goal_0.5"] == "met"
