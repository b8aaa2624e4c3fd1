"""The driver's scoring phase of one GRPO step (the step's ``time/reward_s``), part by part.

    python -m bench.bench_step_scoring                      # the GPU recipe's step: 32 prompts x 8
    python -m bench.bench_step_scoring --prompts 8 --rounds 3

``rl/step_scoring.py`` ``score_groups`` turns a step's completions into the learner's batch:
the rewards (the recipe's reward functions, through the RewardRunner), the group advantages,
and the padded tensors (``rl/learner/batch.py`` ``grpo_batch``). Colocated with sleep mode it
runs while the rollout workers fall asleep, and the learner waits for it. The batch here is
GSM8K training questions with made-up prompt token ids (150 each) and completions of 20-512
tokens, half of them the gold solution and half a wrong answer, as a step samples them.

Parts, medians over ``--rounds`` rounds (after one warm-up), all in this one process:

  score_groups   the whole phase;
  rewards        the RewardRunner's call alone;
  padding        ``pad_sequences`` as it is (flat arrays, one pass);
  padding_rows   the padding row by row, as it was: the baseline of the ratio.
"""
from __future__ import annotations

import argparse
import random

import torch

from bench.in_turns import medians_ms, report, time_in_turns
from rl.config import load_config
from rl.data import load_task
from rl.learner.batch import pad_sequences
from rl.rollout.engine import Completion
from rl.step_scoring import score_groups

LENGTHS = (20, 80, 150, 200, 300, 512)


def pad_rows_one_by_one(prompts, responses, pad_id, response_logprobs):
    """The padding before it was vectorised: a tensor per row (the baseline)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    B, T = len(prompts), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    resp = torch.zeros((B, T), dtype=torch.float32)
    lps = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p):n] = 1.0
        lps[i, len(p):n] = torch.tensor(response_logprobs[i], dtype=torch.float32)
    return ids, attn, resp, lps


def step_batch(cfg, prompts: int, group: int, seed: int = 0) -> tuple[list[dict], list[list[Completion]]]:
    rng = random.Random(seed)
    rows = load_task(cfg.data, "train")[:prompts]
    for r in rows:
        r["prompt"], r["prompt_ids"] = r["question"], [rng.randrange(150_000) for _ in range(150)]

    def completion(row: dict) -> Completion:
        n = rng.choice(LENGTHS)
        text = row["answer"] if rng.random() < 0.5 else "The answer is 42."
        return Completion([rng.randrange(150_000) for _ in range(n)], [-rng.random() for _ in range(n)], text,
                          "length" if n == max(LENGTHS) else "stop")

    return rows, [[completion(r) for _ in range(group)] for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from rewards import RewardRunner

    cfg = load_config(args.recipe, [f"rollout.group_size={args.group}"])
    rows, groups = step_batch(cfg, args.prompts, args.group)
    flat_rows = [r for r in rows for _ in range(args.group)]
    completions = [c for g in groups for c in g]
    prompt_ids = [r["prompt_ids"] for r in flat_rows]
    padding_args = (prompt_ids, [c.token_ids for c in completions], 0, [c.logprobs for c in completions])
    with RewardRunner.from_config(cfg.reward, group_size=args.group) as runner:
        parts = {
            "score_groups": lambda: score_groups(cfg, runner, 0, rows, groups),
            "rewards": lambda: runner.score([r["prompt"] for r in flat_rows], [c.text for c in completions],
                                            {k: [r[k] for r in flat_rows] for k in ("question", "answer", "gold")},
                                            completion_ids=[c.token_ids for c in completions]),
            "padding": lambda: pad_sequences(*padding_args),
            "padding_rows": lambda: pad_rows_one_by_one(*padding_args),
        }
        now, before = parts["padding"](), parts["padding_rows"]()
        assert all(torch.equal(a, b) for a, b in zip(now, before)), "the two paddings differ"
        seconds = time_in_turns(parts, args.rounds)
    medians = medians_ms(seconds, digits=2)
    report({"rows": len(completions), "tokens": int(now[1].sum()), "rounds": args.rounds, "medians": medians,
            "padding_over_padding_rows": round(medians["padding_ms"] / medians["padding_rows_ms"], 3)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
