"""The ``rollout-graphs``, ``rollout-eager`` and ``rollout-hf`` parts of bench/bench_vllm_gpu.py:
generated tokens per second at GRPO batch sizes, the seed modes by turns, and vLLM's async
scheduling in a child process."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench.bench_vllm_gpu import REPO, Sizes, model_and_adapter, one_line, prompt_ids, rollout_config, tokens_of
from bench.gpu_measure import Recorder


def part_rollout(s: Sizes, kind: str, rec: Recorder, deadline: float, child: list[str] | None = None) -> None:
    """``kind``: graphs, eager, hf, or graphs-async (the largest batch only, batch seeds, vLLM's
    async scheduling on: the variant that rollout-graphs runs in a child process)."""
    import torch

    from rl.rollout.engine import SamplingSpec, make_engine

    path, tok, payload = model_and_adapter(s)
    t = time.perf_counter()
    # On a CPU (the smoke run) vLLM runs eager whatever the part: it has no CUDA graphs.
    eager = {"graphs": False, "eager": True}.get(kind, "auto") if torch.cuda.is_available() else "auto"
    variant = {"async_scheduling": True, "seed_mode": "batch"} if kind == "graphs-async" else {}
    if kind == "graphs-async":
        eager = False if torch.cuda.is_available() else "auto"
    engine = make_engine(rollout_config(s, "hf" if kind == "hf" else "vllm", eager, **variant), path, s.dtype, 0)
    rec("enforce_eager", eager)
    if kind == "hf":  # it decodes at most this many sequences at once, the rest in later chunks
        rec("hf_max_batch_sequences", engine.max_batch)
    if variant:  # vLLM may turn it off where the platform lacks it (its CPU backend does)
        config = getattr(engine.llm.llm_engine, "vllm_config", None)
        rec("async_scheduling_in_effect", getattr(getattr(config, "scheduler_config", None), "async_scheduling", None))
    engine.load_adapter(payload)
    start_s = time.perf_counter() - t
    rec("engine_start_s", round(start_s, 1))
    tokens = s.hf_tokens if kind == "hf" else s.tokens
    engine.generate(prompt_ids(tok, 2), SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=0))  # warm-up
    last_rate = None
    for p, g in s.batches[-1:] if variant else s.batches:
        left = deadline - time.time()
        if last_rate and p * g * tokens / last_rate > left:
            rec(f"{p}x{g}", {"skipped": f"about {p * g * tokens / last_rate:.0f} s needed, {left:.0f} s left"})
            continue
        ids = prompt_ids(tok, p)
        t = time.perf_counter()
        rows = engine.generate(ids, SamplingSpec(n=g, max_new_tokens=tokens, temperature=1.0, seed=1))
        dt = time.perf_counter() - t
        n = tokens_of(rows)
        last_rate = n / dt
        rec(f"{p}x{g}", {"tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1),
                         "max_new_tokens": tokens, "mean_completion_tokens": round(n / (p * g), 1),
                         "seed_mode": getattr(engine, "seed_mode", "request")})
    if kind in ("graphs", "eager") and last_rate:
        seed_mode_turns(engine, tok, s, tokens, rec, deadline, last_rate)
    if kind == "graphs" and last_rate and child:
        async_variant(s, rec, deadline, child, start_s + s.batches[-1][0] * s.batches[-1][1] * tokens / last_rate)


def async_variant(s: Sizes, rec: Recorder, deadline: float, child: list[str], needed_s: float) -> None:
    """The largest batch with batch seeds and ``rollout.async_scheduling=true``, in a child
    process (an engine's GPU memory is not given back inside a process), recorded apart."""
    p, g = s.batches[-1]
    key, left = f"{p}x{g}_async_scheduling", deadline - time.time()
    if needed_s * 1.5 + 30 > left:
        rec(key, {"skipped": f"about {needed_s * 1.5 + 30:.0f} s needed, {left:.0f} s left"})
        return
    out = Path(rec.path).with_name(rec.path.name + ".async.json")
    out.unlink(missing_ok=True)
    # In this part's process group: killed with the part at the budget.
    proc = subprocess.Popen(child + ["--part", "rollout-graphs-async", "--part-out", str(out), "--deadline",
                                     str(deadline - 5)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=max(1.0, left - 5))
        error = f"exit {proc.returncode}: {one_line(err)}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        error = f"killed at the budget: {one_line(err or '')}"
    data = json.loads(out.read_text()) if out.exists() else {}
    out.unlink(missing_ok=True)
    result = {k: data[k] for k in ("async_scheduling_in_effect", "engine_start_s") if k in data}
    result.update(data.get(f"{p}x{g}", {}))
    if error:
        result["error"] = error
    rec(key, result)


def seed_mode_turns(engine, tok, s: Sizes, tokens: int, rec: Recorder, deadline: float, rate: float) -> None:
    """The largest batch three more times on the same engine, the seed modes taking turns (the
    other rollout.seed_mode, this one, the other): with the first run, two of each, so that
    neither mode always runs first (``128x8_seed_mode_turns``, in the order they ran)."""
    from rl.rollout.engine import SamplingSpec

    p, g = s.batches[-1]
    mode = engine.seed_mode
    other = "request" if mode == "batch" else "batch"
    first = rec.data.get(f"{p}x{g}", {})
    turns = [{"seed_mode": mode, "tokens_per_s": first.get("tokens_per_s"), "seconds": first.get("seconds")}]
    for turn in (other, mode, other):
        if p * g * tokens / rate > deadline - time.time():
            break
        engine.seed_mode = turn
        try:
            t = time.perf_counter()
            n = tokens_of(engine.generate(prompt_ids(tok, p), SamplingSpec(n=g, max_new_tokens=tokens,
                                                                           temperature=1.0, seed=1)))
            dt = time.perf_counter() - t
        finally:
            engine.seed_mode = mode
        turns.append({"seed_mode": turn, "tokens_per_s": round(n / dt, 1), "seconds": round(dt, 3)})
    rec(f"{p}x{g}_seed_mode_turns", turns)
