"""Rollout overhead: the framework's rollout path against raw ``vllm.LLM.generate``.

    python -m bench.bench_rollout                      # SmolLM2-135M-Instruct, 8 prompts x n=4, 64 tokens
    python -m bench.bench_rollout --parts hf --hf-batches 8x4,16x8    # the hf engine alone

Printed, all from this one run and one process tree:
  overhead ratio = framework rollout time / raw vllm.LLM.generate time (goal <= 1.10)
      framework: text prompts tokenized on the driver, sent to a RolloutWorker Ray actor
                 (in-process vLLM), completions converted to Completion objects and returned;
      raw:       vllm.LLM.generate on the same text prompts in this process, same SamplingParams.
      Both serve the same LoRA adapter (rank 16, all linear layers), as a GRPO rollout does,
      and both keep per-token logprobs. Each side is timed over several alternating rounds
      after a warm-up; the ratio uses the fastest round of each (the least disturbed by
      other work on the machine), and the medians are printed too.
  framework's own work per call = tokenization on the driver + an actor round trip with an
      empty batch: the framework's part of the overhead, free of decoding noise.
  hf engine tokens/s = generated tokens / wall time of the plain-transformers engine at
      GRPO batch sizes (prompts x group size).
The prompts are GSM8K test questions in the chat template when $PLACERL_GSM8K_DIR is set
(or the project's data folder exists), otherwise fixed arithmetic questions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.lora import DEFAULT_TARGET_MODULES  # noqa: E402
from rl.rollout.vllm_settings import use_in_process_engine  # noqa: E402

use_in_process_engine()

LORA = {"r": 16, "lora_alpha": 32, "target_modules": list(DEFAULT_TARGET_MODULES)}


def questions(k: int) -> list[str]:
    folder = os.environ.get("PLACERL_GSM8K_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k")
    path = Path(folder) / "test.jsonl"
    if path.exists():
        with open(path) as f:
            return [json.loads(line)["question"] for _, line in zip(range(k), f)]
    return [f"What is {7 * i + 3} times {i + 11}, minus {i}?" for i in range(k)]


def render(tok, qs: list[str]) -> list[str]:
    """The bare questions in the model's chat format, as training renders prompts (no instruction)."""
    from rl.data import render_prompt

    return [render_prompt(tok, q, "") for q in qs]


