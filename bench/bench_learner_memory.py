"""Where a learner micro-batch's memory goes on CPU: logits over the prompt, activations.

    python bench/bench_learner_memory.py --batch 8 --prompt 150 --completion 64

One forward and backward of SmolLM2-135M-Instruct with a rank-8 LoRA on every linear
projection (what the learner runs per micro-batch, in float32 as on CPU), each variant
in a fresh process so that its peak resident memory is its own:

  full logits      logits at every position, as the learner computed them before
  completion only  logits from the first completion position on (``logits_to_keep``,
                   what rl/learner/rank.py does now)
  + checkpointing  completion-only logits and ``learner.gradient_checkpointing=true``

Printed: peak RSS above the loaded model, and seconds, per variant, and their ratios
against the first, all from this one run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {"full logits": (False, False), "completion only": (True, False), "+ checkpointing": (True, True)}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _run(args, completion_only: bool, checkpointing: bool, out) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from core.lora import DEFAULT_TARGET_MODULES
    from rl.grpo import token_logprobs
    from core.models import load_model, resolve_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(resolve_model("smollm2-135m-instruct"), "float32"),
                           LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES)))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    T = args.prompt + args.completion
    ids = torch.randint(0, 49000, (args.batch, T))
    labels = torch.full((args.batch, T - 1), -100)
    labels[:, args.prompt - 1:] = ids[:, args.prompt:]
    before = _peak_gb()
    t = time.perf_counter()
    first = args.prompt - 1 if completion_only else 0
    logits = model(input_ids=ids, logits_to_keep=T - first).logits[:, :-1]
    lp = token_logprobs(logits, labels[:, first:])
    (-lp.sum() / (labels != -100).sum()).backward()
    out.put({"peak_gb": _peak_gb() - before, "seconds": time.perf_counter() - t})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=150)
    ap.add_argument("--completion", type=int, default=64)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    result = {}
    for name, (completion_only, checkpointing) in VARIANTS.items():
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(args, completion_only, checkpointing, q))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"the {name!r} variant failed (exit code {p.exitcode}); its error is above")
        result[name] = q.get()
    first = next(iter(result.values()))
    for name, r in result.items():
        r["memory_ratio"], r["time_ratio"] = r["peak_gb"] / max(first["peak_gb"], 1e-9), r["seconds"] / first["seconds"]
    print(json.dumps(result, indent=1))
    for name, r in result.items():
        print(f"{name:16} {r['peak_gb']:.2f} GB above the model ({r['memory_ratio']:.2f}x), "
              f"{r['seconds']:.1f} s ({r['time_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
