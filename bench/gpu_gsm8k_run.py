"""The GSM8K GRPO run on one GPU: base accuracy, then uniform LoRA and DomLoRA (page) under one budget.

    python -m bench.gpu_gsm8k_run --out runs/gpu-gsm8k                 # every phase not done yet
    python -m bench.gpu_gsm8k_run --out runs/gpu-gsm8k --phase base    # one phase per call
    python -m bench.gpu_gsm8k_run --out runs/gpu-gsm8k --task synthetic
    python -m bench.gpu_gsm8k_run --out /tmp/smoke --smoke             # the tiny Llama on a CPU

Phases, each writing under ``<out>/<task>/<phase>/``:
  base     greedy accuracy (strict and flexible) of the base model on every test problem;
  uniform  GRPO with LoRA on all linear layers (placement.scorer=uniform), then the same
           evaluation of the final adapter;
  page     the same steps, seeds and data with DomLoRA (placement.scorer=page);
  summary  ``<out>/<task>/summary.json``: accuracies, reward curves (metrics.jsonl),
           wall times, tokens/s and peak GPU memory (also written after every phase).
A call stops starting new work when ``--budget-s`` is nearly spent: training stops at a
checkpoint (every ``trainer.save_every`` steps) and the next call with the same arguments
resumes from it, so each phase can be split over calls of a few minutes. Settings are
fixed by the first call (``<out>/<task>/settings.json``); a later call with different
ones fails in one line. Extra ``key=value`` arguments override the recipe for both arms.

Evaluation runs one plain-transformers engine in this process (all test prompts in one
greedy batch by default), after the run's actors are gone, for the base model and for
each arm's final adapter alike.

Expected on one H200 with the recipe's defaults (25 steps of 32 prompts x 8 x 256
tokens; docs/gpu.md gives the assumptions): base about 1 min, page about 6 min,
uniform 8-9 min (its rollouts decode through PEFT LoRA on every projection, about
twice the operator calls per token), each arm's start-up 60-90 s of it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PHASES = ("base", "uniform", "page")
RECIPE = Path(__file__).resolve().parent.parent / "launch" / "configs" / "gsm8k_grpo_gpu.yaml"
# Per-call costs the budget keeps back (s), from the code's structure: Ray and two actors
# starting (model loads, NCCL) before the first step; stopping and the evaluation after.
START_S, EVAL_RESERVE_S, CLOSE_S = 90.0, 90.0, 20.0
SMOKE = ["model.name=tiny-llama", "rollout.prompts_per_step=2", "rollout.group_size=2",
         "rollout.max_new_tokens=8", "rollout.eval_max_new_tokens=8", "learner.micro_batch_size=4",
         "placement.rank=4", "placement.alpha=8", "placement.probe_samples=4", "trainer.steps=2",
         "trainer.save_every=1", "data.synthetic_size=64", "cluster.gpus_per_learner_rank=0",
         "cluster.gpus_per_rollout_worker=0", "learner.lr=1e-3"]


def _peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _read(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # two calls may share --out (one GPU each)
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def load_cfg(args, arm: str = "uniform", extra: list[str] = ()):
    from rl.config import load_config

    overrides = list(args.settings) + [f"placement.scorer={arm}", *extra]
    return load_config(args.config, overrides)


# ----------------------------------------------------------------------------- evaluation

def evaluate(args, adapter_dir: str | None) -> dict:
    """Greedy strict/flexible accuracy on the task's test split, in this process."""
    from launch.evaluate import read_adapter
    from rl.data import attach_prompts, load_task
    from rl.evaluate import accuracy, eval_runner
    from core.models import load_tokenizer, resolve_model
    from rl.rollout.engine import SamplingSpec
    from rl.rollout.hf_engine import HFEngine

    cfg = load_cfg(args)
    path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    rows = attach_prompts(load_task(cfg.data, "test"), load_tokenizer(path), cfg.data)
    rows = rows[: args.eval_limit or None]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine = HFEngine(cfg.rollout, path, cfg.rollout.dtype, cfg.trainer.seed,
                      max_batch_sequences=args.eval_batch or len(rows))
    if adapter_dir:
        engine.load_adapter(read_adapter(adapter_dir))
    t = time.perf_counter()
    groups = engine.generate([r["prompt_ids"] for r in rows],
                             SamplingSpec(n=1, max_new_tokens=cfg.rollout.eval_max_new_tokens, temperature=0.0))
    seconds = time.perf_counter() - t
    runner = eval_runner(cfg.reward.timeout_s)
    try:
        out = accuracy(rows, [g[0].text for g in groups], runner)
    finally:
        runner.close()
    tokens = sum(len(g[0].token_ids) for g in groups)
    out.update({"generate_s": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                "truncated_frac": sum(g[0].finish_reason == "length" for g in groups) / len(groups),
                "peak_gpu_mb": _peak_mb(), "adapter": adapter_dir or "", "max_new_tokens": cfg.rollout.eval_max_new_tokens})
    del engine
    if torch.cuda.is_available():  # hand the KV cache back before the next phase's actors start
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- training

