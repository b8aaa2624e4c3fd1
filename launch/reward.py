"""`placerl reward`: try reward functions on a file of completions.

    placerl reward --data completions.jsonl --fn gsm8k_flexible --fn length_penalty,weight=0.1,unit=chars

Each ``--fn`` is ``NAME[,weight=W][,KEY=VALUE...]``: a registry name, ``package.module:function``
or ``path/to/file.py:function``, its weight and its kwargs (values read as YAML scalars).
Without ``--fn`` the rewards come from ``--config``'s ``reward`` section, else
gsm8k_strict + gsm8k_flexible. The data file is JSON lines (or one JSON list): each row has
``completion`` (text or chat messages) and optionally ``prompt``; every other field is a
dataset column (``gold``, ``answer``, ``question``, ``completion_ids``, ...).

It prints each function's mean, None share, errors and timeouts, the first rows' scores,
and, when rows carry ``gold`` or ``answer``, every row where strict and flexible GSM8K
grading disagree with the answer each of them read. Left out: generating completions (use
``placerl eval`` for a model).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml


def parse_fn(spec: str) -> dict:
    """``name,weight=0.5,unit=chars`` -> ``{"name": ..., "weight": 0.5, "kwargs": {"unit": "chars"}}``."""
    name, *pairs = [p.strip() for p in spec.split(",")]
    out: dict = {"name": name, "weight": 1.0}
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"--fn {spec!r}: {pair!r} is not KEY=VALUE; write e.g. --fn {name},weight=0.5")
        parsed = yaml.safe_load(value)
        if key == "weight":
            out["weight"] = parsed
        else:
            kwargs[key] = parsed
    if kwargs:
        out["kwargs"] = kwargs
    return out


def read_rows(path: str) -> list[dict]:
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for k, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {k} is not JSON ({e.msg}); write one JSON object per line") from e
    for k, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "completion" not in row:
            raise ValueError(f"{path} row {k} has no 'completion' field; each row needs completion "
                             "(and optionally prompt, gold, answer, ...)")
    return rows


def _short(text, n: int = 70) -> str:
    from rewards.gsm8k import completion_text

    s = " ".join(completion_text(text).split())
    return s if len(s) <= n else s[:n - 3] + "..."


def _fmt(v) -> str:
    return "None" if v is None else f"{v:.3g}"


def disagreements(rows: list[dict]) -> list[tuple]:
    """Rows where strict and flexible GSM8K grading differ: (index, strict, flexible, s_ans, f_ans, gold)."""
    from rewards.gsm8k import (completion_text, flexible_answer, gold_of, gsm8k_flexible, gsm8k_strict,
                               strict_answer)

    if not any("gold" in r or "answer" in r for r in rows):
        return []
    comps = [r["completion"] for r in rows]
    gold = [r.get("gold") for r in rows] if any("gold" in r for r in rows) else None
    answer = [r.get("answer") for r in rows]
    strict = gsm8k_strict(None, comps, gold=gold, answer=answer)
    flex = gsm8k_flexible(None, comps, gold=gold, answer=answer)
    return [(i, s, f, strict_answer(completion_text(c)), flexible_answer(completion_text(c)),
             gold_of(i, gold, answer, "reward"))
            for i, (c, s, f) in enumerate(zip(comps, strict, flex)) if s != f]


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="placerl reward", description="Try reward functions on a file of completions.")
    ap.add_argument("--data", required=True, help="JSON lines with completion (+ prompt, gold, answer, ...)")
    ap.add_argument("--fn", action="append", default=[], help="NAME[,weight=W][,KEY=VALUE...]; repeatable")
    ap.add_argument("--config", help="a YAML recipe whose reward section is used when no --fn is given")
    ap.add_argument("--executor", choices=["thread", "process"], default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per call")
    ap.add_argument("--show", type=int, default=10, help="rows to print with their scores")
    ap.add_argument("--out", help="write per-row scores here as JSON lines")
    return ap.parse_args(argv)


def make_runner(args):
    """The RewardRunner that ``--fn`` (else ``--config``'s reward section, else both GSM8K graders) names."""
    from rewards import RewardRunner

    if args.config:
        from rl.config import load_config

        cfg = load_config(args.config).reward
        functions, timeout, workers, executor = cfg.functions, cfg.timeout_s, cfg.workers, cfg.executor
    else:
        functions, timeout, workers, executor = [], 10.0, 2, "thread"
    if args.fn:
        functions = [parse_fn(s) for s in args.fn]
    functions = functions or [{"name": "gsm8k_strict"}, {"name": "gsm8k_flexible"}]
    return RewardRunner(functions, timeout_s=args.timeout or timeout, workers=args.workers or workers,
                        executor=args.executor or executor, where="--fn" if args.fn else "reward.functions")


def print_scores(runner, result, rows: list[dict], completions: list[str], seconds: float, show: int) -> None:
    """The per-function summary table, then the first ``show`` rows with their scores."""
    print(f"scored {len(rows)} completions with {len(runner.labels)} functions in {seconds:.2f} s "
          f"({runner.executor}, {runner.workers} workers)\n")
    print(f"{'function':<28}{'weight':>8}{'mean':>9}{'none':>7}{'errors':>8}{'timeouts':>10}")
    m = result.metrics()
    for lab in runner.labels:
        print(f"{lab[:27]:<28}{runner.weights[lab]:>8.3g}{m[f'reward/{lab}/mean']:>9.3f}"
              f"{m[f'reward/{lab}/none_frac']:>7.0%}{result.errors[lab]:>8}{result.timeouts[lab]:>10}")
    print(f"{'total (weighted sum)':<28}{'':>8}{m['reward/total/mean']:>9.3f}\n")
    if show > 0 and rows:
        print("  #   total  " + "  ".join(lab[:12] for lab in runner.labels) + "  completion")
        for i in range(min(show, len(rows))):
            cells = "  ".join(f"{_fmt(result.per_function[lab][i]):>{min(12, len(lab))}}" for lab in runner.labels)
            print(f"{i:>3} {result.total[i]:>7.3g}  {cells}  {_short(completions[i])}")
        print()


def print_disagreements(rows: list[dict], completions: list[str]) -> None:
    diff = disagreements(rows)
    if diff:
        print(f"strict and flexible GSM8K grading disagree on {len(diff)} of {len(rows)} rows:")
        for i, s, f, sa, fa, gold in diff:
            print(f"{i:>3} strict={_fmt(s)} (read {sa!r}) flexible={_fmt(f)} (read {fa!r}) gold={gold}  "
                  f"{_short(completions[i], 50)}")
    elif any("gold" in r or "answer" in r for r in rows):
        print("strict and flexible GSM8K grading agree on every row")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from rewards import RewardError

    try:
        rows = read_rows(args.data)
        runner = make_runner(args)
    except (OSError, ValueError) as e:
        print(f"placerl reward: {e}", file=sys.stderr)
        return 2
    names = sorted({k for r in rows for k in r} - {"prompt", "completion"})
    columns = {k: [r.get(k) for r in rows] for k in names}
    prompts = [r.get("prompt", "") for r in rows]
    completions = [r["completion"] for r in rows]
    try:
        start = time.perf_counter()
        result = runner.score(prompts, completions, columns)
        seconds = time.perf_counter() - start
    except RewardError as e:
        print(f"placerl reward: {e}", file=sys.stderr)
        return 2
    finally:
        runner.close()
    print_scores(runner, result, rows, completions, seconds, args.show)
    print_disagreements(rows, completions)
    if args.out:
        with open(args.out, "w") as fh:
            for i in range(len(rows)):
                fh.write(json.dumps({"total": None if math.isnan(result.total[i]) else result.total[i],
                                     **{lab: result.per_function[lab][i] for lab in runner.labels}}) + "\n")
    return 0
