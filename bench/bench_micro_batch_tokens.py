"""Learner step time on GRPO-shaped uneven batches: fixed micro-batches vs micro-batches packed by tokens.

    python -m bench.bench_micro_batch_tokens                        # CPU: tiny Llama, 8 x 8 rows
    python -m bench.bench_micro_batch_tokens --model smollm2-135m-instruct --prompts 4 --max-new 128
    python -m bench.bench_micro_batch_tokens --model qwen2.5-coder-0.5b-instruct --prompts 32 --group 8 \\
        --prompt-len 150 --max-new 512 --micro-batch 32            # the GPU recipe's batch shape

A GRPO batch holds ``group`` completions of each prompt; completion lengths spread from a few
tokens to the generation limit (drawn here around 55% of it, a share cut at the limit).
Fixed micro-batches (``learner.micro_batch_size`` rows in batch order) are each padded to
their longest row; ``learner.micro_batch_tokens`` (rl/learner/batching.py) sorts rows by
length and packs them under a token budget, by default ``micro_batch x (prompt + max_new)``:
the largest shape a fixed micro-batch can reach.

One learner rank (LearnerRank on a one-process gloo/NCCL group, the recipe's learner
settings: no checkpointing, no shared prefix) runs both plans on the same model, alternating
steps, so that both see the same machine load. Printed, all from this one run: the padded
positions each plan computes, the median step time of each, the ratio packed / fixed, and
the largest difference between the two plans' teacher-forced logprobs (the same function).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from bench.bench_learner import LORA, _sync, build_model
from rl.cluster import LOOPBACK, free_port


def grpo_batch_shape(prompts: int, group: int, prompt_len: int, max_new: int, vocab: int, seed: int = 0):
    """A TrainBatch of ``prompts`` x ``group`` rows: each group shares a prompt, completion lengths uneven."""
    from rl.learner.batch import pad_sequences
    from rl.learner.group import TrainBatch

    g = torch.Generator().manual_seed(seed)
    prompt_ids, responses = [], []
    for _ in range(prompts):
        prompt = torch.randint(0, vocab, (int(torch.randint(prompt_len // 2, prompt_len + 1, (1,), generator=g)),),
                               generator=g).tolist()
        for _ in range(group):
            n = int((0.55 + 0.3 * torch.randn(1, generator=g)).clamp(0.02, 1.0) * max_new)
            prompt_ids.append(prompt)
            responses.append(torch.randint(0, vocab, (max(n, 1),), generator=g).tolist())
    lps = [[-1.0] * len(r) for r in responses]
    ids, attn, resp, rollout_lp = pad_sequences(prompt_ids, responses, 0, lps)
    return TrainBatch(ids, attn, resp, torch.randn(len(responses), generator=g), rollout_lp, max_tokens=max_new)


def add_batch_args(ap: argparse.ArgumentParser, prompts: int, group: int, prompt_len: int, max_new: int,
                   micro_batch: int, steps_of: str) -> None:
    """The model, the GRPO batch's shape and the micro-batch plan: the learner benchmarks' arguments."""
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--group", type=int, default=group)
    ap.add_argument("--prompt-len", type=int, default=prompt_len)
    ap.add_argument("--max-new", type=int, default=max_new)
    ap.add_argument("--micro-batch", type=int, default=micro_batch)
    ap.add_argument("--budget", type=int, default=0, help="micro_batch_tokens; 0: micro-batch x (prompt-len + max-new)")
    ap.add_argument("--steps", type=int, default=4, help=f"timed steps of each {steps_of} (after one warm-up each)")


def one_rank(path: str, micro_batch: int, **learner):
    """A LearnerRank on a one-process group with the GPU recipe's learner settings (no
    checkpointing, no shared prefix) and ``learner`` on top."""
    from rl.config import config_from_dict
    from rl.learner.rank import LearnerRank

    cfg = config_from_dict({"model": {"name": path}, "rollout": {"temperature": 1.0}, "trainer": {"steps": 1000},
                            "learner": {"micro_batch_size": micro_batch, "lr": 1e-5, "shared_prefix": False,
                                        "gradient_checkpointing": False, **learner}})
    rank = LearnerRank(0, 1)
    rank.setup(cfg, path, LORA, None, LOOPBACK, free_port())
    return rank


def whole_shard(batch) -> tuple[dict, dict]:
    """The batch as one rank's shard, and its totals (the loss's normalisers)."""
    from rl.learner.group import split_batch

    return split_batch(batch, 1)[0], {"num_sequences": batch.input_ids.shape[0],
                                      "num_tokens": float(batch.response_mask.sum()), "max_tokens": batch.max_tokens}


def padded_positions(plan: list[list[int]], lengths: list[int]) -> int:
    return sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_batch_args(ap, prompts=8, group=8, prompt_len=64, max_new=256, micro_batch=16, steps_of="plan")
    args = ap.parse_args()
    budget = args.budget or args.micro_batch * (args.prompt_len + args.max_new)

    from transformers import AutoConfig

    from rl.learner.batching import plan_micro_batches

    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.model, tmp)
        batch = grpo_batch_shape(args.prompts, args.group, args.prompt_len, args.max_new,
                                 AutoConfig.from_pretrained(path).vocab_size)
        rank = one_rank(path, args.micro_batch)
        shard, totals = whole_shard(batch)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        plans = {"fixed": 0, "packed": budget}
        where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
        print(f"model {args.model}  {args.prompts} x {args.group} rows, prompt <= {args.prompt_len}, completion "
              f"<= {args.max_new} (mean row {statistics.mean(lengths):.0f}, longest {max(lengths)})  {where}")

        logprobs, times = {}, {k: [] for k in plans}
        for name, tokens in plans.items():
            rank.cfg.learner.micro_batch_tokens = tokens
            plan = plan_micro_batches(shard, args.micro_batch, tokens)
            print(f"{name:7s} micro_batch_tokens={tokens:<6d} {len(plan)} micro-batches, "
                  f"{padded_positions(plan, lengths)} padded positions (real tokens {sum(lengths)})")
            logprobs[name] = rank.logprobs(shard, 1.0)  # both before any update: the same weights
        for name, tokens in plans.items():
            rank.cfg.learner.micro_batch_tokens = tokens
            rank.train_step(shard, totals)  # warm-up
        for _ in range(args.steps):
            for name, tokens in plans.items():
                rank.cfg.learner.micro_batch_tokens = tokens
                _sync()
                t0 = time.perf_counter()
                rank.train_step(shard, totals)
                _sync()
                times[name].append(time.perf_counter() - t0)
        rank.shutdown()
    fixed, packed = statistics.median(times["fixed"]), statistics.median(times["packed"])
    diff = float((logprobs["packed"] - logprobs["fixed"]).abs().max())
    print(f"fixed   step {fixed:.3f} s (median of {args.steps})")
    print(f"packed  step {packed:.3f} s (median of {args.steps})")
    print(f"ratio packed / fixed: {packed / fixed:.3f}   max |logprob packed - fixed|: {diff:.2e}")


if __name__ == "__main__":
    main()
