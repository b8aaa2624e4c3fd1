"""Learner -> vLLM adapter sync, stage by stage: the current path against the earlier ones, in one run.

    python -m bench.bench_sync                                   # SmolLM2-135M-Instruct, all-linear r=16, CPU
    python -m bench.bench_sync --model tiny-llama --syncs 3      # a quick look
    python -m bench.bench_sync --recipe launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml \\
        --model qwen2.5-coder-0.5b-instruct --syncs 8 --out bench_sync.json     # one GPU, sleep mode on

It starts the real system of a training run (the recipe's Trainer: the FSDP2 learner rank(s)
and the vLLM rollout worker(s) as Ray actors, served through vLLM's LoRA kernels), makes the
adapter's B non-zero, and then syncs K times with each path, taking turns so that all
see the same (noisy) machine:

  new       the trainer's own ``_sync``: on the learner one batched device-to-host copy of
            the adapter, folded for vLLM and cast to the served dtype there; one flat buffer
            per dtype through Ray's object store; all workers loading at once; each worker
            copies the new values straight into the served LoRA slot through its verified
            slot map (same structure as the served version; rl/rollout/vllm_slots.py);
  inplace_vllm  the same with the direct write off (``rollout.inplace_direct=false``): vLLM's
            own in-place path, a LoRAModel rebuilt (cast, pinned), packed and re-activated
            into the same slot (rl/rollout/vllm_inplace.py);
  add_lora  the same, with the workers' in-place update off (``rollout.inplace_sync=false``):
            a PEFT folder in RAM-backed temp storage, ``add_lora`` under a new id,
            ``remove_lora`` of the previous;
  old       the path before those, reproduced here: each LoRA tensor copied to the host one
            by one in the learner's dtype, pickled tensor by tensor, the scales folded on the
            worker, the workers loaded one after the other, each through ``add_lora``.
Stages, in seconds (medians over the K syncs):
  gather      the learner: gather, fold and cast (new, add_lora), copy to host (all);
  transfer    learner hand-over to the worker's load call: object store, deserialization;
  unpack      part of transfer: rebuilding the tensors from the flat buffers (not old);
  check, wake, fold, inplace_direct, inplace, write, add_lora, remove    the worker's engine
              (wake: 0 unless asleep; inplace_direct: the direct write (new), inplace: vLLM's
              in-place path (inplace_vllm), both with the read-back and prefix-cache reset);
    gpu_wait, prepare, slot_write, readback, slot_map, rpc, prefix_reset    the parts of
              inplace_direct / inplace (rl/rollout/vllm_inplace.py PARTS; indented in the table),
              measured inside vLLM's worker function (the first five) and around its call (rpc:
              the call's wall time minus the worker function's; prefix_reset);
  load        inplace_direct + inplace + write + add_lora + remove: the engine's load proper,
              what the in-place update replaces;
  activate    the first 1-token generate after the sync minus the next one (vLLM moves an
              adapter into its slots on first use, so this cost lands in the next rollout);
  gc          the part of the engine's stages the worker's process spent in Python's garbage
              collector (rl/rollout/gc_pauses.py), whichever stage it landed in;
  total       the driver's wall time of export + sync (the rollout already awake). In training
              a sleeping rollout wakes while the learner gathers, and ``time/sync_s`` starts
              after the wake.
With sleep mode on (the GPU recipe) the engine is put to sleep before every sync and woken
first, as in a training step; the wake is outside ``total`` as in the trainer.
After the last sync of each path the same greedy completion is asked for: all paths must
serve the same adapter. ``greedy`` gives each path's tokens and, per pair of paths, whether
they agree, the first position where they differ, and the largest gap between their token
logprobs before it: in bfloat16 on a GPU vLLM's LoRA kernels may break a near-tie differently
(tokens differ late, a small gap before), while a wrong adapter shows a large gap from the start.
In float32 (CPU) the tokens must agree: a difference fails the run (exit status 1).
``sync_paths`` counts which engine path each path's syncs took (new must be all
``inplace_direct``, inplace_vllm all ``inplace``).
Each round runs the paths that register a new LoRA id (add_lora, old) first, then
inplace_vllm, then one untimed sync of new, then the timed new. The untimed sync maps a newly
registered id's slots (a direct write needs a map of the id being served) and makes the CPU
tensors that vLLM's path replaced private again (vllm_slots._own), so the timed new sync
measures what every sync of a training run after its first sees: a direct write through the
served id's map, nothing to re-own (a run uses one path, never both in turn).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rl.rollout.vllm_inplace import PARTS  # noqa: E402 (after the path and environment set-up)

STAGES = ("gather", "transfer", "unpack", "check", "wake", "fold", "inplace_direct", "inplace", *PARTS, "write",
          "add_lora", "remove", "activate", "gc")
PATHS = ("new", "inplace_vllm", "add_lora", "old")
# Each path's engine switches (rollout.inplace_sync, rollout.inplace_direct); the earlier paths
# load through add_lora, the old one would otherwise go in place too.
SWITCHES = {"new": (True, True), "inplace_vllm": (True, False), "add_lora": (False, False), "old": (False, False)}


# ----------------------------------------------------------------------------- the old path

def old_export(rank, version: int):
    """Runs in a learner rank actor: the adapter as before, tensor by tensor to the host in the
    learner's dtype, unfolded, as a plain dict (so it pickles tensor by tensor, as it did)."""
    from peft import get_peft_model_state_dict

    from core.lora import full_tensor, lora_config_to_dict

    t = time.perf_counter()
    full = {n: full_tensor(p).to("cpu", copy=True) for n, p in rank.model.named_parameters() if "lora_" in n}
    tensors = {k: v.contiguous() for k, v in get_peft_model_state_dict(rank.model, state_dict=full).items()}
    out = {"version": version, "tensors": tensors, "peft_config": lora_config_to_dict(rank.model.peft_config["default"]),
           "timings": {"gather_s": time.perf_counter() - t, "sent_at": time.time()}}
    return out if rank.rank == 0 else None


