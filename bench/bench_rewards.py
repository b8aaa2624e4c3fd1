"""Reward throughput: score 10,000 GSM8K completions with the thread and the process pool.

    python bench/bench_rewards.py [--data DIR_OR_JSONL] [--n 10000] [--batch 512] [--workers 2]
                                  [--step-seconds S]

Completions are built from GSM8K gold solutions (``$PLACERL_GSM8K_DIR`` or ``--data``), in
groups of ``--group`` per question as GRPO samples them, mixing right and wrong answers
and the formats models write: ``#### N``, "The answer is N", ``\\boxed{N}``, a last number,
``$1,200``, a ``<think>`` block, truncated reasoning, markdown headings, empty output. They
are scored in training-sized batches with the default reward mix (strict and flexible
GSM8K, ``#### `` format, think format, overlong penalty on token ids) and the figure is
completions per second, per executor, after the pool has started (start-up is printed
apart). ``--step-seconds`` (a training step's wall time from the system benchmark) turns
the time of one batch into a fraction of a step; the goal is under 5%.

``--fresh-steps K`` measures instead what a run's first K reward phases cost in a fresh
process (the default reward of the GPU recipe, ``gsm8k_flexible``, thread executor), with
``--latex-share`` of the answers written in LaTeX that math-verify must parse (from the
second step on): once as runs prepare the grader (math-verify warmed up then) and once
with the warm-up left out, when its import and first parse fell inside a step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards import RewardRunner  # noqa: E402
from rewards import gsm8k  # noqa: E402

FUNCTIONS = [
    {"name": "gsm8k_strict", "weight": 0.0},
    {"name": "gsm8k_flexible", "weight": 1.0},
    {"name": "format_hash", "weight": 0.1},
    {"name": "think_format", "weight": 0.0},
    {"name": "overlong_penalty", "weight": 0.1, "kwargs": {"max_len": 256, "cache": 64}},
]


def load_rows(data: str | None) -> list[dict]:
    src = Path(data or os.environ.get("PLACERL_GSM8K_DIR", ""))
    files = [src] if src.is_file() else [src / "train.jsonl", src / "test.jsonl"]
    files = [f for f in files if f.is_file()]
    if not files:
        raise SystemExit(f"bench_rewards: no GSM8K jsonl at {str(src)!r}; pass --data DIR or set PLACERL_GSM8K_DIR")
    rows = []
    for f in files:
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def _wrong(gold: str, rng: random.Random) -> str:
    g = float(gold)
    w = g + rng.choice([1, -1, 10, 2]) if rng.random() < 0.7 else g * 2 + 1
    return str(int(w)) if w == int(w) else f"{w:.2f}"


ANSWER_FORMATS = {  # styles 0-5 of make_completion: a worked solution, then its answer written one way
    0: "{body}\n#### {ans}",
    1: "{body}\nThe answer is {ans}.",
    2: "{body}\nSo the final result is $\\boxed{{{ans}}}$.",
    3: "{body}\nSo in total that is {ans}. I hope this helps!",
    4: "{body}\nShe pays ${pretty} in total.\n#### ${pretty}",
    5: "<think>\n{body}\n</think>\nThe answer is {ans}.\n#### {ans}",
}


def make_completion(row: dict, rng: random.Random) -> str:
    """One realistic completion for a GSM8K row: a worked solution in one of several answer formats."""
    body, gold = row["answer"].rsplit("####", 1)
    body = re.sub(r"<<[^>]*>>", "", body).strip()  # models do not write GSM8K's calculator notes
    gold = gold.strip().replace(",", "")
    ans = gold if rng.random() < 0.5 else _wrong(gold, rng)
    pretty = f"{int(float(ans)):,}" if re.fullmatch(r"-?\d+", ans) else ans
    style = rng.randrange(10)
    if style in ANSWER_FORMATS:
        return ANSWER_FORMATS[style].format(body=body, ans=ans, pretty=pretty)
    if style == 6:
        return body[: rng.randrange(1, max(2, len(body)))]  # cut at the length limit: no answer
    if style == 7:
        steps = "\n".join(f"#### Step {i + 1}\n{line}" for i, line in enumerate(body.split("\n")))
        return f"{steps}\n#### Final Answer: {ans}"
    if style == 8:
        return "" if rng.random() < 0.5 else "I am not sure how to solve this."
    return f"{body} Then we double check: {ans}, and 2 more checks."


def build(rows: list[dict], n: int, group: int, seed: int) -> tuple[list, list, dict, list]:
    rng = random.Random(seed)
    picked = rng.sample(rows, min(len(rows), -(-n // group)))
    prompts, completions, cols = [], [], {"question": [], "answer": [], "gold": []}
    for row in picked:
        for _ in range(group):
            if len(completions) == n:
                break
            prompts.append(row["question"])
            completions.append(make_completion(row, rng))
            cols["question"].append(row["question"])
            cols["answer"].append(row["answer"])
            cols["gold"].append(row["answer"].rsplit("####", 1)[1].strip().replace(",", ""))
    ids = [[0] * (len(c) // 4) for c in completions]  # about four characters a token
    return prompts, completions, cols, ids


def run(executor: str, workers: int, batch: int, data: tuple, timeout_s: float) -> dict:
    prompts, completions, cols, ids = data
    gsm8k._parse_candidate.cache_clear()  # each executor starts with cold caches, as a fresh run would
    gsm8k._parse_gold.cache_clear()
    t0 = time.perf_counter()
    runner = RewardRunner(FUNCTIONS, timeout_s=timeout_s, workers=workers, executor=executor)
    runner.score(prompts[:8], completions[:8], {k: v[:8] for k, v in cols.items()}, ids[:8])  # start-up
    startup = time.perf_counter() - t0
    batch_times, fn_seconds, errors, timeouts, means, totals = [], {}, 0, 0, [], []
    start = time.perf_counter()
    for a in range(0, len(completions), batch):
        b = min(a + batch, len(completions))
        t = time.perf_counter()
        res = runner.score(prompts[a:b], completions[a:b], {k: v[a:b] for k, v in cols.items()}, ids[a:b])
        batch_times.append((time.perf_counter() - t) * batch / (b - a))
        for k, v in res.seconds.items():
            fn_seconds[k] = fn_seconds.get(k, 0.0) + v
        errors += sum(res.errors.values())
        timeouts += sum(res.timeouts.values())
        means.append(res.metrics()["reward/gsm8k_flexible/mean"])
        totals += res.total
    total = time.perf_counter() - start
    runner.close()
    return {"executor": executor, "startup_s": startup, "total_s": total, "per_s": len(completions) / total,
            "batch_s": statistics.median(batch_times), "fn_seconds": fn_seconds, "errors": errors,
            "timeouts": timeouts, "flexible_mean": statistics.fmean(means), "totals": totals}


def fresh_steps(args) -> None:
    """Each way in its own fresh process (math-verify's import is once per process)."""
    import subprocess

    for warm in ("warm", "lazy"):
        cmd = [sys.executable, __file__, "--fresh-child", warm, "--fresh-steps", str(args.fresh_steps),
               "--batch", str(args.batch), "--group", str(args.group), "--latex-share", str(args.latex_share),
               "--workers", str(args.workers), "--seed", str(args.seed)] + (["--data", args.data] if args.data else [])
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"{warm:<5} runner start {r['start_s']:.3f} s; reward phase per step (s): "
              + ", ".join(f"{x:.3f}" for x in r["steps"]))


