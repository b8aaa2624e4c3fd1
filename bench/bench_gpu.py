"""GPU figures in one run: DomLoRA vs all-linear learner step, PAGE scoring, hf engine tokens/s, memory.

    python -m bench.bench_gpu                      # SmolLM2-135M-Instruct on the first GPU, about 3 min on an H200
    python -m bench.bench_gpu --smoke              # the tiny Llama, tiny sizes: checks the script on a CPU
    python -m bench.bench_gpu --out bench_gpu.json # also write the JSON to a file

Printed, all from this one process (readable lines, then one JSON object):
  page scoring   = wall time of the PAGE scorer on 32 GSM8K probe samples (cold: the first
                   call in the process, warm: the second), and the module DomLoRA keeps;
  learner step   = one FSDP2 learner rank (NCCL, bf16 mixed precision on CUDA; in this
                   process, no Ray) on a GRPO-shaped batch (prompts x group size sequences of
                   prompt + response tokens), for the all-linear LoRA plan and the DomLoRA plan
                   at the same rank; step ratio = DomLoRA / all-linear (the DomLoRA paper
                   reports about 0.72);
  hf engine      = generated tokens / wall time of the plain-transformers engine on GSM8K
                   test prompts at GRPO batch sizes (prompts x n, temperature 1), serving no
                   adapter, the all-linear adapter and the DomLoRA adapter (random B, so the
                   cost is that of a trained one); ms/step = wall time / decode steps;
  peak memory    = torch.cuda.max_memory_allocated during each measurement (on CPU: none).
Each section is independent: one that fails prints its error in one line and the rest run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAPER_RATIO = 0.72


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} MB"


def data_rows(split: str) -> list[dict]:
    """GSM8K rows ($PLACERL_GSM8K_DIR), or synthetic arithmetic rows where GSM8K is absent."""
    from rl.config import DataConfig
    from rl.data import load_task

    if os.environ.get("PLACERL_GSM8K_DIR"):
        return load_task(DataConfig(task="gsm8k"), split)
    print("PLACERL_GSM8K_DIR is not set: using the synthetic arithmetic task's prompts")
    return load_task(DataConfig(task="synthetic"), split)


# ----------------------------------------------------------------------------- sections

def page_section(path: str, tok, args) -> tuple[dict, object, object]:
    from launch.score import render_rows
    from placement import Budget, ScorerSettings, build_probe, score_model
    from core.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = ScorerSettings(rank=args.rank, alpha=2.0 * args.rank)
    probe = build_probe(tok, render_rows(data_rows("train"), tok, args.probe_samples, 0), "sft", 512)
    model = load_model(path, "float32").to(device)
    _reset_peak()
    times = []
    for _ in range(2):
        _sync()
        plan = score_model("page", model, probe, Budget.parse(""), settings)
        _sync()
        times.append(plan.seconds)
    peak = _peak_mb()
    uniform = score_model("uniform", model, None, Budget.parse(""), settings)
    del model
    top = plan.details["top_module"]
    out = {"samples": probe.num_samples, "tokens": probe.num_tokens, "cold_s": times[0], "warm_s": times[1],
           "peak_mb": peak, "top_module": top, "top_share_total": plan.details["top_share_total"],
           "top_share_in_type": plan.details["top_share_in_type"]}
    print(f"page scoring ({probe.num_samples} samples, {probe.num_tokens} tokens): cold {times[0]:.2f} s, "
          f"warm {times[1]:.2f} s, peak {_mb(peak)}; DomLoRA module {top} "
          f"({100 * out['top_share_total']:.1f}% of PAGE, {100 * out['top_share_in_type']:.1f}% of its type)")
    return out, uniform, plan


def grpo_shaped_batch(B: int, prompt: int, response: int, vocab: int):
    from rl.learner.group import TrainBatch

    g = torch.Generator().manual_seed(0)
    T = prompt + response
    ids = torch.randint(0, vocab, (B, T), generator=g)
    resp = torch.zeros(B, T)
    resp[:, prompt:] = 1
    return TrainBatch(ids, torch.ones(B, T, dtype=torch.long), resp, torch.randn(B, generator=g),
                      torch.where(resp.bool(), -1.0, 0.0), max_tokens=response)


def learner_step(path: str, plan, batch, args) -> dict:
    """Seconds per learner step of one in-process FSDP2 rank built from ``plan``."""
    from rl.config import config_from_dict
    from rl.learner.group import split_batch
    from rl.learner.rank import LearnerRank
    from core.lora import lora_config_to_dict
    from rl.cluster import LOOPBACK, free_port

    cfg = config_from_dict({"model": {"name": path}, "trainer": {"steps": 1000},
                            "learner": {"micro_batch_size": args.micro_batch, "lr": 1e-5},
                            "rollout": {"temperature": 1.0}})
    _reset_peak()
    rank = LearnerRank(0, 1)
    rank.setup(cfg, path, lora_config_to_dict(plan.to_peft_config()), None, LOOPBACK, free_port(), None, plan)
    try:
        shard = split_batch(batch, 1)[0]
        totals = {"num_sequences": batch.input_ids.shape[0], "num_tokens": float(batch.response_mask.sum()),
                  "max_tokens": batch.max_tokens}
        rank.train_step(shard, totals)  # warm-up: allocator, kernels
        _sync()
        t = time.perf_counter()
        for _ in range(args.learner_steps):
            rank.train_step(shard, totals)
        _sync()
        step_s = (time.perf_counter() - t) / args.learner_steps
        trainable = sum(p.numel() for p in rank.params)
        return {"step_s": step_s, "peak_mb": _peak_mb(), "trainable_params": trainable,
                "adapters": len(plan.adapters)}
    finally:
        rank.shutdown()
        del rank


def learner_section(path: str, plans: dict, vocab: int, args) -> dict:
    B = args.learner_prompts * args.learner_group
    batch = grpo_shaped_batch(B, args.prompt_tokens, args.response_tokens, vocab)
    print(f"learner batch: {B} sequences ({args.learner_prompts} prompts x {args.learner_group}) of "
          f"{args.prompt_tokens} + {args.response_tokens} tokens, micro-batch {args.micro_batch}, "
          f"{args.learner_steps} timed steps after one warm-up")
    out = {"sequences": B, "prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens,
           "micro_batch": args.micro_batch}
    for name, plan in plans.items():
        r = learner_step(path, plan, batch, args)
        out[name] = r
        print(f"learner step {name:<10} {r['step_s']:.3f} s   {r['trainable_params']:>9,} trainable in "
              f"{r['adapters']} modules   peak {_mb(r['peak_mb'])}")
    out["ratio_page_over_uniform"] = out["page"]["step_s"] / out["uniform"]["step_s"]
    print(f"learner step ratio DomLoRA / all-linear = {out['ratio_page_over_uniform']:.3f} "
          f"(the DomLoRA paper reports about {PAPER_RATIO})")
    return out


def adapter_payload(path: str, plan, version: int):
    from placement import apply_plan
    from core.models import load_model
    from rl.rollout.sync import make_payload

    model = apply_plan(load_model(path, "float32"), plan)
    gen = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    return make_payload(model, version)


def engine_section(path: str, tok, plans: dict, args) -> dict:
    from rl.config import DataConfig, RolloutConfig
    from rl.data import attach_prompts
    from rl.rollout.engine import SamplingSpec
    from rl.rollout.hf_engine import HFEngine

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.engine_batches.split(",") if s]
    rows = attach_prompts(data_rows("test"), tok, DataConfig())
    cfg = RolloutConfig(engine="hf", max_lora_rank=max(64, args.rank), max_model_len=2048)
    engine = HFEngine(cfg, path, "auto", seed=0, max_batch_sequences=max(p * n for p, n in shapes))
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    out = {"dtype": dtype, "max_new_tokens": args.new_tokens, "runs": []}
    for version, adapter in enumerate(args.engine_adapters.split(","), start=1):
        if adapter != "none":
            engine.load_adapter(adapter_payload(path, plans[adapter], version))
        warm = SamplingSpec(n=2, max_new_tokens=4, temperature=1.0, seed=0)
        engine.generate([rows[0]["prompt_ids"]], warm)
        for p, n in shapes:
            ids = [r["prompt_ids"] for r in rows[:p]]
            _reset_peak()
            _sync()
            t = time.perf_counter()
            groups = engine.generate(ids, SamplingSpec(n=n, max_new_tokens=args.new_tokens, temperature=1.0, seed=0))
            _sync()
            dt = time.perf_counter() - t
            lengths = [len(c.token_ids) for g in groups for c in g]
            r = {"adapter": adapter, "prompts": p, "n": n, "tokens": sum(lengths), "seconds": dt,
                 "tokens_per_s": sum(lengths) / dt, "decode_steps": max(lengths),
                 "ms_per_step": 1e3 * dt / max(lengths), "peak_mb": _peak_mb()}
            out["runs"].append(r)
            print(f"hf engine {adapter:<8} {p:>3}x{n:<2} ({p * n:>3} seqs, {dtype}): {r['tokens']:>6} tokens in "
                  f"{dt:6.2f} s = {r['tokens_per_s']:>7.0f} tok/s, {r['ms_per_step']:.1f} ms/step, "
                  f"peak {_mb(r['peak_mb'])}")
    del engine
    return out


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (checks the script on a CPU)")
    ap.add_argument("--model", default="")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of both plans (alpha = 2 x rank)")
    ap.add_argument("--probe-samples", type=int, default=32)
    ap.add_argument("--learner-prompts", type=int, default=32)
    ap.add_argument("--learner-group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=160)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--learner-steps", type=int, default=3)
    ap.add_argument("--engine-batches", default="8x4,16x8,32x8", help="prompts x n, comma separated")
    ap.add_argument("--engine-adapters", default="none,uniform,page")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sections", default="page,learner,engine")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model = args.model or "tiny-llama"
        args.probe_samples, args.learner_prompts, args.learner_group = 4, 2, 2
        args.prompt_tokens, args.response_tokens, args.micro_batch, args.learner_steps = 16, 16, 2, 1
        args.engine_batches, args.new_tokens = "2x2,4x2", 8
    args.model = args.model or "smollm2-135m-instruct"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import transformers
    from transformers import AutoConfig

    from core.models import load_tokenizer, resolve_model

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {"device": where, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "model": args.model, "rank": args.rank, "errors": {}}
    print(f"bench_gpu: {args.model} on {where}, torch {torch.__version__}, transformers {transformers.__version__}")
    t0 = time.perf_counter()
    sections = args.sections.split(",")
    plans = {}
    try:  # every later section needs the two plans
        result["page"], plans["uniform"], plans["page"] = page_section(path, tok, args)
    except Exception as e:  # noqa: BLE001 - report and go on with what does not need it
        result["errors"]["page"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    for name, fn in (("learner", lambda: learner_section(path, plans, AutoConfig.from_pretrained(path).vocab_size, args)),
                     ("engine", lambda: engine_section(path, tok, plans, args))):
        if name not in sections:
            continue
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001
            result["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"section {name} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
    result["wall_s"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
