"""The vLLM GPU benchmark's summary: the ratios and goal checks computed from the parts that
ran (pure; ``bench/bench_vllm_gpu.py`` writes them under ``summary``)."""
from __future__ import annotations

import statistics


def step_part_sleeps(spec: str) -> bool:
    """Whether a placerl step part (``NAME`` or ``NAME@KEY=VALUE...``) runs vLLM with sleep mode:
    not where nothing shares its GPU (-2gpu) or where it decodes while the learner steps."""
    name = spec.split("@")[0]
    awake = any(a in name for a in ("-nosleep", "-2gpu", "-overlap", "-stream"))
    return not awake and "rollout.sleep_mode=false" not in spec


def step_ratio(out: dict, key: str, ours: dict, theirs: dict) -> None:
    """``out[key + "_step"]``: our mean step over theirs, and ``out[key + "_goal_0.5"]`` its
    verdict against the goal of at most 0.5."""
    ratio = ours["step_s"] / theirs["step_s"]
    out[f"{key}_step"] = round(ratio, 3)
    out[f"{key}_goal_0.5"] = "met" if ratio <= 0.5 else "NOT met"


def summarise(results: dict) -> dict:
    """The ratios that can be computed from the parts that are there (pure)."""
    out = {}

    def get(part, *keys):
        v = results.get(part, {})
        for k in keys:
            v = v.get(k, {}) if isinstance(v, dict) else {}
        return v if v != {} else None

    batches = sorted({k for kind in ("graphs", "eager", "hf") for k, v in results.get(f"rollout-{kind}", {}).items()
                      if isinstance(v, dict) and "tokens_per_s" in v and k.replace("x", "").isdigit()}, key=lambda b: [int(x) for x in b.split("x")])
    for b in batches:
        graphs, eager, hf = (get(f"rollout-{k}", b, "tokens_per_s") for k in ("graphs", "eager", "hf"))
        for name, v in (("graphs", graphs), ("eager", eager), ("hf", hf)):
            if v:
                out[f"rollout_tokens_per_s_{name}_{b}"] = v
        if graphs and eager:
            out[f"graphs_over_eager_{b}"] = round(graphs / eager, 2)
        if graphs and hf:
            out[f"graphs_over_hf_{b}"] = round(graphs / hf, 2)
    turns = get("rollout-graphs", "128x8_seed_mode_turns") or []
    rates = {}
    for t in turns:
        if t.get("tokens_per_s"):
            rates.setdefault(t["seed_mode"], []).append(t["tokens_per_s"])
    if len(rates) == 2:
        medians = {m: statistics.median(v) for m, v in rates.items()}
        out["graphs_128x8_tokens_per_s_by_seed_mode"] = rates
        out["graphs_128x8_batch_over_request_seeds_median"] = round(medians["batch"] / medians["request"], 3)
        out["graphs_128x8_goal_25k_tokens_per_s_by_seed_mode"] = {
            m: "met" if v >= 25_000 else "NOT met" for m, v in medians.items()}
    batch_rate = statistics.median(rates["batch"]) if rates.get("batch") else None
    async_rate = get("rollout-graphs", "128x8_async_scheduling", "tokens_per_s")
    if batch_rate and async_rate:
        out["graphs_128x8_async_over_batch_seeds"] = round(async_rate / batch_rate, 3)
    top = get("rollout-graphs", "128x8", "tokens_per_s")
    if top:
        out["graphs_128x8_goal_25k_tokens_per_s"] = "met" if top >= 25_000 else "NOT met"
    for key in ("after_wake_over_awake", "churn_over_awake"):  # one engine, the same batch: woken against awake
        if get("rollout-sleep", key):
            out[f"rollout_{key}"] = get("rollout-sleep", key)
    sleep_engine, plain = get("rollout-sleep", "median_s", "awake"), get("rollout-awake", "median_s", "awake")
    if sleep_engine and plain:  # awake calls both: what the sleep-mode engine's allocator costs
        out["rollout_sleep_engine_awake_over_plain"] = round(sleep_engine / plain, 3)
    ratio = get("overhead", "result", "framework_over_raw")
    if ratio:
        out["framework_over_raw_vllm"] = ratio
        out["framework_over_raw_lean_vllm"] = get("overhead", "result", "framework_over_raw_lean")
        out["framework_over_raw_goal_1.05"] = "met" if ratio <= 1.05 else "NOT met"
    ours, theirs = get("step-placerl", "mean_after_first"), get("step-trl", "mean_after_first")
    if ours:
        out["placerl_step_s"] = ours["step_s"]
        out["sync_over_step"] = ours["sync_over_step"]
        out["sync_over_step_goal_2%"] = "met" if ours["sync_over_step"] < 0.02 else "NOT met"
    if ours and theirs:
        step_ratio(out, "placerl_over_trl", ours, theirs)
    with_sleep = get("step-placerl", "memory", "peak_gpu_used_gib")
    without = get("step-placerl-nosleep", "memory", "peak_gpu_used_gib")
    if with_sleep and without:
        out["peak_gpu_gib_sleep_vs_nosleep"] = [with_sleep, without]
    two = get("step-placerl-2gpu", "mean_after_first")
    if ours and two:
        out["step_s_2gpu_over_colocated"] = round(two["step_s"] / ours["step_s"], 3)
    two_streamed = get("step-placerl-stream-2gpu", "mean_after_first")
    if two and two_streamed:
        out["step_s_2gpu_streamed_over_whole"] = round(two_streamed["step_s"] / two["step_s"], 3)
    compiled = get("step-placerl-compile", "mean_after_first")
    if compiled and theirs:
        step_ratio(out, "placerl_compiled_over_trl", compiled, theirs)
        out["placerl_compiled_first_step_s"] = get("step-placerl-compile", "steps")[0]["step_s"]
    # Streamed: on-policy, the same update as the whole batch (tests/test_streaming.py), so the
    # goal's comparison too. Merged: on-policy up to bf16's rounding of the merged weights (as
    # TRL serves its adapter), so also the goal's comparison; its logprob mismatch is beside it.
    for part, name in (("step-placerl-stream", "placerl_streamed"),
                       ("step-placerl-stream-compile", "placerl_streamed_compiled"),
                       ("step-placerl-merged", "placerl_merged"),
                       ("step-placerl-merged-compile", "placerl_merged_compiled")):
        variant = get(part, "mean_after_first")
        if variant and theirs:
            step_ratio(out, f"{name}_over_trl", variant, theirs)
    # vLLM awake beside the learner while TRL's sleeps: a step bought with memory, so not the
    # goal's comparison; the ratio is reported with both peaks beside it.
    awake = get("step-placerl-merged-compile-nosleep", "mean_after_first")
    if awake and theirs:
        out["placerl_merged_compiled_nosleep_over_trl_step"] = round(awake["step_s"] / theirs["step_s"], 3)
        out["placerl_merged_compiled_nosleep_vs_trl_peak_gpu_gib"] = [
            get("step-placerl-merged-compile-nosleep", "memory", "peak_gpu_used_gib"),
            get("step-trl", "memory", "peak_gpu_used_gib")]
    # Both with vLLM awake beside the learner (TRL's default, vllm_enable_sleep_mode off): the
    # goal's comparison with memory held alike on both sides, both peaks beside it.
    trl_awake = get("step-trl-nosleep", "mean_after_first")
    for part, name in (("step-placerl-nosleep", "placerl_nosleep"),
                       ("step-placerl-merged-compile-nosleep", "placerl_merged_compiled_nosleep")):
        variant = get(part, "mean_after_first")
        if variant and trl_awake:
            step_ratio(out, f"{name}_over_trl_nosleep", variant, trl_awake)
            out[f"{name}_vs_trl_nosleep_peak_gpu_gib"] = [get(part, "memory", "peak_gpu_used_gib"),
                                                          get("step-trl-nosleep", "memory", "peak_gpu_used_gib")]
    # Merged against the adapter path in the same call: the step, the rollout and the mismatch.
    for merged, adapter in (("step-placerl-merged", "step-placerl"), ("step-placerl-merged-compile", "step-placerl-compile")):
        m, a = get(merged, "mean_after_first"), get(adapter, "mean_after_first")
        if m and a:
            out[f"{merged}_over_{adapter}"] = {k: round(m[k] / a[k], 3) for k in ("step_s", "rollout_s") if a.get(k)}
            key = "logprob_mismatch_abs_diff_mean"
            out[f"{merged}_vs_{adapter}_{key}"] = [m.get(key), a.get(key)]
    for part, name in (("step-placerl", "placerl"), ("step-placerl-compile", "placerl_compiled")):
        startup = get(part, "startup") or {}
        for k in ("startup_s", "warm_up_s"):
            if k in startup:
                out[f"{name}_{k}"] = startup[k]
    # Every placerl step part, variants with overrides of their own (--parts NAME@KEY=VALUE) and a
    # part's repeats in one call (NAME#2) included: the sync's share of its step, and a variant's or
    # repeat's step against TRL with vLLM as it has it.
    for part, result in results.items():
        mean = result.get("mean_after_first") if isinstance(result, dict) else None
        if not part.startswith("step-placerl") or not mean or "sync_over_step" not in mean:
            continue
        out[f"{part}_sync_over_step"] = mean["sync_over_step"]
        out[f"{part}_sync_goal_2%"] = "met" if mean["sync_over_step"] < 0.02 else "NOT met"
        if "@" in part or "#" in part:
            trl = "step-trl" if step_part_sleeps(part) else "step-trl-nosleep"
            if get(trl, "mean_after_first"):
                step_ratio(out, f"{part}_over_{trl.replace('-', '_')}", mean, get(trl, "mean_after_first"))
    # One step off-policy, so not the on-policy comparison the 0.5 goal is about: reported beside it.
    overlapped = get("step-placerl-overlap", "mean_after_first")
    if overlapped and theirs:
        out["placerl_overlap_over_trl_step"] = round(overlapped["step_s"] / theirs["step_s"], 3)
    return out