def actor_peak_mb(handle) -> float | None:
    import ray

    def peak(actor_self):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None

    return ray.get(handle.__ray_call__.remote(peak))


def train_arm(args, arm: str, folder: Path, deadline: float) -> bool:
    """Train (or resume) one arm until its last step or the deadline; True when finished."""
    import ray

    from rl.checkpoint import latest_checkpoint
    from rl.metrics_log import read_metrics
    from rl.trainer import Trainer

    run_dir = folder / "run"
    # The plan scored by the first call, so that a resumed run trains the adapter it saved.
    extra = [f"placement.plan={run_dir / 'plan.json'}"] if (run_dir / "plan.json").exists() else []
    cfg = load_cfg(args, arm, extra + [f"logging.output_dir={folder}", "logging.run_name=run",
                                       "trainer.eval_size=0", "trainer.resume=auto"])
    total, chunk = cfg.trainer.steps, cfg.trainer.save_every
    last = latest_checkpoint(run_dir)
    start = int(last.name.split("-")[1]) if last else 0
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    calls = _read(folder / "calls.json", [])
    call = {"start_s": time.perf_counter() - t0, "steps_before": start, "steps_after": start}
    try:
        while trainer.step < total:
            done = [m for m in read_metrics(run_dir) if m["step"] > start and "time/step_s" in m]
            per_step = sum(m["time/step_s"] for m in done) / len(done) if done else 0.0
            if done and time.monotonic() + per_step * min(chunk, total - trainer.step) + CLOSE_S > deadline:
                break
            # fit() trains up to cfg.trainer.steps and checkpoints there. The learner's schedule
            # was fixed at the true total when its actors started, so a chunk changes nothing
            # else; fit() resumes from the newest checkpoint the first time only.
            trainer.cfg.trainer.steps = min(total, max(trainer.step, start) + chunk)
            trainer.fit()
            trainer.cfg.trainer.resume = "never"
            m = read_metrics(run_dir)[-1]
            print(f"{arm}: step {trainer.step}/{total}  reward {m.get('reward/mean', float('nan')):.3f}  "
                  f"{m.get('time/step_s', 0):.1f} s/step  rollout {m.get('throughput/rollout_tokens_per_s', 0):.0f} "
                  f"tok/s  ({time.perf_counter() - t0:.0f} s into this call's training)", flush=True)
        call["steps_after"] = trainer.step
        call["learner_peak_mb"] = actor_peak_mb(trainer.learner.ranks[0])
        call["rollout_peak_mb"] = actor_peak_mb(trainer.rollout.workers[0])
        call["scoring_s"] = trainer.plan.seconds
    finally:
        trainer.close()
        ray.shutdown()
    call["wall_s"] = time.perf_counter() - t0
    _write(folder / "calls.json", calls + [call])
    finished = call["steps_after"] >= total
    if finished:
        _write(folder / "trained.json", {"checkpoint": str(latest_checkpoint(run_dir)), "steps": total})
    return finished


