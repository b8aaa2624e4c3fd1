"""The vLLM GPU path in one command: rollout tokens/s, framework overhead, GRPO step vs TRL, sync, memory.

    python -m bench.bench_vllm_gpu --model $QWEN_GGUF --out reports/gpu/bench_vllm_gpu.json
    python -m bench.bench_vllm_gpu --parts rollout-graphs,rollout-eager --budget-s 500 --out ...
    python -m bench.bench_vllm_gpu --smoke --out /tmp/smoke.json     # every part on a CPU, tiny sizes

Parts (each in its own subprocess: a vLLM engine's GPU memory is not freed inside a process):
  rollout-graphs, rollout-eager, rollout-hf
      generated tokens / wall time at 64 x 8 and 128 x 8 (prompts x samples, 512 new tokens,
      temperature 1) for the model serving an all-linear r=16 adapter: vLLM with CUDA
      graphs, vLLM eager, the plain-transformers engine (hf: 128 new tokens, it is slow;
      tokens/s of a launch-bound engine hardly depends on the length); graphs and eager run the
      largest batch three more times, the rollout.seed_modes taking turns, and graphs once more in
      a child process with rollout.async_scheduling=true (128x8_async_scheduling;
      bench/vllm_rollout_rate.py);
  rollout-sleep, rollout-sleep-async, rollout-awake (not in the default set)
      the step's batch again and again, woken or awake by turns, each call with its engine
      steps' profile (bench/vllm_sleep_decode.py);
  overhead
      the framework's rollout (RolloutPool -> RolloutWorker Ray actor -> VLLMEngine) over raw
      ``vllm.LLM.generate`` on an identically configured engine in the driver, same prompts,
      same seed scheme (rollout.seed_mode), same adapter, logprobs=0; raw with vLLM's default
      output work and raw with the engine's lean SamplingParams; alternating rounds, ratio of
      the best (goal <= 1.05 over raw; see part_overhead);
  step-placerl, step-placerl-nosleep
      the GPU recipe for a few GRPO steps (colocated learner + vLLM worker), with vLLM's sleep
      mode and without: mean step time after the first and its breakdown (rollout, reward,
      learner, sync, sleep, wake), adapter sync as a share of the step, and the GPU's peak
      used memory (all processes, sampled every 50 ms); then one more step with the learner
      under torch's profiler (``learner_profile``: kernel time by class, the GPU's busy share),
      left out of the means;
  step-placerl-2gpu (not in the default set: needs a host with two GPUs)
      the same run disaggregated: the learner rank on one GPU, the vLLM worker on the other
      (no sleep mode: nothing shares a GPU), for the same breakdown against colocated;
  step-placerl-overlap (not in the default set: one step off-policy)
      awake with ``trainer.max_staleness=1``: the next rollout decodes while the learner steps;
  step-placerl-compile (not in the default set: compiling takes minutes)
      the recipe with ``learner.compile=true`` (each decoder layer compiled before FSDP2); the
      compile lands in the first step, which the means leave out and ``steps`` keeps;
  step-placerl-stream, step-placerl-stream-compile, step-placerl-stream-2gpu (not in the default set)
      the recipe with ``trainer.stream_groups`` (a micro-batch of groups at a time, vLLM awake):
      on-policy, the learner starts on finished groups while the longest ones decode; colocated,
      with compiled layers, or disaggregated on two GPUs;
  step-placerl-merged, -merged-compile, -merged-compile-nosleep (not in the default set):
      ``rollout.weight_sync=merged`` (no LoRA kernels, as TRL serves the adapter), compiled, awake;
  step-trl, step-trl-nosleep (not in the default set: TRL's default, vLLM awake throughout)
      TRL's GRPOTrainer(use_vllm=True, vllm_mode="colocate", sleep mode on) on the same model,
      LoRA, prompts (in placerl's order), group, lengths and micro-batches, with the same
      breakdown (its generation, reward, weight sync; learner = the rest of the step). Both run
      with the recipe's ``learner.gradient_checkpointing``; placerl packs micro-batches by tokens
      (``learner.micro_batch_tokens``) while TRL pads each micro-batch of 32 rows.
The JSON (``--out``) is rewritten after every part and merged with what the file holds (parts
spread over calls; a killed call keeps what it finished; a part named twice in one call keeps its
second run as ``NAME#2``); ``summary`` holds the ratios. A part
that fails is recorded with a one-line error and the others go on; ``--budget-s`` bounds the
whole call (a part that would not fit is recorded as skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.gpu_measure import Recorder, device_name  # noqa: E402
from bench.vllm_gpu_summary import step_part_sleeps, summarise  # noqa: E402
from rl.rollout.vllm_settings import use_in_process_engine  # noqa: E402

use_in_process_engine()
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_PARTS = ["rollout-graphs", "rollout-eager", "rollout-hf", "overhead", "step-placerl", "step-placerl-nosleep",
                 "step-trl"]
PARTS = DEFAULT_PARTS + ["rollout-sleep", "rollout-sleep-async", "rollout-awake"] + [f"step-placerl-{v}" for v in (
    "2gpu", "overlap", "compile", "stream", "stream-compile", "stream-2gpu", "merged", "merged-compile",
    "merged-compile-nosleep")] + ["step-trl-nosleep"]
GPU_RECIPE = "launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml"
SMOKE_RECIPE = "launch/configs/tiny.yaml"


@dataclass
class Sizes:
    model: str
    dtype: str
    recipe: str
    batches: list = field(default_factory=lambda: [(64, 8), (128, 8)])  # prompts x samples
    tokens: int = 512
    hf_tokens: int = 128
    rank: int = 16
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.3
    overhead_rounds: int = 5
    overhead_batch: tuple | None = None  # (prompts, samples, new tokens); None: the first of batches, tokens
    seed_mode: str = "auto"  # rollout.seed_mode of the vLLM engines
    step_prompts: int = 32
    step_group: int = 8
    step_tokens: int = 512
    micro_batch: int = 32
    steps: int = 5  # the first is warm-up
    learner_profile: bool = True  # the step parts run one more step with the learner under torch's profiler
    step_settings: list = field(default_factory=list)  # --set: recipe overrides for placerl's step parts


def sizes_for(args) -> Sizes:
    s = _base_sizes(args)
    s.seed_mode = args.seed_mode
    if not 0 < args.gpu_memory_utilization <= 0.95:
        raise SystemExit(f"--gpu-memory-utilization={args.gpu_memory_utilization}: choose a share in (0, 0.95]")
    s.gpu_memory_utilization = args.gpu_memory_utilization
    s.learner_profile = not args.no_learner_profile
    s.step_settings = list(args.set)
    if bad := [kv for kv in s.step_settings if "=" not in kv]:
        raise SystemExit(f"--set {bad[0]!r}: write KEY=VALUE, e.g. --set rollout.async_scheduling=true")
    if args.overhead_size:
        try:
            s.overhead_batch = tuple(int(x) for x in args.overhead_size.lower().split("x"))
        except ValueError:
            s.overhead_batch = ()
        if len(s.overhead_batch) != 3 or min(s.overhead_batch) < 1:
            raise SystemExit(f"--overhead-size={args.overhead_size!r}: write PROMPTSxSAMPLESxTOKENS, e.g. 64x8x512")
    return s


def _base_sizes(args) -> Sizes:
    if args.smoke:
        return Sizes(model="tiny-llama", dtype="float32", recipe=SMOKE_RECIPE, batches=[(2, 2), (4, 2)], tokens=8,
                     hf_tokens=8, rank=8, max_model_len=512, overhead_rounds=2, step_prompts=2, step_group=2,
                     step_tokens=8, micro_batch=4, steps=2)
    return Sizes(model=args.model, dtype="bfloat16", recipe=GPU_RECIPE)


# ----------------------------------------------------------------------------- shared pieces

def prompt_ids(tok, k: int) -> list[list[int]]:
    from bench.bench_rollout import questions, render

    qs = questions(k)
    qs = (qs * (k // max(1, len(qs)) + 1))[:k]
    return tok(render(tok, qs), add_special_tokens=False)["input_ids"]


def model_and_adapter(s: Sizes):
    import bench.bench_rollout as br
    from core.models import load_tokenizer, resolve_model

    path = resolve_model(s.model)
    br.LORA["r"], br.LORA["lora_alpha"] = s.rank, 2 * s.rank
    return path, load_tokenizer(path), br.adapter_payload(path, version=1)


def rollout_config(s: Sizes, engine: str, eager="auto", **settings):
    from rl.config import RolloutConfig

    # Graphs for every decode batch of the largest rollout (vLLM's default stops at 512 sequences).
    graph_batch = max(p * g for p, g in s.batches)
    return RolloutConfig(engine=engine, max_lora_rank=s.rank, max_model_len=s.max_model_len, enforce_eager=eager,
                         gpu_memory_utilization=s.gpu_memory_utilization, cpu_kv_cache_gb=1.0,
                         cudagraph_max_batch=graph_batch, **{"sleep_mode": False, "seed_mode": s.seed_mode, **settings})


def tokens_of(rows) -> int:
    return sum(len(c.token_ids) for row in rows for c in row)


# ----------------------------------------------------------------------------- parts

def run_part(args) -> None:
    s = sizes_for(args)
    rec, deadline = Recorder(args.part_out), args.deadline
    rec("sizes", asdict(s))
    name = args.part
    if name in ("rollout-sleep", "rollout-sleep-async", "rollout-awake"):
        from bench.vllm_sleep_decode import part_rollout_sleep

        part_rollout_sleep(s, rec, deadline, sleep_mode=name != "rollout-awake",
                           async_scheduling=True if name.endswith("async") else "auto")
    elif name.startswith("rollout-"):
        child = [sys.executable, "-m", "bench.bench_vllm_gpu", "--model", args.model, "--seed-mode", args.seed_mode]
        child += ["--smoke"] * args.smoke + ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        from bench.vllm_rollout_rate import part_rollout

        part_rollout(s, name.split("-", 1)[1], rec, deadline, child)
    elif name == "overhead":
        from bench.vllm_overhead import part_overhead

        part_overhead(s, rec, deadline)
    elif name.startswith("step-placerl"):
        from bench.vllm_step import part_step_placerl

        part_step_placerl(s, rec, sleep=step_part_sleeps(name),
                          two_gpus=name.endswith("2gpu"), overlap=name.endswith("overlap"),
                          compile_layers="-compile" in name, stream="-stream" in name, merged="-merged" in name)
    elif name.startswith("step-trl"):
        from bench.vllm_step import part_step_trl

        part_step_trl(s, rec, sleep=name != "step-trl-nosleep")
    else:
        raise SystemExit(f"--part={name!r} is not known; choose one of {', '.join(PARTS)}")


# ----------------------------------------------------------------------------- the orchestrator

def one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:400]


def part_and_settings(spec: str) -> tuple[str, list[str]]:
    """``NAME@KEY=VALUE@KEY=VALUE``: a part, and recipe overrides for that part alone (after --set's)."""
    name, *settings = spec.split("@")
    if settings and not name.startswith("step-placerl"):
        raise SystemExit(f"--parts {spec!r}: only placerl's step parts take @KEY=VALUE overrides")
    if bad := [kv for kv in settings if "=" not in kv]:
        raise SystemExit(f"--parts {spec!r}: write @KEY=VALUE, e.g. {name}@rollout.num_workers=2 (not {bad[0]!r})")
    return name, settings


def result_keys(parts: list[str]) -> list[str]:
    """Where each part's result goes in the JSON (pure): its spec, and ``SPEC#N`` for its N-th run
    within one call, so that a part repeated in a call (replicates around another) keeps each run."""
    seen: dict[str, int] = {}
    keys = []
    for part in parts:
        seen[part] = seen.get(part, 0) + 1
        keys.append(part if seen[part] == 1 else f"{part}#{seen[part]}")
    return keys


def orchestrate(args) -> int:
    sizes_for(args)  # a bad size fails here, in one line, before any part starts
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("results", {})
    doc.setdefault("runs", []).append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
                                       "host": os.uname().nodename, "device": device_name(), "smoke": args.smoke})
    parts = args.parts.split(",") if args.parts else DEFAULT_PARTS
    unknown = [p for p in parts if part_and_settings(p)[0] not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: {unknown} not known; choose from {', '.join(PARTS)}")
    deadline = time.time() + args.budget_s
    min_part = 5 if args.smoke else 60
    for index, (part, key) in enumerate(zip(parts, result_keys(parts))):
        left = deadline - time.time()
        if left < min_part:
            doc["results"][key] = {"skipped": f"budget: {left:.0f} s left of --budget-s {args.budget_s}"}
            continue
        part_file = out.with_name(f".{out.name}.{index}.part.json")
        part_file.unlink(missing_ok=True)
        name, own_settings = part_and_settings(part)
        cmd = [sys.executable, "-m", "bench.bench_vllm_gpu", "--part", name, "--part-out", str(part_file),
               "--deadline", str(deadline - 15), "--model", args.model] + (["--smoke"] if args.smoke else [])
        cmd += (["--overhead-size", args.overhead_size] if args.overhead_size else []) + ["--seed-mode", args.seed_mode]
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        cmd += ["--no-learner-profile"] * args.no_learner_profile
        cmd += [a for kv in args.set + own_settings for a in ("--set", kv)]
        print(f"=== {key} ({left:.0f} s left)", flush=True)
        t = time.time()
        error = None
        # Its own process group: at the budget the part is killed with everything it started
        # (Ray's processes, engine actors), so the next part finds the GPU free.
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=max(1.0, left - 5))
            if proc.returncode:
                error = f"exit {proc.returncode}: {one_line(err)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            error = f"killed at the budget after {time.time() - t:.0f} s: {one_line(err or '')}"
        sys.stderr.write((err or "")[-4000:])
        try:  # whatever the part left running (a lingering Ray process) goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        result = json.loads(part_file.read_text()) if part_file.exists() else {}
        part_file.unlink(missing_ok=True)
        result["wall_s"] = round(time.time() - t, 1)
        if error:
            result["error"] = error
        doc["results"][key] = result
        doc["summary"] = summarise(doc["results"])
        out.write_text(json.dumps(doc, indent=1))
    doc["summary"] = summarise(doc["results"])
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                    help="model.name: a builtin, a folder or a .gguf file")
    ap.add_argument("--parts", default="", help=f"comma-separated from {','.join(PARTS)}; default all but "
                    "step-placerl-2gpu; a step-placerl part may carry overrides of its own: NAME@KEY=VALUE@KEY=VALUE")
    ap.add_argument("--out", default="bench_vllm_gpu.json", help="the JSON, merged with what it already holds")
    ap.add_argument("--budget-s", type=float, default=540, help="wall-clock bound of this call, all parts together")
    ap.add_argument("--smoke", action="store_true", help="the tiny model and tiny sizes (a CPU check of every part)")
    ap.add_argument("--overhead-size", default="", help="the overhead part's PROMPTSxSAMPLESxTOKENS (default: "
                    "the first rollout batch and length; on a CPU e.g. 16x8x64)")
    ap.add_argument("--seed-mode", default="auto", choices=["auto", "request", "batch"],
                    help="rollout.seed_mode of the vLLM engines (auto: batch on a GPU, request on a CPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=Sizes.gpu_memory_utilization,
                    help="vLLM's share of the GPU in every part (the step parts: for placerl and TRL alike)")
    ap.add_argument("--no-learner-profile", action="store_true",
                    help="the placerl step parts skip their extra profiled step (a profiled step took 13-41 s on an H200)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for placerl's step parts, after each part's own (repeatable)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        run_part(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
