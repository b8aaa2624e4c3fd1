"""The rollout right after a sleep/wake cycle against the same rollout awake, on one engine
(the ``rollout-sleep`` part of bench/bench_vllm_gpu.py).

The recipe's colocated step decoded 14.9-16.1k tokens/s with vLLM's sleep mode and 18.3-20.0k
without it, for completions of the same mean length (reports/gpu/README.md 18): most of what sleep mode costs a
step is a slower rollout, not the wake. This part asks whether the cycle itself leaves vLLM
slower. One engine with sleep mode serves the step's batch (the recipe's prompts x samples x new
tokens, one seed, batch seeds: the same completions every time) again and again, the calls taking
turns: one right after ``sleep(level=1)`` + ``wake_up()``, one with the engine awake since its
last call. Same engine, same allocator, same work, so the ratio of the two medians is what the
cycle costs the decode. The prefix cache is reset before every call: a sleep drops it, and an
awake engine would otherwise serve the repeated prompts from it.

Left out: what vLLM's cumem allocator (on with sleep mode) costs an engine that never sleeps.
That needs a second engine without sleep mode, in a second process, on the same batch.
"""
from __future__ import annotations

import statistics
import time

from bench.gpu_measure import Recorder

TURNS = ("after_wake", "awake")


def after_wake_over_awake(calls: list[dict]) -> float | None:
    """Median seconds of the calls right after a wake over the median of the awake ones (pure);
    None until both kinds have a call."""
    by_kind = {k: [c["seconds"] for c in calls if c.get("turn") == k] for k in TURNS}
    if not all(by_kind.values()):
        return None
    return round(statistics.median(by_kind["after_wake"]) / statistics.median(by_kind["awake"]), 3)


def part_rollout_sleep(s, rec: Recorder, deadline: float, rounds: int = 4) -> None:
    """``rounds`` pairs of calls (the first of each pair alternating between the two turns)
    after one warm-up call; records each call and the ratio (``after_wake_over_awake``)."""
    import torch

    from bench.bench_vllm_gpu import model_and_adapter, prompt_ids, rollout_config, tokens_of
    from rl.rollout.engine import SamplingSpec, make_engine

    path, tok, payload = model_and_adapter(s)
    t = time.perf_counter()
    # Batch seeds: one seed for the whole call, so every call decodes the same completions. A CPU
    # (--smoke) has neither sleep mode nor CUDA graphs: there the part checks its plumbing only.
    on_gpu = torch.cuda.is_available()
    config = rollout_config(s, "vllm", False if on_gpu else "auto", sleep_mode=True if on_gpu else "auto",
                            seed_mode="batch")
    engine = make_engine(config, path, s.dtype, 0)
    engine.load_adapter(payload)
    rec("engine_start_s", round(time.perf_counter() - t, 1))
    rec("sleeps", engine.sleeps)
    ids = prompt_ids(tok, s.step_prompts)
    spec = SamplingSpec(n=s.step_group, max_new_tokens=s.step_tokens, temperature=1.0, seed=1)

    def call(turn: str) -> dict:
        if turn == "after_wake":
            t0 = time.perf_counter()
            engine.sleep()
            engine.wake_up()
            cycle_s = time.perf_counter() - t0
        engine.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        n = tokens_of(engine.generate(ids, spec))
        dt = time.perf_counter() - t0
        out = {"turn": turn, "seconds": round(dt, 3), "tokens": n, "tokens_per_s": round(n / dt, 1)}
        return out | ({"sleep_wake_s": round(cycle_s, 3)} if turn == "after_wake" else {})

    warm = call("awake")  # left out: the first full-size call pays first-use costs (allocations, kernel choice)
    rec("warm_up", warm)
    calls: list[dict] = []
    for turn in [t for r in range(rounds) for t in (TURNS if r % 2 == 0 else TURNS[::-1])]:
        if deadline - time.time() < 3 * warm["seconds"] + 10:
            rec("stopped", f"budget: {len(calls)} of {2 * rounds} calls made")
            break
        calls.append(call(turn))
        rec("calls", calls)
    rec("after_wake_over_awake", after_wake_over_awake(calls))