def run_phase(args, phase: str, root: Path, deadline: float) -> bool:
    """One phase, as far as the deadline allows; True when the phase is complete."""
    folder = root / phase
    if (folder / "eval.json").exists():
        return True
    if phase != "base" and not (folder / "trained.json").exists():
        if time.monotonic() + START_S > deadline:
            return False
        if not train_arm(args, phase, folder, deadline):
            return False
    if time.monotonic() + EVAL_RESERVE_S / 2 > deadline:
        return False
    adapter = None
    if phase != "base":
        adapter = str(Path(_read(folder / "trained.json")["checkpoint"]) / "learner")
    t = time.perf_counter()
    result = evaluate(args, adapter)
    result["wall_s"] = time.perf_counter() - t
    _write(folder / "eval.json", result)
    print(f"{phase}: accuracy strict {result['accuracy_strict']:.4f}  flexible {result['accuracy_flexible']:.4f}  "
          f"on {int(result['n'])} problems  ({result['tokens_per_s']:.0f} tok/s)", flush=True)
    return True


# ----------------------------------------------------------------------------- summary

def arm_summary(folder: Path) -> dict:
    from rl.metrics_log import read_metrics

    by_step = {m["step"]: m for m in read_metrics(folder / "run")}  # a resumed step: keep the last record
    steps = [by_step[s] for s in sorted(by_step) if s > 0]
    calls = _read(folder / "calls.json", [])

    def curve(key):
        return [m.get(key) for m in steps]

    def mean(key):
        vals = [m[key] for m in steps if isinstance(m.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    # One curve per reward function, as the reward runner names them (reward/<name>/mean).
    names = sorted({k[len("reward/"):-len("/mean")] for m in steps for k in m
                    if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2} - {"total"})
    return {"steps": len(steps), "reward_mean": curve("reward/mean"),
            "reward_per_function": {n: curve(f"reward/{n}/mean") for n in names},
            "response_tokens": curve("rollout/response_tokens_mean"),
            "train_wall_s": sum(c["wall_s"] for c in calls), "startup_s": [c["start_s"] for c in calls],
            "step_s_mean": mean("time/step_s"), "rollout_s_mean": mean("time/rollout_s"),
            "learner_s_mean": mean("time/learner_s"), "rollout_tokens_per_s": mean("throughput/rollout_tokens_per_s"),
            "learner_peak_gpu_mb": max([c.get("learner_peak_mb") or 0 for c in calls], default=None),
            "rollout_peak_gpu_mb": max([c.get("rollout_peak_mb") or 0 for c in calls], default=None),
            "placement_scoring_s": next((c["scoring_s"] for c in calls if c.get("scoring_s")), None)}


def change_vs_base(base: dict, after: dict) -> dict:
    """Accuracy changes and twice their binomial standard error (unpaired, so conservative:
    both evaluations grade the same problems): a change inside it is not evidence of learning."""
    out = {}
    for kind in ("strict", "flexible"):
        p0, p1 = base[f"accuracy_{kind}"], after[f"accuracy_{kind}"]
        se = math.sqrt(p0 * (1 - p0) / base["n"] + p1 * (1 - p1) / after["n"])
        out[kind] = {"change": p1 - p0, "two_se": 2 * se, "beyond_two_se": abs(p1 - p0) > 2 * se}
    return out


def plot_curves(summary: dict, path: Path) -> None:
    """Mean reward and response length per step, one line per arm (a PNG beside summary.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm in PHASES[1:]:
        e = summary["phases"][arm]
        for ax, key in zip(axes, ("reward_mean", "response_tokens")):
            ys = e.get(key) or []
            ax.plot(range(1, len(ys) + 1), ys, marker=".", label=arm)
    for ax, title in zip(axes, ("mean reward per step", "mean response tokens per step")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(f"{summary['task']} GRPO, SmolLM2-135M-Instruct ({summary['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(args, root: Path) -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    out = {"task": args.task, "device": device, "settings": args.settings, "phases": {}}
    for phase in PHASES:
        folder = root / phase
        entry = {"eval": _read(folder / "eval.json")}
        if phase != "base":
            entry.update(arm_summary(folder))
        out["phases"][phase] = entry
    base = (out["phases"]["base"]["eval"] or {})
    for phase in PHASES[1:]:
        ev = out["phases"][phase]["eval"]
        if ev and base:
            out["phases"][phase]["change_vs_base"] = change_vs_base(base, ev)
    _write(root / "summary.json", out)
    plot_curves(out, root / "reward_curves.png")
    print(f"summary ({args.task}, {device}): {root / 'summary.json'}")
    for phase in PHASES:
        e = out["phases"][phase]
        ev = e["eval"] or {}
        line = f"  {phase:<8} strict {ev.get('accuracy_strict', float('nan')):.4f}  " \
               f"flexible {ev.get('accuracy_flexible', float('nan')):.4f}"
        if "change_vs_base" in e:
            c = e["change_vs_base"]
            line += "  change " + ", ".join(f"{k} {c[k]['change']:+.4f} (2 s.e. {c[k]['two_se']:.4f})" for k in c)
        if phase != "base":
            r = [x for x in e["reward_mean"] if x is not None]
            line += f"  steps {e['steps']}  reward {r[0] if r else float('nan'):.3f} -> " \
                    f"{(sum(r[-5:]) / len(r[-5:])) if r else float('nan'):.3f} (last 5)  " \
                    f"{e['step_s_mean'] or float('nan'):.1f} s/step  " \
                    f"rollout {e['rollout_tokens_per_s'] or float('nan'):.0f} tok/s  " \
                    f"peak learner {e['learner_peak_gpu_mb'] or 0:.0f} MB, rollout {e['rollout_peak_gpu_mb'] or 0:.0f} MB"
        print(line)
    return out


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results folder, kept between calls")
    ap.add_argument("--phase", default="all", help="base, uniform, page, summary, or a comma list (all: every one)")
    ap.add_argument("--task", default="gsm8k", choices=["gsm8k", "synthetic"])
    ap.add_argument("--config", default=str(RECIPE))
    ap.add_argument("--seed", type=int, default=0, help="trainer, data and placement seed of both arms")
    ap.add_argument("--budget-s", type=float, default=510.0, help="wall-clock budget of this call")
    ap.add_argument("--eval-batch", type=int, default=0, help="sequences per greedy batch (0: all at once)")
    ap.add_argument("--eval-limit", type=int, default=0, help="evaluate only the first N test problems (0: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes: checks the script on a CPU")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for both arms, e.g. trainer.steps=40")
    args = ap.parse_args(argv)
    args.settings = [f"data.task={args.task}", f"trainer.seed={args.seed}", f"data.seed={args.seed}",
                     f"placement.seed={args.seed}", "logging.progress=false"]
    if args.smoke:
        args.settings += SMOKE
        args.eval_limit = args.eval_limit or 8
    args.settings += args.overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    deadline = time.monotonic() + args.budget_s
    root = Path(args.out) / args.task
    from rl.config import ConfigError

    try:
        load_cfg(args)  # fail on a bad override before anything starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    phases = PHASES if args.phase == "all" else [p for p in args.phase.split(",") if p != "summary"]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        print(f"error: --phase {unknown[0]!r} is not one of base, uniform, page, summary, all", file=sys.stderr)
        return 2
    fixed = {"settings": args.settings, "eval_limit": args.eval_limit, "config": Path(args.config).name}
    saved = _read(root / "settings.json")
    if saved is not None and saved != fixed:
        was = [x for x in saved["settings"] if x not in fixed["settings"]]
        now = [x for x in fixed["settings"] if x not in saved["settings"]]
        print(f"error: {root} was started with different settings (there: {was or saved}, here: {now or fixed}); "
              "pass the first call's arguments again, or use a new --out", file=sys.stderr)
        return 2
    _write(root / "settings.json", fixed)
    complete = True
    for phase in phases:
        if not run_phase(args, phase, root, deadline):
            complete = False
            print(f"{phase}: not finished within --budget-s={args.budget_s:.0f}; run the same command again "
                  "to continue", flush=True)
            break
    summarize(args, root)
    return 0 if complete else 3


if __name__ == "__main__":
    sys.exit(main())
