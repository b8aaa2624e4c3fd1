"""The learner's step before and after its CUDA changes, in one process, on a GRPO-shaped batch.

    python -m bench.bench_learner_variants                                   # CPU: tiny Llama, a quick look
    python -m bench.bench_learner_variants --model random-qwen2.5-0.5b --prompts 32 --group 8 \\
        --prompt-len 150 --max-new 512 --micro-batch 32 --out bench_learner_variants.json   # one GPU

One learner rank (LearnerRank on a one-process group, the GPU recipe's learner settings:
micro-batches of at most 32 rows packed under 28,672 tokens, no checkpointing, no shared
prefix) trains in several variants, taking turns step by step so that all see the same machine,
on a new batch each round (new lengths, as in training), the same one for every variant:

  before     cuDNN's attention on, and each layer's weights gathered again for every
             micro-batch (FSDP2 resharding after each backward): the learner before both changes;
  no_cudnn   cuDNN's attention off (PyTorch's own kernels), still gathering per micro-batch;
  now        cuDNN's attention off, the gathered weights kept until the update (the default);
  compiled   (with ``--compile``) now, and each decoder layer compiled (``learner.compile``);
             its warm-up step compiles, and is reported apart (``warm_up_s``);
  released   now, after the caching allocator gave its blocks back to the GPU
             (``torch.cuda.empty_cache()`` before the step): what the learner does after each
             step beside a sleeping vLLM (``rollout.sleep_mode``), so each step allocates anew;
  masked     now, with the padding mask in every forward (``learner.padding_mask=always``);
             "now" leaves it out of right-padded micro-batches (the default, ``auto``, for
             eager layers); "compiled" passes it (``auto`` for compiled layers);
  compiled_unmasked  (with ``--compile``) compiled, without the padding mask in right-padded
             micro-batches (``learner.padding_mask=never``).

``--variants`` picks some of them (``now`` always runs: the ratios are over it).

``before`` is reproduced by switching the rank back (the cuDNN flag, and FSDP2's reshard
after backward); on a CPU the attention flag does nothing and only the gathering differs.
Printed and written (``--out``): each variant's median step time and peak GPU memory, the
ratios now / before and no_cudnn / before, and the largest difference between the variants'
teacher-forced logprobs before any update (bf16 attention kernels differ in rounding).
``--model random-qwen2.5-0.5b`` is Qwen2.5-0.5B's shape with random weights: it needs no
download, and a step's time does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from bench.bench_learner import _sync, build_model
from bench.bench_micro_batch_tokens import add_batch_args, grpo_batch_shape, one_rank, whole_shard

# variant -> (cuDNN attention on, gathered weights kept across micro-batches, layers compiled,
# learner.padding_mask)
VARIANTS = {"before": (True, False, False, "auto"), "no_cudnn": (False, False, False, "auto"),
            "now": (False, True, False, "auto"), "compiled": (False, True, True, "auto"),
            "released": (False, True, False, "auto"), "masked": (False, True, False, "always"),
            "compiled_unmasked": (False, True, True, "never")}
RELEASED = "released"  # "now" after torch.cuda.empty_cache()


# The ratios reported, each where both of its variants ran.
RATIOS = [("now", "before"), ("no_cudnn", "before"), ("now", "no_cudnn"), ("compiled", "now"),
          ("released", "now"), ("now", "masked"), ("compiled_unmasked", "compiled")]


def ratio(median: dict[str, float], a: str, b: str) -> float | None:
    return round(median[a] / median[b], 3) if a in median and b in median else None


def use_variant(rank, name: str, compiled_calls: list) -> None:
    """Switch a one-rank LearnerRank to ``name``'s behaviour, between steps. ``compiled_calls``:
    each decoder layer's compiled forward (``learner.compile``), swapped in or out."""
    cudnn, keep, compiled, padding_mask = VARIANTS[name]
    rank.cfg.learner.padding_mask = padding_mask
    rank.cfg.learner.compile = compiled  # what learner.padding_mask=auto decides on
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    rank._keep_gathered = keep
    rank.model.set_reshard_after_backward(not keep)
    for layer, call in compiled_calls:
        layer._compiled_call_impl = call if compiled else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_batch_args(ap, prompts=4, group=4, prompt_len=32, max_new=64, micro_batch=4, steps_of="variant")
    ap.add_argument("--out", default="", help="write the results here as JSON")
    ap.add_argument("--compile", action="store_true",
                    help="add the compiled variants: each decoder layer compiled (learner.compile)")
    ap.add_argument("--variants", default="", help="comma-separated variants to run (default: all)")
    args = ap.parse_args()
    variants = [k for k in VARIANTS if args.compile or not VARIANTS[k][2]]
    if args.variants:
        asked = {"now", *args.variants.split(",")}
        unknown = asked - set(variants)
        if unknown:
            ap.error(f"--variants: {sorted(unknown)} unknown or needs --compile; choose from {variants}")
        variants = [k for k in variants if k in asked]

    from transformers import AutoConfig

    budget = args.budget or args.micro_batch * (args.prompt_len + args.max_new)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.model, tmp)
        vocab = AutoConfig.from_pretrained(path).vocab_size
        batch = grpo_batch_shape(args.prompts, args.group, args.prompt_len, args.max_new, vocab)
        rank = one_rank(path, args.micro_batch, micro_batch_tokens=budget, compile=args.compile)
        # The layers learner.compile compiled (FSDP2 has since renamed their classes).
        compiled_calls = [(m, m._compiled_call_impl) for m in rank.model.modules()
                          if getattr(m, "_compiled_call_impl", None) is not None]
        shard, totals = whole_shard(batch)
        where = torch.cuda.get_device_name(0) if cuda else f"CPU x{os.cpu_count()}"
        lengths = batch.attention_mask.sum(dim=1).tolist()
        print(f"model {args.model}  {args.prompts} x {args.group} rows (mean row {statistics.mean(lengths):.0f} "
              f"tokens, longest {max(lengths)}), micro-batch {args.micro_batch} rows / {budget} tokens  {where}")
        logprobs = {}
        for name in variants:  # before any update: the same weights
            use_variant(rank, name, compiled_calls)
            logprobs[name] = rank.logprobs(shard, 1.0)
        warm_up = {}
        for name in variants:
            use_variant(rank, name, compiled_calls)
            t0 = time.perf_counter()
            rank.train_step(shard, totals)  # warm-up (compiling, for the compiled variant)
            warm_up[name] = round(time.perf_counter() - t0, 2)
        times, peaks = {k: [] for k in variants}, {k: 0.0 for k in variants}
        for r in range(args.steps):
            # A new batch each round, as in training: new lengths, so new micro-batch shapes (cuDNN
            # plans per shape); within a round every variant trains the same one.
            batch = grpo_batch_shape(args.prompts, args.group, args.prompt_len, args.max_new, vocab, seed=1 + r)
            shard, totals = whole_shard(batch)
            for name in variants:
                use_variant(rank, name, compiled_calls)
                _sync()
                if cuda and name == RELEASED:
                    torch.cuda.empty_cache()  # the state a sleep-mode learner leaves after its step
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                rank.train_step(shard, totals)
                _sync()
                times[name].append(time.perf_counter() - t0)
                if cuda:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
        rank.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "device": where, "rows": len(lengths), "micro_batch_tokens": budget,
              "warm_up_s": warm_up, "steps_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
              "median_step_s": {k: round(v, 4) for k, v in median.items()},
              "peak_allocated_gib": {k: round(v, 2) for k, v in peaks.items()} if cuda else None,
              **{f"{a}_over_{b}": ratio(median, a, b) for a, b in RATIOS},
              "max_logprob_diff_vs_now": {k: float((logprobs[k] - logprobs["now"]).abs().max())
                                          for k in variants if k != "now"}}
    for k in variants:
        peak = f", peak {peaks[k]:.2f} GiB allocated" if cuda else ""
        print(f"{k:17s} step {median[k]:.3f} s (median of {args.steps}{peak})")
    print("   ".join(f"{a} / {b} {result[f'{a}_over_{b}']}" for a, b in RATIOS if result[f"{a}_over_{b}"]),
          f"  max |logprob - now's| {result['max_logprob_diff_vs_now']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