def old_load(worker, raw: dict) -> dict:
    """Runs in a rollout worker actor: the engine folds the scales itself (an unfolded payload)."""
    from rl.rollout.sync import AdapterPayload

    report = {"transfer_s": time.time() - raw["timings"]["sent_at"], "gather_s": raw["timings"]["gather_s"]}
    report.update(worker.engine.load_adapter(AdapterPayload(raw["version"], raw["tensors"], raw["peft_config"])))
    return report


def old_sync(trainer) -> dict:
    import ray

    from rl.rollout.pool import slowest_stages, sync_metrics

    t = time.perf_counter()
    trainer.adapter_version += 1
    refs = [r.__ray_call__.remote(old_export, trainer.adapter_version) for r in trainer.learner.ranks]
    ray.get(refs[1:])
    reports = [ray.get(w.__ray_call__.remote(old_load, refs[0])) for w in trainer.rollout.workers]  # one by one
    return {"time/sync_s": time.perf_counter() - t, **sync_metrics(slowest_stages(reports))}


# ----------------------------------------------------------------------------- the run

def perturb_adapter(rank, seed: int) -> None:
    """Runs in a learner rank actor: B non-zero (as after training), so that serving shows."""
    import torch

    gen = torch.Generator().manual_seed(seed + rank.rank)
    with torch.no_grad():
        for n, p in rank.model.named_parameters():
            if "lora_B" in n:
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(torch.randn(local.shape, generator=gen).to(local) * 1e-2)


def timed_generate(trainer, prompt_ids: list[int], tokens: int) -> tuple[float, object]:
    """Seconds and the one greedy Completion (token_ids, logprobs)."""
    from rl.rollout.engine import SamplingSpec

    t = time.perf_counter()
    out = trainer.rollout.generate([prompt_ids], SamplingSpec(n=1, max_new_tokens=tokens, temperature=0.0))
    return time.perf_counter() - t, out[0][0]


def set_inplace(worker, inplace: bool, direct: bool) -> None:
    """Runs in a rollout worker actor: the engine's in-place update and direct slot write on or off
    (rollout.inplace_sync, rollout.inplace_direct)."""
    worker.engine.inplace_sync, worker.engine.inplace_direct = inplace, direct


