"""`placerl stability`: PAGE's dominant module over disjoint probe sets, at the base model and at checkpoints.

    placerl stability --model qwen2.5-coder-0.5b-instruct --data <gsm8k folder> --sets 5 --probe-samples 32 \
        --checkpoints runs/gsm8k/checkpoints/step-000050/learner,runs/gsm8k/checkpoints/step-000100/learner

For the base model (step 0) and each checkpoint (its adapter merged into the base), PAGE
is scored on ``--sets`` disjoint probe sets of ``--probe-samples`` training problems,
and the global top module and the top down projection (DomLoRA's choice) are named per
set. ``--out`` gets ``stability.json`` and ``stability.md``. The probe is sft (the
paper's 32 supervised samples) unless ``--probe-source grpo`` (then ``--config``'s
rollout and rewards, as for ``placerl score``).

Left out: placements other than PAGE's (plop and gradrank have their own reports).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="placerl stability", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="builtin alias, checkpoint folder or hub id")
    p.add_argument("--data", default=os.environ.get("PLACERL_GSM8K_DIR", ""),
                   help="GSM8K jsonl file, or a folder holding train.jsonl (default: $PLACERL_GSM8K_DIR)")
    p.add_argument("--sets", type=int, default=5, help="disjoint probe sets per policy")
    p.add_argument("--probe-samples", type=int, default=32, help="problems per probe set")
    p.add_argument("--checkpoints", default="", help="comma list of adapter folders (a checkpoint's learner/)")
    p.add_argument("--probe-source", default="sft", choices=["sft", "grpo"])
    p.add_argument("--config", default="", help="recipe whose rollout and rewards a grpo probe uses")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/stability", help="output folder")
    return p


def score_sets(policy_path: str, all_rows: dict[int, dict], index_sets: list[list[int]], args) -> list[dict]:
    """PAGE's top modules on each probe set of one policy."""
    from placement.budget import Budget
    from placement.probe import build_probe
    from rl.placement_probe import grpo_probe_rows
    from placement.scoring import load_scoring_model, score_model
    from placement.settings import ScorerSettings
    from placement.stability import tops
    from rl.config import load_config
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(policy_path)
    settings = ScorerSettings(rank=args.rank, alpha=args.alpha, seed=args.seed)
    model = load_scoring_model(policy_path, args.dtype)
    out = []
    for k, idx in enumerate(index_sets):
        rows = [all_rows[i] for i in idx]
        if args.probe_source == "grpo":
            cfg = load_config(args.config or None, [f"model.name={policy_path}", f"placement.seed={args.seed + k}"])
            rows, _ = grpo_probe_rows(cfg, policy_path, rows)
        probe = build_probe(tokenizer, rows, args.probe_source, args.max_tokens)
        plan = score_model("page", model, probe, Budget.parse(""), settings)
        out.append({**tops(plan.scores), "probe_samples": probe.num_samples, "seconds": plan.seconds})
    return out


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        from launch.score import read_jsonl, render_rows
        from placement.stability import disjoint_sets, markdown, merged_policy, summarise
        from core.models import load_tokenizer, resolve_model

        base = resolve_model(args.model)
        data = read_jsonl(args.data)
        index_sets = disjoint_sets(len(data), args.sets, args.probe_samples, args.seed)
        # Rendered once with the base tokenizer (a merged checkpoint keeps the same one), only the rows probed.
        tok = load_tokenizer(base)
        rows = {i: render_rows([data[i]], tok, 1, 0)[0] for idx in index_sets for i in idx}
        out = Path(args.out)
        policies = {"step 0 (base)": base}
        for ckpt in [c for c in args.checkpoints.split(",") if c.strip()]:
            name = Path(ckpt).parent.name if Path(ckpt).name == "learner" else Path(ckpt).name
            policies[name] = merged_policy(base, ckpt, out / "merged" / name)
        per_policy = {name: score_sets(path, rows, index_sets, args) for name, path in policies.items()}
    except (ValueError, FileNotFoundError) as e:
        print(f"placerl stability: {e}", file=sys.stderr)
        return 2
    summary = summarise(per_policy)
    setup = [f"command: `placerl stability {' '.join(argv)}`",
             f"model: {args.model}; {args.sets} disjoint probe sets of {args.probe_samples} problems (seed {args.seed}); "
             f"probe: {args.probe_source}; PAGE at rank {args.rank}, alpha {args.alpha}",
             f"policies: {', '.join(policies)}"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.json").write_text(json.dumps({"setup": setup, **summary}, indent=1))
    (out / "stability.md").write_text(markdown(summary, setup))
    for name, p in summary["policies"].items():
        print(f"{name}: global top {p['global']['modal']} ({p['global']['count']}/{p['global']['of']}), "
              f"top down_proj {p['down_proj']['modal']} ({p['down_proj']['count']}/{p['down_proj']['of']})")
    print(f"wrote {out / 'stability.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
