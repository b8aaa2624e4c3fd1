"""Does vLLM's sleep mode slow a rollout? The ``rollout-sleep``, ``rollout-sleep-async`` and
``rollout-awake`` parts of bench/bench_vllm_gpu.py.

Each part decodes the step's batch (the recipe's prompts x samples x new tokens, batch seeds:
the same completions in every call since the engine also seeds numpy, from which vLLM's GPU
runner draws request seeds) again and again, with the prefix cache reset before each call (a
sleep drops it, and an awake engine would otherwise serve the repeated prompts from it). Every
call carries its engine steps' profile (bench/vllm_step_timer.py).

- ``rollout-sleep``: one engine with sleep mode, the calls taking turns between right after
  ``sleep(level=1)`` + ``wake_up()`` and awake since the last call. Same engine, same
  allocator, same work: ``after_wake_over_awake``, the ratio of the two medians, is what the
  cycle costs the decode. A third turn, ``after_wake_churn``: between the sleep and the wake
  the process fills and frees as much memory as the sleep released (torch's allocator, then
  ``empty_cache``), as a colocated learner does with it (``churn_over_awake``).
- ``rollout-sleep-async``: the same with vLLM's async scheduling.
- ``rollout-awake``: the same calls on an engine without sleep mode, so without vLLM's cumem
  allocator (sleep mode puts the weights and the KV cache in memory it maps itself). Its median
  against ``rollout-sleep``'s awake calls (the summary's ``rollout_sleep_engine_awake_over_plain``,
  two processes, one after the other) is what that allocator costs an engine that is not woken.
"""
from __future__ import annotations

import statistics
import time

from bench.gpu_measure import Recorder

TURNS = ("after_wake", "awake", "after_wake_churn")


def median_seconds(calls: list[dict], turn: str) -> float | None:
    """The median seconds of the calls of one turn (pure); None when there is none."""
    seconds = [c["seconds"] for c in calls if c.get("turn") == turn]
    return statistics.median(seconds) if seconds else None


def after_wake_over_awake(calls: list[dict], turn: str = "after_wake") -> float | None:
    """Median seconds of the calls of ``turn`` (right after a wake) over the median of the awake
    ones (pure); None until both kinds have a call."""
    woken, awake = median_seconds(calls, turn), median_seconds(calls, "awake")
    return round(woken / awake, 3) if woken and awake else None


def turn_order(rounds: int, sleep_mode: bool) -> list[str]:
    """Each round makes one call of every turn, the round's first turn rotating so that no turn
    always follows the same one (pure); without sleep mode, awake calls only."""
    if not sleep_mode:
        return ["awake"] * (len(TURNS) * rounds)
    return [TURNS[(r + i) % len(TURNS)] for r in range(rounds) for i in range(len(TURNS))]


def fill_and_free(torch, n_bytes: int) -> None:
    """Take ``n_bytes`` of device memory through torch's allocator, write it and give it back to
    the device: what a colocated learner does with the memory a sleeping engine released."""
    block = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    block.fill_(1)
    torch.cuda.synchronize()
    del block
    torch.cuda.empty_cache()


def part_rollout_sleep(s, rec: Recorder, deadline: float, sleep_mode: bool = True, rounds: int = 4,
                       async_scheduling: bool | str = "auto") -> None:
    """After one warm-up call, ``rounds`` rounds of one call per turn (turn_order). Records each
    call with its engine steps' profile (bench/vllm_step_timer.py), the medians and, with sleep
    mode, each woken turn over the awake one."""
    import torch

    from bench.bench_vllm_gpu import model_and_adapter, prompt_ids, rollout_config, tokens_of
    from bench.vllm_step_timer import EngineStepTimer, step_profile
    from rl.rollout.engine import SamplingSpec, make_engine

    path, tok, payload = model_and_adapter(s)
    t = time.perf_counter()
    # A CPU (--smoke) has neither sleep mode nor CUDA graphs: there the part checks its plumbing only.
    on_gpu = torch.cuda.is_available()
    sleeps = (True if on_gpu else "auto") if sleep_mode else False
    config = rollout_config(s, "vllm", False if on_gpu else "auto", sleep_mode=sleeps, seed_mode="batch",
                            async_scheduling=async_scheduling)
    engine = make_engine(config, path, s.dtype, 0)
    engine.load_adapter(payload)
    rec("engine_start_s", round(time.perf_counter() - t, 1))
    rec("sleeps", engine.sleeps)
    ids = prompt_ids(tok, s.step_prompts)
    spec = SamplingSpec(n=s.step_group, max_new_tokens=s.step_tokens, temperature=1.0, seed=1)

    def call(turn: str) -> dict:
        extra = {}
        if turn != "awake":
            t0 = time.perf_counter()
            free_before = torch.cuda.mem_get_info()[0] if on_gpu else 0
            engine.sleep()
            if turn == "after_wake_churn" and on_gpu:
                released = torch.cuda.mem_get_info()[0] - free_before
                extra["churn_gib"] = round(released / 2**30, 2)
                fill_and_free(torch, released)
            engine.wake_up()
            extra["sleep_wake_s"] = round(time.perf_counter() - t0, 3)
        engine.llm.reset_prefix_cache()
        with EngineStepTimer(engine.llm.llm_engine) as timer:
            t0 = time.perf_counter()
            n = tokens_of(engine.generate(ids, spec))
            dt = time.perf_counter() - t0
        return {"turn": turn, "seconds": round(dt, 3), "tokens": n, "tokens_per_s": round(n / dt, 1), **extra,
                "gc_s": round(timer.gc.seconds, 3), "engine_steps": step_profile(timer.steps)}

    warm = call("awake")  # left out: the first full-size call pays first-use costs (allocations, kernel choice)
    rec("warm_up", warm)
    order = turn_order(rounds, sleep_mode)
    calls: list[dict] = []
    for turn in order:
        if deadline - time.time() < 3 * warm["seconds"] + 10:
            rec("stopped", f"budget: {len(calls)} of {len(order)} calls made")
            break
        calls.append(call(turn))
        rec(f"call_{len(calls)}", calls[-1])  # printed as it comes; a stopped run keeps what it made
    rec("calls", calls)
    medians = {turn: median_seconds(calls, turn) for turn in TURNS}
    rec("median_s", {turn: m for turn, m in medians.items() if m})
    if sleep_mode:
        rec("after_wake_over_awake", after_wake_over_awake(calls))
        rec("churn_over_awake", after_wake_over_awake(calls, "after_wake_churn"))