def fresh_child(args) -> None:
    rows = load_rows(args.data)
    t = time.perf_counter()
    if args.fresh_child == "lazy":
        gsm8k.gsm8k_flexible.warm_up = None
    runner = RewardRunner([{"name": "gsm8k_flexible"}], timeout_s=args.timeout, workers=args.workers,
                          group_size=args.group)
    start, steps, rng = time.perf_counter() - t, [], random.Random(args.seed)
    for step in range(args.fresh_steps):
        prompts, completions, cols, ids = build(rows, args.batch, args.group, args.seed + step)
        if step:  # e.g. "$\\boxed{\\frac{36}{2}}$": no plain number, math-verify parses it
            completions = [c + f"\n$\\boxed{{\\frac{{{2 * int(float(g))}}}{{2}}}}$"
                           if rng.random() < args.latex_share else c for c, g in zip(completions, cols["gold"])]
        t = time.perf_counter()
        runner.score(prompts, completions, cols, ids)
        steps.append(time.perf_counter() - t)
    runner.close()
    print(json.dumps({"start_s": start, "steps": steps}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="GSM8K folder (train.jsonl/test.jsonl) or one jsonl; default $PLACERL_GSM8K_DIR")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=512, help="completions per training step")
    ap.add_argument("--group", type=int, default=8, help="completions per question (GRPO group size)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--executors", default="thread,process")
    ap.add_argument("--step-seconds", type=float, default=None, help="one training step's wall time (system bench)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh-steps", type=int, default=0, help="time a fresh run's first K reward phases instead")
    ap.add_argument("--latex-share", type=float, default=0.1, help="with --fresh-steps: answers written in LaTeX")
    ap.add_argument("--fresh-child", choices=["warm", "lazy"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fresh_child:
        fresh_child(args)
        return 0
    if args.fresh_steps:
        fresh_steps(args)
        return 0

    data = build(load_rows(args.data), args.n, args.group, args.seed)
    strict = [gsm8k.strict_answer(c) is not None for c in data[1]]
    print(f"{len(data[1])} completions ({len(data[1]) // args.group} questions x {args.group}), "
          f"mean {statistics.fmean(len(c) for c in data[1]):.0f} chars, {sum(strict) / len(strict):.0%} with a "
          f"'####' answer; batches of {args.batch}; {args.workers} workers; {os.cpu_count()} CPU cores")
    results = [run(e, args.workers, args.batch, data, args.timeout) for e in args.executors.split(",")]
    print(f"\n{'executor':<10}{'compl/s':>10}{'total s':>9}{'start s':>9}{'s/batch':>9}{'flex acc':>10}"
          f"{'errors':>8}{'timeouts':>10}")
    for r in results:
        print(f"{r['executor']:<10}{r['per_s']:>10.0f}{r['total_s']:>9.2f}{r['startup_s']:>9.2f}"
              f"{r['batch_s']:>9.3f}{r['flexible_mean']:>10.3f}{r['errors']:>8}{r['timeouts']:>10}")
    for r in results:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["fn_seconds"].items(), key=lambda kv: -kv[1]))
        print(f"  {r['executor']} call seconds by function: {parts}")
    if len(results) == 2:
        same = results[0]["totals"] == results[1]["totals"]
        print(f"\nprocess / thread throughput: {results[1]['per_s'] / results[0]['per_s']:.2f}x; "
              f"identical scores from both executors: {'yes' if same else 'NO'}")
    if args.step_seconds:
        print(f"\nreward time per step of {args.batch} completions, as a fraction of a {args.step_seconds:g} s step "
              "(goal < 5%):")
        for r in results:
            frac = r["batch_s"] / args.step_seconds
            print(f"  {r['executor']:<8} {r['batch_s']:.3f} s = {frac:.2%}  {'OK' if frac < 0.05 else 'OVER GOAL'}")
    else:
        print("\n(pass --step-seconds S from the system benchmark to see reward time as a fraction of a step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
