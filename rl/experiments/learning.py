"""The learning run: base accuracy, GRPO arms trained under a time budget, and their evaluation.

One results folder (``--out``) holds everything, so that each part can be run, stopped
and resumed by separate commands, and several arms can train at the same time as
separate processes (each starts its own private Ray):

    <out>/settings.json              what every evaluation must share (model, data, eval length)
    <out>/base/eval.json             base model: greedy accuracy on val and test (cached)
    <out>/base/problems-<split>.jsonl    per-problem correctness, for paired statistics
    <out>/arms/<arm>/seed-<s>/arm.json   the arm's overrides and the command that started it
    <out>/arms/<arm>/seed-<s>/run/       the trainer's run folder (metrics.jsonl, checkpoints)
    <out>/arms/<arm>/seed-<s>/eval.json  and problems-<split>.jsonl: the final adapter

An arm call stops at a checkpoint when its ``budget_s`` is nearly spent; the next call
with the same arguments resumes from the newest complete checkpoint (adapter, optimizer,
data position), so the data order and learning-rate schedule are those of one
uninterrupted run. Evaluation is greedy, through the same vLLM rollout engine as
training: the base model in this process, each arm's final adapter in its own rollout
actors before they stop. The val split is the last ``data.val_size`` train problems,
which the training sampler never draws.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from rl.config import load_config

# Seconds a call keeps back: Ray, the learner and the rollout actors starting before the
# first step (a model load each); stopping the actors and writing files after the last.
START_S, CLOSE_S = 90.0, 30.0
# An arm's evaluation without a base timing to go by (s); with one, twice the base's
# generation time (arms share the device) plus this much.
EVAL_FALLBACK_S = 150.0
# The config that two evaluations must share for their problems and grading to be the same.
SHARED_KEYS = ("model", "data", "rollout.eval_max_new_tokens", "rollout.max_model_len", "reward.timeout_s")


class LearningError(ValueError):
    """A learning-run argument or folder problem, in one line."""


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # arms in separate processes share <out>
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def arm_dir(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / "arms" / arm / f"seed-{seed}"


def shared_settings(cfg) -> dict:
    """The parts of ``cfg`` named by :data:`SHARED_KEYS`."""
    tree = cfg.to_dict()
    out = {}
    for key in SHARED_KEYS:
        node = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def first_difference(reference: dict, mine: dict) -> str | None:
    """The first key of ``mine`` whose value differs from ``reference``'s (None: they agree)."""
    return next((k for k in mine if json.dumps(mine[k], sort_keys=True) != json.dumps(reference.get(k), sort_keys=True)),
                None)


def check_same_overrides(out: Path, arm: str, seed: int, overrides: list[str]) -> None:
    """A started (arm, seed) resumes only with the overrides it was started with (else one line)."""
    saved = read_json(arm_dir(out, arm, seed) / "arm.json")
    if saved is not None and saved["overrides"] != list(overrides):
        raise LearningError(f"arm {arm} seed {seed} in {out} was started with overrides {saved['overrides']}, this "
                            f"call has {list(overrides)}; keep them, rename the arm, or use another --out")


def check_shared(out: Path, cfg) -> None:
    """The first command fixes the shared settings; a later one with others fails in one line."""
    mine, path = shared_settings(cfg), Path(out) / "settings.json"
    saved = read_json(path)
    if saved is None:
        write_json(path, mine)
        return
    k = first_difference(saved, mine)
    if k is not None:
        raise LearningError(f"{out} was started with {k}={json.dumps(saved.get(k))[:200]}, this command has "
                            f"{json.dumps(mine[k])[:200]}; pass the same settings, or use another --out")


def eval_rows(cfg, tokenizer) -> dict[str, list[dict]]:
    """The rows every evaluation grades: val (when data.val_size > 0) and the whole test split."""
    from rl.data import attach_prompts, load_task

    splits = (["val"] if cfg.data.val_size else []) + ["test"]
    return {s: attach_prompts(load_task(cfg.data, s), tokenizer, cfg.data) for s in splits}


