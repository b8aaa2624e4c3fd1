"""The merged path's merge alone, ``W' = W + scale * B @ A`` for every adapted module, on one device.

    python -m bench.bench_merge                          # Qwen2.5-0.5B's shapes, all-linear r=16, CUDA if present
    python -m bench.bench_merge --layers 2 --merges 3    # a quick look (CPU)
    python -m bench.bench_merge --out merge.json --profile

No engine and no learner: the base weights and the adapter's factors are random tensors of
the model's shapes (24 layers, hidden 896, intermediate 4864, 14 query / 2 KV heads of 64),
on the device, in the serving dtype, as the worker holds them after a CUDA IPC hand-over.
It times :class:`rl.rollout.merged.AdapterMerger` merge by merge (each ends with a device
synchronize, as the sync's stage clock does) and splits a merge into its parts:

  factors   the factors to float32 in one buffer, in merge order (``AdapterMerger.factors``);
  merge     all of it: factors, the batched ``W + scale * B @ A`` into the merger's results, the
            update's rounding error (one wait for the device at its end);
  merge_after_empty_cache   the same, with the allocator's cache emptied before it (untimed), as
            vLLM's sleep empties it between two syncs: what a merge still allocates shows here;
  write     the merged weights copied into a served model's parameters as vLLM lays them out
            (q/k/v fused, gate/up fused), all of them in one ``torch._foreach_copy_``.

``--profile`` adds torch.profiler's top operators of one merge (device and host time).
Medians over ``--merges`` merges after one warm-up, all in this one process.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.in_turns import medians_ms, report, time_in_turns
from rl.rollout.merged import AdapterMerger
from rl.rollout.sync import _A, _B, _PREFIX

QWEN_05B = dict(layers=24, hidden=896, intermediate=4864, q_heads=14, kv_heads=2, head_dim=64)


def qwen_like_modules(layers: int, hidden: int, intermediate: int, q_heads: int, kv_heads: int,
                      head_dim: int) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of a Qwen2/Llama decoder's seven linear projections per layer (pure)."""
    shapes = {"self_attn.q_proj": (q_heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, q_heads * head_dim),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in shapes.items()}


def random_adapter(modules: dict[str, tuple[int, int]], rank: int, dtype: torch.dtype, device: str,
                   seed: int = 0) -> tuple[dict, dict, dict]:
    """Base weights, PEFT-named factors (B non-zero) and a PEFT config dict (alpha = 2 x rank)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    base, tensors = {}, {}
    for m, (out, inp) in modules.items():
        base[f"{m}.weight"] = (torch.randn(out, inp, generator=g) * 0.02).to(device=device, dtype=dtype)
        tensors[f"{_PREFIX}{m}{_A}"] = (torch.randn(rank, inp, generator=g) * 0.01).to(device=device, dtype=dtype)
        tensors[f"{_PREFIX}{m}{_B}"] = (torch.randn(out, rank, generator=g) * 1e-3).to(device=device, dtype=dtype)
    return base, tensors, {"r": rank, "lora_alpha": 2 * rank}


def fused_destinations(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views, one per weight of ``base``, into parameters laid out as vLLM's Qwen2 holds them:
    q/k/v stacked in one ``qkv_proj``, gate/up in one ``gate_up_proj`` (pure)."""
    fused = {"q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
             "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj"))}
    out: dict[str, torch.Tensor] = {}
    for name, w in base.items():
        prefix, _, leaf = name[:-len(".weight")].rpartition(".")
        if any(leaf in members for _, members in fused.values()):
            if leaf not in fused:
                continue  # written with its first member
            members = fused[leaf][1]
            parts = [base[f"{prefix}.{m}.weight"] for m in members]
            param = torch.empty(sum(p.shape[0] for p in parts), w.shape[1], dtype=w.dtype, device=w.device)
            for m, view in zip(members, param.split([p.shape[0] for p in parts])):
                out[f"{prefix}.{m}.weight"] = view
        else:
            out[name] = torch.empty_like(w)
    return out


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, empty_cache: bool = False) -> float:
    _synchronize(device)
    if empty_cache and device.startswith("cuda"):
        torch.cuda.empty_cache()
    t = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - t


def top_operators(fn, device: str, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        _synchronize(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=QWEN_05B["layers"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--merges", type=int, default=10, help="timed merges, after one warm-up")
    ap.add_argument("--dtype", default="bfloat16", help="the serving dtype of the weights and factors")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one merge")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()

    modules = qwen_like_modules(**{**QWEN_05B, "layers": args.layers})
    base, tensors, peft_config = random_adapter(modules, args.rank, getattr(torch, args.dtype), args.device)
    merger = AdapterMerger(base, tensors, peft_config, device=args.device)
    merged = merger.merge(tensors)[0]
    destinations = fused_destinations(base)
    names = list(merged)
    parts = {"factors": lambda: merger.factors(tensors),
             "merge": lambda: merger.merge(tensors),
             "merge_after_empty_cache": lambda: merger.merge(tensors),
             "write": lambda: torch._foreach_copy_([destinations[n] for n in names], [merged[n] for n in names])}
    seconds = time_in_turns(parts, args.merges,
                            lambda name, fn: timed(fn, args.device, empty_cache=name.endswith("empty_cache")))
    report({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "modules": len(modules), "rank": args.rank, "dtype": args.dtype,
            "adapted_parameters": sum(o * i for o, i in modules.values()), "merges": args.merges,
            "medians": medians_ms(seconds), "all_ms": {k: [round(1e3 * x, 3) for x in v] for k, v in seconds.items()},
            "error": merger.merge(tensors)[1]}, args.out)
    if args.profile:
        print(top_operators(lambda: merger.merge(tensors), args.device))
        print(top_operators(parts["write"], args.device, rows=6))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