def one_sync(trainer, path: str, prompt_ids: list[int]) -> dict:
    import ray

    if trainer.served.sleep_mode:
        trainer.rollout.sleep()
    t = time.perf_counter()
    trainer.rollout.wake_up()
    wake = time.perf_counter() - t
    ray.get([w.__ray_call__.remote(set_inplace, *SWITCHES[path]) for w in trainer.rollout.workers])
    t = time.perf_counter()
    m = old_sync(trainer) if path == "old" else trainer._sync()
    total = time.perf_counter() - t  # the whole export + sync (the trainer's clock starts after its wake call)
    ray.get([w.__ray_call__.remote(set_inplace, True, True) for w in trainer.rollout.workers])
    row = {k[len("time/sync_"):-2]: v for k, v in m.items() if k.startswith("time/sync_") and k != "time/sync_s"}
    row["total"], row["wake_before"] = total, wake
    first, _ = timed_generate(trainer, prompt_ids, 1)
    second, _ = timed_generate(trainer, prompt_ids, 1)
    row["activate"] = max(0.0, first - second)
    return row


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in (*STAGES, "total", "wake_before") if any(k in r for r in rows)]
    out = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 5) for k in keys}
    out["load"] = round(statistics.median(sum(r.get(k, 0.0) for k in LOAD) for r in rows), 5)
    return out


# The engine's load proper: what the in-place update replaces.
LOAD = ("inplace_direct", "inplace", "write", "add_lora", "remove")


def engine_path(row: dict) -> str:
    """Which engine path a sync took, from its stages (pure)."""
    return next((k for k in ("inplace_direct", "inplace") if k in row), "add_lora")


def in_turns(paths: list[str]) -> list[str | None]:
    """One round's order (pure): the paths that register a new LoRA id first, then inplace_vllm,
    then None (an untimed sync of new: it maps a new id's slots and re-owns the tensors vLLM's
    path replaced), then new; new alone when it is the only path."""
    others = [p for p in paths if p != "new"]
    registers = [p for p in others if not SWITCHES[p][0]]
    return registers + [p for p in others if p not in registers] + ([None] if others else []) + ["new"]


def first_difference(a: list, b: list) -> int | None:
    """The first position where two token lists differ (a length difference counts), or None (pure)."""
    return next((i for i, (x, y) in enumerate(itertools.zip_longest(a, b)) if x != y), None)


def greedy_agreement(served: dict[str, tuple[list[int], list[float]]]) -> dict:
    """Per pair of paths ("a~b"), from each path's greedy (tokens, logprobs) (pure): whether the
    tokens agree, the first position where they differ, and the largest |logprob gap| over the
    tokens before it (the same tokens, so the same distribution if the adapter is the same)."""
    out = {}
    for a, b in itertools.combinations(served, 2):
        (ta, la), (tb, lb) = served[a], served[b]
        at = first_difference(ta, tb)
        shared = min(len(ta), len(tb)) if at is None else at
        gap = max((abs(x - y) for x, y in zip(la[:shared], lb[:shared])), default=0.0)
        out[f"{a}~{b}"] = {"same": at is None, "first_difference": at, "logprob_gap_before": round(gap, 6)}
    return out