def greedy_eval(generate, rows: dict[str, list[dict]], cfg) -> tuple[dict, dict[str, list[dict]]]:
    """Greedy completions of every split in one batch, graded per problem.

    ``generate(prompt_ids, sampling)`` is a rollout engine's or pool's ``generate``.
    Returns (figures, per-problem records by split).
    """
    from rl.evaluate import accuracy, eval_runner, graded
    from rl.rollout.engine import SamplingSpec

    flat = [r for split in rows.values() for r in split]
    spec = SamplingSpec(n=1, max_new_tokens=cfg.rollout.eval_max_new_tokens, temperature=0.0)
    t = time.perf_counter()
    groups = generate([r["prompt_ids"] for r in flat], spec)
    seconds = time.perf_counter() - t
    completions = [g[0] for g in groups]
    runner = eval_runner(cfg.reward.timeout_s)
    records, figures, start = {}, {}, 0
    try:
        for split, split_rows in rows.items():
            part = completions[start:start + len(split_rows)]
            start += len(split_rows)
            texts = [c.text for c in part]
            marks = graded(split_rows, texts, runner)
            figures[split] = accuracy(split_rows, texts, runner, per_problem=marks)
            records[split] = [{"index": i, "gold": r["gold"], "strict": int(marks["strict"][i] > 0.5),
                               "flexible": int(marks["flexible"][i] > 0.5), "tokens": len(c.token_ids),
                               "truncated": int(c.finish_reason == "length"), "completion": c.text}
                              for i, (r, c) in enumerate(zip(split_rows, part))]
    finally:
        runner.close()
    tokens = sum(len(c.token_ids) for c in completions)
    figures.update({"generate_s": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                    "truncated_frac": sum(c.finish_reason == "length" for c in completions) / max(1, len(completions)),
                    "max_new_tokens": cfg.rollout.eval_max_new_tokens})
    return figures, records


