"""The ``overhead`` part of bench/bench_vllm_gpu.py: the framework's rollout over raw vLLM."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict

from bench.bench_vllm_gpu import Sizes, model_and_adapter, prompt_ids, rollout_config, tokens_of
from bench.gpu_measure import Recorder


def part_overhead(s: Sizes, rec: Recorder, deadline: float) -> None:
    """The framework's rollout over raw ``vllm.LLM.generate``, like for like.

    Both engines are configured alike (the framework's VLLMEngine in a RolloutWorker actor
    behind a RolloutPool; a second one in this process, built by the same worker class so that
    it gets the same threads and core binding, used raw), serve the same
    adapter and get the same prompts and the same seed scheme: the engine's
    ``rollout.seed_mode`` (per-request seeds, or one ``torch.manual_seed(batch_seed(...))``
    per call and no request seeds), so both draw the same samples. Raw runs:

    - ``raw``: what a plain vLLM user writes to get what a Completion holds (token ids, the
      sampled tokens' logprobs, text): ``logprobs=0`` and vLLM's defaults otherwise
      (detokenized while decoding, a logprob dict per position). The goal is on this ratio;
    - ``raw_lean``: the engine's own SamplingParams (no detokenizing, flat logprobs), so
      framework over raw_lean is the framework's plumbing alone (Ray, Completions, texts).

    The framework's own call is also split as its engine timed it inside the worker's process
    (the completions' ``call_s``): vLLM's generate with the lean parameters
    (``in_actor_generate``), then building the rows (``in_actor_rows``). Against ``raw_lean``
    that says what the actor's process costs the engine; the rest of the framework's call is
    what Ray's call, the transfer and the pool add.

    Rounds alternate the three; ratios of the best times, and of the medians.
    """
    import ray
    import torch

    from rl.cluster import init_ray
    from rl.config import config_from_dict
    from rl.resources import reserve
    from rl.rollout.engine import SamplingSpec, batch_seed
    from rl.rollout.pool import RolloutPool
    from rl.rollout.worker import LocalRolloutWorker

    path, tok, payload = model_and_adapter(s)
    gpu = 0.4 if torch.cuda.is_available() else 0.0
    cfg = config_from_dict({"rollout": asdict(rollout_config(s, "vllm")), "learner": {"num_ranks": 1},
                            "cluster": {"colocate": True, "gpus_per_rollout_worker": gpu}})
    init_ray(num_cpus=max(2, os.cpu_count() or 2), object_store_mb=1024)
    pool = RolloutPool(cfg.rollout, path, s.dtype, 0, reserve(cfg), cfg.cluster)
    pool.sync(ray.put(payload))
    raw = LocalRolloutWorker(cfg.rollout, path, s.dtype, 0, cfg.cluster.cpu_threads).engine
    raw.load_adapter(payload)
    p, g, tokens = s.overhead_batch or (*s.batches[0], s.tokens)
    ids = prompt_ids(tok, p)
    spec = SamplingSpec(n=g, max_new_tokens=tokens, temperature=1.0, seed=1)
    lean = [raw._params(spec, i) for i in range(len(ids))]  # what the engine submits, seeds included
    plain = [vllm_default_outputs(x) for x in lean]
    prompts = [{"prompt_token_ids": list(x)} for x in ids]
    rec("seed_mode", raw.seed_mode)
    rec("engine_output_options", {k: getattr(lean[0], k) for k in ("detokenize", "flat_logprobs")
                                  if hasattr(lean[0], k)})

    def raw_run(params) -> int:
        if raw.seed_mode == "batch":  # as VLLMEngine.generate reseeds
            torch.manual_seed(batch_seed(spec.seed, spec.prompt_offset))
        outs = raw.llm.generate(prompts, params, lora_request=raw._lora, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def framework() -> int:
        groups = pool.generate(ids, spec)
        # The same call as its engine timed it inside the worker's process: vLLM's call, then the rows.
        times.setdefault("in_actor_generate", []).append(groups.call_s["generate_s"])
        times.setdefault("in_actor_rows", []).append(groups.call_s["rows_s"])
        return tokens_of(groups)

    runs = {"raw": lambda: raw_run(plain), "raw_lean": lambda: raw_run(lean), "framework": framework}
    small = SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=0)
    raw.generate(ids[:2], small), pool.generate(ids[:2], small)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(s.overhead_rounds):
        if r and 1.5 * sum(times[k][-1] for k in runs) > deadline - time.time():
            break
        counts = {}
        for name, fn in runs.items():
            t = time.perf_counter()
            counts[name] = fn()
            times[name].append(time.perf_counter() - t)
        rec(f"round_{r + 1}", {**{f"{k}_s": round(v[-1], 3) for k, v in times.items()},
                               **{f"{k}_tokens": n for k, n in counts.items()}})
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    # Where the framework's time over the bare call goes, by medians (in_actor_* from inside the
    # worker's process; the rest of the framework's call is Ray's call, transfer and the pool).
    rec("in_actor_median_s", {"generate": round(med["in_actor_generate"], 3), "rows": round(med["in_actor_rows"], 3),
                              "framework_minus_in_actor": round(med["framework"] - med["in_actor_generate"]
                                                                - med["in_actor_rows"], 3),
                              "in_actor_generate_over_raw_lean": round(med["in_actor_generate"] / med["raw_lean"], 4)})
    rec("result", {"batch": f"{p}x{g}x{tokens}", "raw_best_s": best["raw"], "raw_lean_best_s": best["raw_lean"],
                   "framework_best_s": best["framework"],
                   "framework_over_raw": round(best["framework"] / best["raw"], 4),
                   "framework_over_raw_median": round(med["framework"] / med["raw"], 4),
                   "framework_over_raw_lean": round(best["framework"] / best["raw_lean"], 4),
                   "raw_lean_over_raw": round(best["raw_lean"] / best["raw"], 4)})
    pool.shutdown()


def vllm_default_outputs(params):
    """A copy of vLLM SamplingParams with vLLM's default output work back on (detokenizing
    while decoding, a logprob dict per position), where the installed vLLM has the fields."""
    import copy

    out = copy.copy(params)
    for name, default in (("detokenize", True), ("flat_logprobs", False)):
        if hasattr(out, name):
            setattr(out, name, default)
    return out
