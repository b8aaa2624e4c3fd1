"""Where a learner micro-batch's memory goes on CPU: logits over the prompt and the vocabulary, activations.

    python bench/bench_learner_memory.py --batch 8 --prompt 150 --completion 64

One forward and backward of SmolLM2-135M-Instruct with a rank-8 LoRA on every linear
projection (what the learner runs per micro-batch, in float32 as on CPU), each variant
in a fresh process so that its peak resident memory is its own:

  full logits      logits at every position, as the learner computed them before
  completion only  logits from the first completion position on (``logits_to_keep``;
                   ``learner.logprob_chunk=0``)
  chunked head     no [b, t, V] logits at all: token logprobs from the hidden states, the
                   output layer ``--chunk`` positions at a time (rl/learner/logprobs.py,
                   what rl/learner/rank.py does by default)
  + checkpointing  the chunked head and ``learner.gradient_checkpointing=true``

Printed per variant: peak RSS above the loaded model (and the process's whole peak), the
seconds of one forward and backward (the second of two), and their ratios against the
first variant, all from this one run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name: (logits from the first completion position only, chunked head, activation checkpointing)
VARIANTS = {"full logits": (False, False, False), "completion only": (True, False, False),
            "chunked head": (True, True, False), "+ checkpointing": (True, True, True)}


def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2**20


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM), so that loading
    # the model (a GGUF is dequantised through temporary copies) does not mask the step's peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _run(args, completion_only: bool, chunked: bool, checkpointing: bool, out) -> None:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from core.lora import DEFAULT_TARGET_MODULES
    from rl.grpo import token_logprobs
    from rl.learner.logprobs import logprob_head
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
    first = args.prompt - 1 if completion_only else 0

    def step() -> None:
        if chunked:
            with logprob_head(model, F.pad(labels[:, first:], (0, 1), value=-100), 1.0, args.chunk):
                lp = model(input_ids=ids, logits_to_keep=T - first).logits[:, :-1, 0]
        else:
            logits = model(input_ids=ids, logits_to_keep=T - first).logits[:, :-1]
            lp = token_logprobs(logits, labels[:, first:])
        (-lp.sum() / (labels != -100).sum()).backward()

    _reset_peak()
    before = _status_gb("VmRSS")
    step()  # the first step also pays one-time costs (allocator growth, kernel selection): untimed
    t = time.perf_counter()
    step()
    out.put({"peak_gb": _status_gb("VmHWM") - before, "total_peak_gb": _status_gb("VmHWM"),
             "seconds": time.perf_counter() - t})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=150)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=1024, help="positions per output-layer chunk (learner.logprob_chunk)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    result = {}
    for name, flags in VARIANTS.items():
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(args, *flags, q))
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
        print(f"{name:16} {r['peak_gb']:.2f} GB above the model ({r['memory_ratio']:.2f}x; process peak "
              f"{r['total_peak_gb']:.2f} GB), "
              f"{r['seconds']:.1f} s ({r['time_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