def save_eval(folder: Path, figures: dict, records: dict[str, list[dict]], extra: dict) -> dict:
    """``eval.json``, and per split ``problems-<split>.jsonl`` (correctness) and
    ``completions-<split>.jsonl`` (the text, to read what the model answered).
    eval.json is written last: it marks the evaluation done."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, recs in records.items():
        (folder / f"completions-{split}.jsonl").write_text(
            "".join(json.dumps({"index": r["index"], "completion": r["completion"]}) + "\n" for r in recs))
        (folder / f"problems-{split}.jsonl").write_text(
            "".join(json.dumps({k: v for k, v in r.items() if k != "completion"}) + "\n" for r in recs))
    result = {**figures, **extra}
    write_json(folder / "eval.json", result)
    return result


def _line(label: str, figures: dict) -> str:
    parts = [f"{s} strict {figures[s]['accuracy_strict']:.4f} flexible {figures[s]['accuracy_flexible']:.4f} "
             f"(n={int(figures[s]['n'])})" for s in ("val", "test") if s in figures]
    return f"{label}: " + "; ".join(parts) + f"  [{figures['tokens_per_s']:.0f} tok/s]"


# ----------------------------------------------------------------------------- base

def run_base(config: str, overrides: list[str], out: Path, command: str = "") -> dict:
    """Greedy accuracy of the base model on val and test, in this process; cached in <out>/base."""
    from core.models import load_tokenizer, resolve_model
    from rl.rollout.engine import make_engine, rollout_dtype, served_config

    cfg = load_config(config, overrides)
    check_shared(out, cfg)
    folder = Path(out) / "base"
    cached = read_json(folder / "eval.json")
    if cached is not None:
        print(_line("base (cached)", cached), flush=True)
        return cached
    path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    rows = eval_rows(cfg, load_tokenizer(path))
    # The engine the arms' rollout actors run (LoRA enabled at the arms' rank cap), serving no
    # adapter; alone in this process, so it never sleeps.
    served = dataclasses.replace(served_config(cfg.rollout, cfg.placement.rank), sleep_mode=False)
    engine = make_engine(served, path, rollout_dtype(cfg), cfg.trainer.seed)
    t = time.perf_counter()
    figures, records = greedy_eval(engine.generate, rows, cfg)
    result = save_eval(folder, figures, records, {"model": cfg.model.name, "wall_s": time.perf_counter() - t,
                                                  "command": command})
    print(_line("base", result), flush=True)
    return result


# ----------------------------------------------------------------------------- arms

def arm_overrides(overrides: list[str], seed: int, folder: Path) -> list[str]:
    run_dir = folder / "run"
    extra = [f"trainer.seed={seed}", f"placement.seed={seed}"]
    # The plan scored by the first call, so that a resumed run trains the adapter it saved.
    if (run_dir / "plan.json").exists():
        extra.append(f"placement.plan={run_dir / 'plan.json'}")
    return [*overrides, *extra, f"logging.output_dir={folder}", "logging.run_name=run",
            "trainer.eval_size=0", "trainer.resume=auto"]


def _mean_step_s(run_dir: Path) -> float | None:
    from rl.metrics_log import read_metrics

    times = [m["time/step_s"] for m in read_metrics(run_dir) if isinstance(m.get("time/step_s"), (int, float))] \
        if (run_dir / "metrics.jsonl").exists() else []
    return sum(times) / len(times) if times else None


def eval_reserve_s(out: Path) -> float:
    base = read_json(Path(out) / "base" / "eval.json")
    return 2 * base["generate_s"] + 30.0 if base else EVAL_FALLBACK_S


def run_arm(config: str, overrides: list[str], out: Path, arm: str, seed: int, budget_s: float,
            command: str = "", start_s: float = START_S, close_s: float = CLOSE_S,
            eval_at_budget: bool = False) -> str:
    """Train (or resume) one arm and evaluate its final adapter, as far as ``budget_s`` allows.

    With ``eval_at_budget`` the call keeps the evaluation's time back and, when the budget
    runs out before ``trainer.steps``, evaluates the adapter of the step it reached (the
    eval records that step): for a last call on a machine that is about to go away.

    Returns "evaluated", "trained" (evaluation left for the next call) or "training".
    The first chunk of steps in a call always runs, so every call makes progress.
    """
    import ray

    from rl.checkpoint import latest_checkpoint
    from rl.trainer import Trainer

    deadline = time.monotonic() + budget_s
    folder = arm_dir(out, arm, seed)
    if (folder / "eval.json").exists():
        print(_line(f"{arm} seed {seed} (done)", read_json(folder / "eval.json")), flush=True)
        return "evaluated"
    cfg = load_config(config, arm_overrides(overrides, seed, folder))
    check_shared(out, cfg)
    check_same_overrides(out, arm, seed, overrides)
    saved = read_json(folder / "arm.json")
    if saved is None or (command and saved.get("command") != command):  # the latest command line that ran it
        write_json(folder / "arm.json", {"arm": arm, "seed": seed, "overrides": list(overrides),
                                         "config": str(config), "command": command or (saved or {}).get("command", "")})
    if start_s > 0 and time.monotonic() + start_s > deadline:  # no time to start the actors
        return "training"
    run_dir, total, chunk = folder / "run", cfg.trainer.steps, cfg.trainer.save_every
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    call = {"steps_before": 0, "start_s": 0.0}
    status = "training"
    try:
        trainer.resume()
        trainer.cfg.trainer.resume = "never"  # fit() must not reload the checkpoint at every chunk
        call.update(steps_before=trainer.step, start_s=time.perf_counter() - t0)
        first = True
        while trainer.step < total:
            per_step = _mean_step_s(run_dir)
            todo = min(chunk, total - trainer.step)
            reserve = close_s + (eval_reserve_s(out) if eval_at_budget else 0.0)
            if not first and time.monotonic() + (per_step or 0.0) * todo + reserve > deadline:
                break
            # fit() trains up to cfg.trainer.steps and checkpoints there; the learner's
            # schedule was fixed at the true total when its actors started.
            trainer.cfg.trainer.steps = trainer.step + todo
            trainer.fit()
            first = False
            print(f"{arm} seed {seed}: step {trainer.step}/{total}  {(_mean_step_s(run_dir) or 0):.1f} s/step  "
                  f"({time.perf_counter() - t0:.0f} s into this call)", flush=True)
        trainer.cfg.trainer.steps = total
        if trainer.step >= total or eval_at_budget:
            status = "trained" if trainer.step >= total else "training"
            if eval_at_budget or time.monotonic() + eval_reserve_s(out) + close_s <= deadline:
                # The rollout actors serve the final adapter (synced after the last step or on resume).
                figures, records = greedy_eval(trainer.rollout.generate, eval_rows(cfg, trainer.tok), cfg)
                ckpt = latest_checkpoint(run_dir)
                result = save_eval(folder, figures, records, {
                    "arm": arm, "seed": seed, "steps": trainer.step, "checkpoint": str(ckpt),
                    "overrides": list(overrides), "train_rows": len(trainer.train_rows)})
                print(_line(f"{arm} seed {seed}", result), flush=True)
                status = "evaluated"
        call["steps_after"] = trainer.step
    finally:
        trainer.close()
        ray.shutdown()
    call["wall_s"] = time.perf_counter() - t0
    write_json(folder / "calls.json", read_json(folder / "calls.json", []) + [call])
    if status != "evaluated":
        print(f"{arm} seed {seed}: {status} at step {call.get('steps_after', '?')}/{total} when the budget ran "
              "out; run the same command again to continue", flush=True)
    return status
