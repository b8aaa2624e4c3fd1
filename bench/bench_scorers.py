"""Time every placement scorer on one model and probe, and as a fraction of a training run.

    python bench/bench_scorers.py [--model smollm2-135m-instruct] [--run-seconds S]

Each scorer runs once on the same probe (32 GSM8K training samples by default, rendered
with the chat template); the wall time includes the probe's forward/backward passes.
``--run-seconds`` is the wall time of a 100-step GRPO run with the same model (from the
system benchmark); the script then prints each scorer's time as a fraction of it.
CPU time and the machine's load average are printed too: on a shared machine wall time
alone overstates the cost.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_BUDGETS = {"uniform": "", "random": "", "page": "", "plop": "", "bmask": "fraction=0.05",
                   "bmask_random": "fraction=0.05", "gradrank": ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=os.environ.get("PLACERL_GSM8K_DIR", ""), help="GSM8K folder or jsonl")
    ap.add_argument("--scorers", default=",".join(DEFAULT_BUDGETS))
    ap.add_argument("--probe-samples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--device", default="", help="cpu or cuda (default: cuda when there is a GPU)")
    ap.add_argument("--run-seconds", type=float, default=0.0, help="wall time of a 100-step GRPO run, same model")
    args = ap.parse_args(argv)

    import torch

    from launch.score import read_jsonl, render_rows
    from placement import Budget, ScorerSettings, build_probe, score_model
    from rl.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(path, "float32").to(device)
    probe = build_probe(tok, render_rows(read_jsonl(args.data), tok, args.probe_samples, 0), "sft", args.max_tokens)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"probe {probe.num_samples} samples, {probe.num_tokens} tokens; device {device}, torch threads {torch.get_num_threads()}")
    header = f"{'scorer':<14}{'budget':<16}{'wall s':>9}{'cpu s':>9}{'load avg':>10}"
    if args.run_seconds:
        header += f"{'% of run':>10}"
    print(header)
    for name in [s for s in args.scorers.split(",") if s]:
        budget = DEFAULT_BUDGETS.get(name, "")
        cpu0 = time.process_time()
        plan = score_model(name, model, probe, Budget.parse(budget), ScorerSettings())
        cpu = time.process_time() - cpu0
        line = f"{name:<14}{budget or '-':<16}{plan.seconds:>9.2f}{cpu:>9.2f}{os.getloadavg()[0]:>10.2f}"
        if args.run_seconds:
            line += f"{100 * plan.seconds / args.run_seconds:>9.3f}%"
        print(line, flush=True)
    if args.run_seconds:
        print(f"run: {args.run_seconds:.1f} s for 100 GRPO steps; goal for bmask and page: under 0.5%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