def ratios(median: dict, paths: list[str]) -> dict:
    """Each earlier path's total and load over the new path's, from medians of one run (pure)."""
    new = median["new"]
    return {f"{p}_over_new_{k}": round(median[p][k] / new[k], 3)
            for p in paths if p != "new" for k in ("total", "load") if new.get(k)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="launch/configs/gsm8k_grpo.yaml")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rank", type=int, default=16, help="all-linear LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--syncs", type=int, default=5, help="syncs per path, after one warm-up sync of each")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    paths = args.paths.split(",")
    if set(paths) - set(PATHS) or "new" not in paths:
        ap.error(f"--paths={args.paths!r}: name new and any of inplace_vllm, add_lora, old")

    from rl.config import load_config
    from rl.rollout.vllm_settings import use_in_process_engine
    from rl.trainer import Trainer

    use_in_process_engine()
    out_dir = Path(tempfile.mkdtemp(prefix="placerl-bench-sync-"))
    cfg = load_config(REPO / args.recipe, [
        f"model.name={args.model}", "placement.scorer=uniform", f"placement.rank={args.rank}",
        f"placement.alpha={2 * args.rank}", f"rollout.max_lora_rank={max(args.rank, 16)}",
        "rollout.engine=vllm", "rollout.weight_sync=adapter", "trainer.eval_size=0", "logging.run_name=bench",
        f"logging.output_dir={out_dir}", "logging.tensorboard=false", "logging.progress=false", *args.set])
    t = time.perf_counter()
    trainer = Trainer(cfg, out_dir / "bench")
    start_s = time.perf_counter() - t
    try:
        import ray

        ray.get([r.__ray_call__.remote(perturb_adapter, 0) for r in trainer.learner.ranks])
        prompt = trainer.train_rows[0]["prompt_ids"]
        rows: dict[str, list[dict]] = {p: [] for p in paths}
        for i in range(args.syncs + 1):  # the first of each is warm-up
            for p in in_turns(paths):
                row = one_sync(trainer, p or "new", prompt)
                if i and p:
                    rows[p].append(row)
        greedy = {}
        for p in in_turns(paths):
            one_sync(trainer, p or "new", prompt)
            if p:
                completion = timed_generate(trainer, prompt, 16)[1]
                greedy[p] = (list(completion.token_ids), list(completion.logprobs))
        payload_mb = ray.get(trainer.learner.ranks[0].__ray_call__.remote(
            lambda rank: sum(p.numel() for n, p in rank.model.named_parameters() if "lora_" in n) / 1e6))
    finally:
        trainer.close()
    result = {"model": args.model, "recipe": args.recipe, "lora_rank": args.rank, "lora_params_m": round(payload_mb, 3),
              "rollout_dtype": trainer._rollout_dtype(), "sleep_mode": bool(trainer.served.sleep_mode),
              "workers": cfg.rollout.num_workers, "learner_ranks": cfg.learner.num_ranks, "syncs": args.syncs,
              "start_s": round(start_s, 1), "median_s": {p: summarize(rows[p]) for p in paths},
              "sync_paths": {p: {path: sum(engine_path(r) == path for r in rows[p])
                                 for path in ("inplace_direct", "inplace", "add_lora")} for p in paths},
              "per_sync_s": {p: [{k: round(v, 5) for k, v in r.items()} for r in rows[p]] for p in paths}}
    result.update(ratios(result["median_s"], paths))
    agreement = greedy_agreement({p: greedy[p] for p in paths})  # pairs in the order of --paths
    result["same_greedy_tokens"] = all(pair["same"] for pair in agreement.values())
    result["greedy"] = {"tokens": {p: greedy[p][0] for p in paths}, "pairs": agreement}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    med = result["median_s"]
    keys = [k for k in (*STAGES, "load", "total") if any(k in med[p] for p in paths)]
    print(f"\nadapter sync, median of {args.syncs} syncs, seconds ({args.model}, r={args.rank}, "
          f"{result['lora_params_m']}M LoRA params, served in {result['rollout_dtype']}, sleep mode "
          f"{'on' if result['sleep_mode'] else 'off'})")
    print(f"{'stage':<15}" + "".join(f"{p:>13}" for p in paths))
    for k in keys:  # an in-place stage's parts are indented under it
        print(f"{'  ' + k if k in PARTS else k:<15}" + "".join(f"{med[p].get(k, 0.0):>13.4f}" for p in paths))
    for p in paths[1:]:
        print(f"{p} / new: total {result.get(f'{p}_over_new_total', float('nan')):.2f}, "
              f"load {result.get(f'{p}_over_new_load', float('nan')):.2f}")
    print(f"engine path of each path's syncs: {result['sync_paths']}; same greedy tokens: {result['same_greedy_tokens']}")
    for pair, seen in agreement.items():
        print(f"greedy {pair}: " + ("same tokens" if seen["same"] else f"differ from token {seen['first_difference']}")
              + f", largest logprob gap before: {seen['logprob_gap_before']:.2e}")
    if result["rollout_dtype"] == "float32" and not result["same_greedy_tokens"]:
        print("the paths served different greedy tokens in float32: one of them did not serve the learner's adapter")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