def adapter_payload(model_path: str, version: int):
    """A LoRA adapter with non-zero B (a trained one, as far as cost goes)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_model
    from rl.rollout.sync import make_payload

    model = get_peft_model(load_model(model_path, "float32"), LoraConfig(**LORA))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    return make_payload(model, version)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def raw_vllm(args, path: str, cfg, prompts: list[str], payload, seed: int):
    """Raw vLLM, configured as the framework configures it, in this process: the engine, a run
    function (generated tokens of one call) and the adapter folder it serves."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from rl.rollout.engine import prompt_seed
    from rl.rollout.sync import AdapterPayload, fold_scales_for_vllm, write_peft_adapter
    from rl.rollout.vllm_settings import served_rank_cap

    raw = LLM(model=path, dtype=args.dtype, seed=0, max_model_len=cfg.max_model_len, enforce_eager=True,
              enable_lora=True, max_lora_rank=served_rank_cap(cfg.max_lora_rank), max_loras=1,
              max_cpu_loras=2, logprobs_mode="processed_logprobs", distributed_executor_backend="uni",
              disable_log_stats=True, kv_cache_memory_bytes=int(cfg.cpu_kv_cache_gb * 2**30))
    folder = tempfile.mkdtemp(prefix="bench-lora-")
    tensors, lcfg = fold_scales_for_vllm(payload.tensors, payload.peft_config)
    write_peft_adapter(AdapterPayload(1, tensors, lcfg), folder)
    lora = LoRARequest("bench", 1, folder)
    # The engine's seeds (rl.rollout.engine.prompt_seed), so both sides sample the same streams.
    full = [SamplingParams(n=args.n, max_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                           seed=prompt_seed(seed, i, args.n), logprobs=0) for i in range(len(prompts))]

    def run():
        outs = raw.generate(prompts, full, lora_request=lora, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    return raw, run, folder


def framework_worker(args, path: str, cfg, payload):
    """The framework's side: a RolloutWorker actor serving ``payload``, at the same priority
    and on the whole machine, so that the ratio is the framework's own cost."""
    import ray

    from rl.cluster import init_ray
    from rl.rollout.worker import RolloutWorker

    # Ray runs workers at nice 15 and with OMP_NUM_THREADS = the actor's num_cpus; on a
    # machine with other work that alone makes the actor slower than this nice-0 process.
    os.environ.setdefault("RAY_worker_niceness", "0")
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND") if k in os.environ}
    init_ray(num_cpus=os.cpu_count(), object_store_mb=512, runtime_env={"env_vars": threads})
    worker = RolloutWorker.options(num_cpus=args.threads or os.cpu_count()).remote(cfg, path, args.dtype, 0, args.threads)
    ray.get(worker.ping.remote())
    ray.get(worker.load_adapter.remote(ray.put(payload)))
    return worker


def bench_overhead(args, path: str, tok, payload) -> None:
    import ray

    from rl.config import RolloutConfig
    from rl.rollout.engine import SamplingSpec

    prompts = render(tok, questions(args.prompts))
    cfg = RolloutConfig(engine="vllm", max_lora_rank=LORA["r"], max_model_len=1024, cpu_kv_cache_gb=0.5)
    spec = SamplingSpec(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=0)
    raw, raw_run, folder = raw_vllm(args, path, cfg, prompts, payload, spec.seed)
    worker = framework_worker(args, path, cfg, payload)

    def framework_run(s=spec):  # tokenization, transfer and conversion included
        ids = tok(prompts, add_special_tokens=False)["input_ids"]
        rows = ray.get(worker.generate.remote(ids, s))
        return sum(len(c.token_ids) for row in rows for c in row)

    print(f"model={args.model} dtype={args.dtype} prompts={args.prompts} n={args.n} "
          f"max_new_tokens={args.max_new_tokens} lora=r{LORA['r']} all-linear rounds={args.rounds}", flush=True)
    raw_tokens, fw_tokens = raw_run(), framework_run()  # warm-up (first-call kernel setup)
    raw_times, fw_times = [], []
    for i in range(args.rounds):
        raw_times.append(timed(raw_run))
        fw_times.append(timed(framework_run))
        print(f"round {i + 1}: raw {raw_times[-1]:.2f} s, framework {fw_times[-1]:.2f} s", flush=True)
    # The framework's own work per call, without any decoding: tokenizing on the driver, and
    # an actor round trip (an empty batch returns at once).
    tokenize = min(timed(lambda: tok(prompts, add_special_tokens=False)) for _ in range(5))
    round_trip = min(timed(lambda: ray.get(worker.generate.remote([], spec))) for _ in range(5))
    ray.kill(worker)
    del raw_run, raw
    shutil.rmtree(folder, ignore_errors=True)
    print_overhead(raw_times, fw_times, raw_tokens, fw_tokens, tokenize + round_trip, tokenize, round_trip)


def print_overhead(raw_times, fw_times, raw_tokens: int, fw_tokens: int, own: float, tokenize: float,
                   round_trip: float) -> None:
    print(f"raw vllm.LLM.generate   : best {min(raw_times):.3f} s  median {statistics.median(raw_times):.3f} s  "
          f"({raw_tokens} tokens, {raw_tokens / min(raw_times):.0f} tok/s)")
    print(f"framework RolloutWorker : best {min(fw_times):.3f} s  median {statistics.median(fw_times):.3f} s  "
          f"({fw_tokens} tokens, {fw_tokens / min(fw_times):.0f} tok/s)")
    ratio = min(fw_times) / min(raw_times)
    print(f"rollout overhead ratio (framework / raw, best rounds) = {ratio:.3f}  "
          f"[median rounds: {statistics.median(fw_times) / statistics.median(raw_times):.3f}]  goal <= 1.10: "
          f"{'met' if ratio <= 1.10 else 'NOT met'}")
    print(f"framework's own work per call (best of 5): tokenize {tokenize * 1e3:.1f} ms + actor round trip "
          f"{round_trip * 1e3:.1f} ms = {own * 1e3:.1f} ms = {own / min(raw_times):.2%} of the raw rollout", flush=True)


def bench_hf(args, path: str, tok, payload) -> None:
    from rl.config import RolloutConfig
    from rl.rollout.engine import SamplingSpec
    from rl.rollout.hf_engine import HFEngine

    hf = HFEngine(RolloutConfig(engine="hf", max_lora_rank=LORA["r"], max_model_len=1024), path,
                  args.hf_dtype, seed=0)
    hf.load_adapter(payload)
    for shape in args.hf_batches.split(","):
        p, g = (int(x) for x in shape.split("x"))
        ids = tok(render(tok, questions(p)), add_special_tokens=False)["input_ids"]
        s = SamplingSpec(n=g, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
        t = time.perf_counter()
        rows = hf.generate(ids, s)
        dt = time.perf_counter() - t
        n_tok = sum(len(c.token_ids) for row in rows for c in row)
        print(f"hf engine {p}x{g} ({p * g} sequences, {args.hf_dtype}, LoRA r{LORA['r']}): {n_tok} tokens "
              f"in {dt:.2f} s = {n_tok / dt:.0f} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="overhead,hf", help="overhead (vLLM vs framework), hf (hf engine tokens/s)")
    ap.add_argument("--hf-batches", default="8x4,16x8", help="prompts x group size for the hf engine")
    ap.add_argument("--hf-dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for every engine (0: all cores); 1 is steadier on a busy machine, "
                         "where multi-threaded CPU kernels stall on descheduled threads")
    args = ap.parse_args()
    # Set before torch or vLLM start their thread pools, here and (through Ray) in the actor,
    # so that both sides run the same threads: Ray would otherwise set its own count there.
    # Name the cores for vLLM too: left to "auto" it keeps one back (rl/rollout/worker.py says why).
    threads = args.threads or os.cpu_count()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"

    from core.models import load_tokenizer, resolve_model

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    payload = adapter_payload(path, version=1)
    parts = set(args.parts.split(","))
    if "overhead" in parts:
        bench_overhead(args, path, tok, payload)
    if "hf" in parts:
        bench_hf(args, path, tok, payload)


if __name__ == "__main__":
    main()
