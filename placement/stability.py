"""PAGE stability: does the dominant module stay put across probe sets and checkpoints?

DomLoRA (paper 003) places its adapter once, from step-0 PAGE on 32 samples, and reports
that the peak "remains at the same layer ... across all later checkpoints" and across
tasks. This module scores PAGE on several disjoint probe sets of one policy and names,
per set, the global top module and the top down projection (DomLoRA's choice), then how
many sets agree with the most frequent choice. A checkpoint is scored as the policy it
is: its adapter merged into the base weights.

Left out: the command line (launch/stability.py) and the probe's rollouts (a grpo probe
set is built by rl.placement_probe like any other).
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from placement.scorers.page import DOMINANT_TYPE, page_shares


def disjoint_sets(n_rows: int, sets: int, size: int, seed: int) -> list[list[int]]:
    """``sets`` disjoint lists of ``size`` row indices, drawn with ``seed``."""
    if sets < 1 or size < 1:
        raise ValueError(f"--sets={sets} and --probe-samples={size} must both be >= 1")
    if sets * size > n_rows:
        raise ValueError(f"{sets} disjoint probe sets of {size} need {sets * size} rows and the data has {n_rows}; "
                         "lower --sets or --probe-samples")
    order = random.Random(seed).sample(range(n_rows), sets * size)
    return [order[k * size:(k + 1) * size] for k in range(sets)]


def tops(scores: dict[str, float]) -> dict:
    """The global top module and the top down projection, with their shares of total PAGE and,
    for the down projection, of the PAGE of all down projections."""
    kinds = {n: n.rsplit(".", 1)[-1] for n in scores}
    shares = page_shares(scores, kinds)
    out = {"global": shares["top_module"], "global_share": shares["top_share_total"]}
    if DOMINANT_TYPE in shares["top_by_type"]:
        name, share, in_type = shares["top_by_type"][DOMINANT_TYPE]
        out.update(down_proj=name, down_proj_share=share, down_proj_share_in_type=in_type)
    return out


def agreement(choices: list[str]) -> dict:
    """The most frequent choice and how many of the choices it is."""
    if not choices:
        return {"modal": None, "count": 0, "of": 0}
    modal, count = Counter(choices).most_common(1)[0]
    return {"modal": modal, "count": count, "of": len(choices)}


def merged_policy(base_path: str, adapter_dir: str, out_dir: Path) -> str:
    """A model folder holding ``base_path`` with the PEFT adapter of ``adapter_dir`` merged in."""
    from peft import PeftModel

    from core.models import load_model, load_tokenizer

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"--checkpoints {adapter_dir!r} holds no adapter_config.json; "
                                "point it at a checkpoint's learner/ folder")
    out_dir = Path(out_dir)
    if not (out_dir / "config.json").exists():
        model = PeftModel.from_pretrained(load_model(base_path, "float32"), adapter_dir).merge_and_unload()
        model.save_pretrained(out_dir)
        load_tokenizer(base_path).save_pretrained(out_dir)
    return str(out_dir)


def summarise(per_policy: dict[str, list[dict]]) -> dict:
    """Per policy, agreement of the global and the down_proj choices over its probe sets; and over
    policies, the agreement of each policy's modal choice."""
    out = {"policies": {}}
    for policy, sets in per_policy.items():
        out["policies"][policy] = {"global": agreement([s["global"] for s in sets]),
                                   "down_proj": agreement([s["down_proj"] for s in sets if "down_proj" in s]),
                                   "sets": sets}
    for key in ("global", "down_proj"):
        out[f"across_policies_{key}"] = agreement([p[key]["modal"] for p in out["policies"].values()
                                                   if p[key]["modal"] is not None])
    return out


def markdown(summary: dict, setup: list[str]) -> str:
    lines = ["# PAGE stability: the dominant module over disjoint probe sets and checkpoints", "",
             *[f"- {s}" for s in setup], "",
             "| policy | probe set | global top module | share of total PAGE | top down_proj (DomLoRA) | "
             "share of total | share among down_proj |", "|---|---|---|---|---|---|---|"]
    for policy, p in summary["policies"].items():
        for i, s in enumerate(p["sets"]):
            lines.append(f"| {policy} | {i} | {s['global']} | {100 * s['global_share']:.2f}% | "
                         f"{s.get('down_proj', '-')} | {100 * s.get('down_proj_share', float('nan')):.2f}% | "
                         f"{100 * s.get('down_proj_share_in_type', float('nan')):.1f}% |")
    lines += ["", "| policy | global top: modal (sets agreeing) | top down_proj: modal (sets agreeing) |", "|---|---|---|"]
    for policy, p in summary["policies"].items():
        g, d = p["global"], p["down_proj"]
        lines.append(f"| {policy} | {g['modal']} ({g['count']}/{g['of']}) | {d['modal']} ({d['count']}/{d['of']}) |")
    for key, label in (("global", "global top"), ("down_proj", "top down_proj")):
        a = summary[f"across_policies_{key}"]
        lines.append("")
        lines.append(f"Across policies, the modal {label} is {a['modal']} in {a['count']} of {a['of']}.")
    return "\n".join(lines) + "\n"
