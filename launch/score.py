"""`placerl score`: score a model on a GSM8K probe and write a PlacementPlan with its report.

    placerl score --model smollm2-135m-instruct --data train.jsonl --scorer page [--budget fraction=0.1]

writes ``plan.json`` (give it to training as ``placement.plan=...``), ``<name>.md`` and
``<name>.png`` (scores by layer and module type; name defaults to the scorer) into
``--out``. Probe rows are drawn (seeded) from a GSM8K-style jsonl (``question``,
``answer``) and rendered with the tokenizer's chat template and the training prompts'
instruction.

The probe's regime is ``--probe-source``: ``auto`` (the scorer's own: grpo for bmask and
gradrank, sft otherwise), ``sft`` (cross-entropy on the gold solutions) or ``grpo`` (one
rollout and reward pass of the model, with the sampling, group size and rewards of
``--config``'s recipe, on ``--probe-engine``; see rl/placement_probe.py).

Left out: remote data.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--probe-source", default="auto", choices=["auto", "sft", "grpo"],
                   help="the probe's loss: the scorer's own regime (auto), gold solutions (sft) or rollouts (grpo)")
    p.add_argument("--probe-engine", default="hf", choices=["hf", "vllm"], help="rollout engine of a grpo probe")
    p.add_argument("--config", default="", help="recipe whose rollout, reward and algorithm sections a grpo probe uses")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder (default runs/placement/<model>-<scorer>)")
    p.add_argument("--name", default="", help="file name of the report and heatmap (default: the scorer)")
    p.add_argument("--title", default="", help="report title")
    return p


def read_jsonl(data: str) -> list[dict]:
    """GSM8K-style rows of ``--data``: a jsonl file, or a folder holding train.jsonl."""
    from rl.data import read_gsm8k_jsonl

    path = Path(data)
    if path.is_dir():
        path = path / "train.jsonl"
    if not data or not path.is_file():
        raise FileNotFoundError(f"--data={data!r} is not a jsonl file or a folder with train.jsonl; "
                                "point it at GSM8K's train.jsonl or set PLACERL_GSM8K_DIR")
    return read_gsm8k_jsonl(path)


def render_rows(rows: list[dict], tokenizer, count: int, seed: int) -> list[dict]:
    """``count`` rows drawn with ``seed``: the prompt as training renders it (text and ids), the
    gold solution and its final answer (what the rewards grade against)."""
    from rl.config import DataConfig
    from rl.data import render_prompt

    instruction = DataConfig().instruction
    picked = random.Random(seed).sample(range(len(rows)), min(count, len(rows)))
    out = []
    for i in picked:
        row = rows[i]
        prompt = render_prompt(tokenizer, row["question"], instruction)
        out.append({"prompt": prompt, "answer": row["answer"], "question": row["question"], "gold": row["gold"],
                    "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"]})
    return out


def probe_rows(args, path: str, tokenizer) -> tuple[list[dict], str, dict]:
    """The probe rows, their regime and (grpo) the rollout's summary."""
    from rl.placement_probe import grpo_probe_rows
    from placement.scorers import probe_source_for
    from rl.config import load_config

    rows = render_rows(read_jsonl(args.data), tokenizer, args.probe_samples, args.seed)
    source = probe_source_for(args.scorer, args.probe_source)
    if source == "sft":
        return rows, source, {}
    cfg = load_config(args.config or None, [f"model.name={path}", f"placement.probe_engine={args.probe_engine}",
                                            f"placement.seed={args.seed}"])
    rows, summary = grpo_probe_rows(cfg, path, rows)
    return rows, source, summary


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        from placement.budget import Budget
        from placement.probe import build_probe
        from placement.report import write_report
        from placement.scorers import get_scorer
        from placement.scoring import load_scoring_model, score_model
        from placement.settings import ScorerSettings
        from core.models import load_tokenizer, resolve_model

        budget = Budget.parse(args.budget)
        settings = ScorerSettings(rank=args.rank, alpha=args.alpha, alpha_policy=args.alpha_policy,
                                  target_modules=tuple(t for t in args.target_modules.split(",") if t),
                                  top_k=args.top_k, seed=args.seed, options={"steps": args.steps})
        scorer = get_scorer(args.scorer)
        path = resolve_model(args.model)
        tokenizer = load_tokenizer(path)
        probe, source, rollout = None, "", {}
        if scorer.needs_probe:  # before the scoring model loads: a grpo probe's engine comes and goes first
            rows, source, rollout = probe_rows(args, path, tokenizer)
            probe = build_probe(tokenizer, rows, source, args.max_tokens)
        model = load_scoring_model(path, args.dtype)
        plan = score_model(args.scorer, model, probe, budget, settings, model_name=args.model)
        if probe is not None:
            plan.details["probe_source"] = source
        if rollout:
            plan.details["probe_rollout"] = rollout
    except (ValueError, FileNotFoundError) as e:
        print(f"placerl score: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / "placement" / f"{Path(args.model).name}-{args.scorer}")
    plan.save(out / "plan.json")
    notes = []
    if probe is not None:
        loss = "mean cross-entropy over the gold solution" if source == "sft" else (
            f"the policy-gradient loss on {rollout['group_size']} sampled completions per prompt "
            f"({rollout['flat_groups']} of {rollout['prompts']} groups had equal rewards and were left out; "
            f"mean reward {rollout['reward_mean']:.3f})")
        notes = [f"Probe: {probe.num_samples} samples from {Path(args.data).name or 'data'} "
                 f"(seed {args.seed}), {probe.num_tokens:,} tokens, {loss}."]
    paths = write_report(plan, out, stem=args.name or args.scorer, title=args.title, notes=notes)
    print(f"placerl score: {len(plan.adapters)} adapters, {plan.trainable_parameters():,} trainable parameters "
          f"({100 * plan.trainable_parameters() / plan.baseline_params:.3f}% of uniform), "
          f"{plan.seconds:.1f} s; wrote {out / 'plan.json'}, {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
