"""`placerl score`: score a model on a GSM8K probe and write a PlacementPlan with its report.

    placerl score --model smollm2-135m-instruct --data train.jsonl --scorer page [--budget fraction=0.1]

writes ``plan.json`` (give it to training as ``placement.plan=...``), ``<name>.md`` and
``<name>.png`` (scores by layer and module type; name defaults to the scorer) into
``--out``. Probe rows are drawn (seeded) from a GSM8K-style jsonl (``question``,
``answer``) and rendered with the tokenizer's chat template and the training prompts'
instruction.

Left out: GRPO probes (they need rollouts; training builds them) and remote data.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from core.lora import DEFAULT_TARGET_MODULES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="placerl score", description="score a model and write a LoRA PlacementPlan")
    p.add_argument("--model", default="smollm2-135m-instruct", help="builtin alias, checkpoint folder or hub id")
    p.add_argument("--data", default=os.environ.get("PLACERL_GSM8K_DIR", ""),
                   help="GSM8K jsonl file, or a folder holding train.jsonl (default: $PLACERL_GSM8K_DIR)")
    p.add_argument("--scorer", default="page")
    p.add_argument("--budget", default="", help="'rank=N', 'params=N', 'fraction=F'; empty: the uniform baseline")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--alpha-policy", default="fixed", choices=["fixed", "proportional", "rslora"])
    p.add_argument("--target-modules", default=",".join(DEFAULT_TARGET_MODULES))
    p.add_argument("--top-k", type=int, default=1, help="modules (page, random) or types (plop) kept")
    p.add_argument("--probe-samples", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=512, help="prompt + answer tokens per probe sample")
    p.add_argument("--steps", type=int, default=4, help="probe steps for bmask and gradrank")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the forward/backward passes (scores accumulate in float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder (default runs/placement/<model>-<scorer>)")
    p.add_argument("--name", default="", help="file name of the report and heatmap (default: the scorer)")
    p.add_argument("--title", default="", help="report title")
    return p


def read_jsonl(data: str) -> list[dict]:
    path = Path(data)
    if path.is_dir():
        path = path / "train.jsonl"
    if not data or not path.is_file():
        raise FileNotFoundError(f"--data={data!r} is not a jsonl file or a folder with train.jsonl; "
                                "point it at GSM8K's train.jsonl or set PLACERL_GSM8K_DIR")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def render_rows(rows: list[dict], tokenizer, count: int, seed: int) -> list[dict]:
    """``count`` rows drawn with ``seed``, as {"prompt": chat-rendered text, "answer": gold solution}."""
    from rl.config import DataConfig

    instruction = DataConfig().instruction
    picked = random.Random(seed).sample(range(len(rows)), min(count, len(rows)))
    out = []
    for i in picked:
        row = rows[i]
        if "question" not in row or "answer" not in row:
            raise ValueError(f"data row {i} has no 'question'/'answer'; the probe needs GSM8K-style rows")
        messages = [{"role": "user", "content": f"{instruction}\n\n{row['question']}"}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append({"prompt": prompt, "answer": row["answer"]})
    return out


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        from placement.budget import Budget
        from placement.probe import build_probe
        from placement.report import write_report
        from placement.scorers import get_scorer
        from placement.scoring import load_scoring_model, score_model
        from placement.settings import ScorerSettings
        from rl.models import load_tokenizer, resolve_model

        budget = Budget.parse(args.budget)
        settings = ScorerSettings(rank=args.rank, alpha=args.alpha, alpha_policy=args.alpha_policy,
                                  target_modules=tuple(t for t in args.target_modules.split(",") if t),
                                  top_k=args.top_k, seed=args.seed, options={"steps": args.steps})
        scorer = get_scorer(args.scorer)
        path = resolve_model(args.model)
        tokenizer = load_tokenizer(path)
        model = load_scoring_model(path, args.dtype)
        probe = None
        if scorer.needs_probe:
            rows = render_rows(read_jsonl(args.data), tokenizer, args.probe_samples, args.seed)
            probe = build_probe(tokenizer, rows, "sft", args.max_tokens)
        plan = score_model(args.scorer, model, probe, budget, settings, model_name=args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"placerl score: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / "placement" / f"{Path(args.model).name}-{args.scorer}")
    plan.save(out / "plan.json")
    notes = []
    if probe is not None:
        notes = [f"Probe: {probe.num_samples} samples from {Path(args.data).name or 'data'} "
                 f"(seed {args.seed}), {probe.num_tokens:,} tokens, mean cross-entropy over the gold solution."]
    paths = write_report(plan, out, stem=args.name or args.scorer, title=args.title, notes=notes)
    print(f"placerl score: {len(plan.adapters)} adapters, {plan.trainable_parameters():,} trainable parameters "
          f"({100 * plan.trainable_parameters() / plan.baseline_params:.3f}% of uniform), "
          f"{plan.seconds:.1f} s; wrote {out / 'plan.json'}, {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
