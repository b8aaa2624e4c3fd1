"""``placerl eval``: greedy GSM8K accuracy of a model, or of a LoRA adapter on it.

    placerl eval --config launch/configs/gsm8k_grpo.yaml --adapter runs/gsm8k-grpo/checkpoints/step-000050/learner
    placerl eval --config launch/configs/gsm8k_grpo.yaml trainer.eval_size=1319 rollout.engine=hf

Runs one rollout engine in this process (no Ray), so it also works where Ray is absent.
Prints strict and flexible accuracy and writes them as JSON when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from rl.config import ConfigError, load_config
from rl.data import DataError, attach_prompts, load_task


def read_adapter(directory: str, version: int = 1):
    """An AdapterPayload from a PEFT adapter folder (what checkpoints and PEFT write)."""
    from rl.rollout.sync import AdapterPayload

    d = Path(directory)
    if not (d / "adapter_config.json").exists():
        raise FileNotFoundError(f"--adapter {directory!r} holds no adapter_config.json; "
                                "point it at <run>/checkpoints/step-N/learner")
    return AdapterPayload(version=version, tensors=load_file(str(d / "adapter_model.safetensors")),
                          peft_config=json.loads((d / "adapter_config.json").read_text()))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="placerl eval", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="launch/configs/gsm8k_grpo.yaml")
    ap.add_argument("--adapter", default="", help="a PEFT adapter folder (a checkpoint's learner/)")
    ap.add_argument("--out", default="", help="write the figures here as JSON")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from rl.evaluate import accuracy, eval_runner
        from core.models import load_tokenizer, resolve_model
        from rl.rollout.engine import SamplingSpec, make_engine, served_config
        from rl.rollout.sync import module_ranks

        path = resolve_model(cfg.model.name, cfg.model.cache_dir)
        tok = load_tokenizer(path)
        rows = attach_prompts(load_task(cfg.data, "test"), tok, cfg.data)[: cfg.trainer.eval_size or None]
        payload = read_adapter(args.adapter) if args.adapter else None
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = cfg.rollout.dtype if cfg.rollout.dtype != "auto" else (
        "bfloat16" if torch.cuda.is_available() else cfg.model.dtype)
    rollout_cfg = cfg.rollout
    if payload is not None:  # serve at the adapter's own largest rank (rl/rollout/engine.py says why)
        rollout_cfg = served_config(cfg.rollout, max(module_ranks(payload.tensors).values(),
                                                     default=cfg.rollout.max_lora_rank))
    engine = make_engine(rollout_cfg, path, dtype, cfg.trainer.seed)
    if payload is not None:
        engine.load_adapter(payload)
    t = time.perf_counter()
    groups = engine.generate([r["prompt_ids"] for r in rows],
                             SamplingSpec(n=1, max_new_tokens=cfg.rollout.eval_max_new_tokens, temperature=0.0))
    seconds = time.perf_counter() - t
    runner = eval_runner(cfg.reward.timeout_s)
    result = accuracy(rows, [g[0].text for g in groups], runner)
    runner.close()
    tokens = sum(len(g[0].token_ids) for g in groups)
    result.update({"generate_s": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                   "model": cfg.model.name, "adapter": args.adapter, "engine": cfg.rollout.engine})
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
