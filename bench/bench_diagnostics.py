"""Gradient-diagnostics overhead: training-step time with and without them, in one run.

    python -m bench.bench_diagnostics                          # SmolLM2-135M-Instruct, LoRA r=8 all-linear
    python -m bench.bench_diagnostics --model smollm2-shape    # same architecture, random weights
    python -m bench.bench_diagnostics --blocks 5               # also time whole cadence blocks

A step is what the learner does: forward + backward of a batch (default 8 sequences x
256 tokens, causal-LM loss), clip, AdamW on the LoRA parameters (bf16 autocast on CUDA).
One model and one optimizer serve every variant, and the variants are interleaved step
by step (off, capture, idle, idle-persistent, then the next round), so that drift in the
machine's speed hits them alike; every figure is a median over rounds.

  off              no diagnostics object is called
  capture          a capture step: G hooks, LoRA snapshot, statistics and history
  idle             a non-capture step with diagnostics attached (hooks are removed between captures)
  idle-persistent  the same with hooks kept registered and returning early (the alternative design)

Printed ratios: every=k costs ((k-1) idle + capture) / (k off) per step; goal < 1.10 at the
default cadence (every=10). ``--blocks N`` also runs N rounds of whole 10-step blocks (off,
every=10, every=1) and prints their measured ratios, a direct check of the formula. On an
accelerator the statistics run on a CPU worker thread (rl/diagnostics/capture.py); the per-step
rows then wait for it untimed after each capture and report that wait, and a block's time
includes waiting for its own captures' statistics, so the blocks are the figure to trust there.
``smollm2-shape`` builds the SmolLM2-135M architecture with random weights, for hosts
without the model package: step cost does not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from core.lora import DEFAULT_TARGET_MODULES
from rl.config import DiagnosticsConfig
from rl.diagnostics.capture import GradientDiagnostics

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def build(model: str, rank: int, device: torch.device):
    from peft import LoraConfig, get_peft_model

    if model == "smollm2-shape":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    else:
        from core.models import load_model, resolve_model

        base = load_model(resolve_model(model), "float32")
    base.config.use_cache = False
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_TARGET_MODULES)))
    return peft.to(device)


class Stepper:
    def __init__(self, model, ids: torch.Tensor, device: torch.device):
        self.model, self.ids, self.device = model, ids, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step(self, diag: GradientDiagnostics | None = None, n: int = 0) -> dict[str, float]:
        t0 = self._sync()
        if diag is not None:
            diag.begin_step(n)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        t1 = self._sync()
        if diag is not None:
            diag.after_backward(n)
        t2 = self._sync()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = self._sync()
        if diag is not None:
            diag.end_step(n)
        t4 = self._sync()
        return {"total": t4 - t0, "fwd_bwd": t1 - t0, "snapshot": t2 - t1, "optim": t3 - t2, "stats": t4 - t3}


def med(rows: list[dict], key: str = "total") -> float:
    return statistics.median(r[key] for r in rows)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=0, help="rounds of whole 10-step cadence blocks")
    ap.add_argument("--every", type=int, default=DiagnosticsConfig.every)
    ap.add_argument("--max-rank-dim", type=int, default=DiagnosticsConfig.max_rank_dim)
    ap.add_argument("--modules", default=",".join(DiagnosticsConfig().modules))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args()


def interleaved_rounds(st: Stepper, diag: GradientDiagnostics, model, cfg, rounds: int):
    """Per round one step of each kind (off, capture, idle, idle with persistent hooks), after a
    warm-up that fills the history window; the step timings per kind and the flush waits."""
    # Warm-up: kernels, allocator, and a full history window so captures run at steady state.
    st.step()
    for i in range(cfg.window + 1):
        st.step(diag, i * cfg.every)
    captures = cfg.window + 1
    diag.flush()
    rows: dict[str, list[dict]] = {"off": [], "capture": [], "idle": [], "idle-persistent": []}
    waits: list[float] = []
    for r in range(rounds):
        rows["off"].append(st.step())
        rows["capture"].append(st.step(diag, captures * cfg.every))
        t = time.perf_counter()
        diag.flush()  # untimed: the next steps must not share the CPU with the worker
        waits.append(time.perf_counter() - t)
        captures += 1
        if cfg.every > 1:  # every=1 has no idle steps
            rows["idle"].append(st.step(diag, captures * cfg.every + 1))
            persistent = GradientDiagnostics(model, cfg, persistent_hooks=True)
            rows["idle-persistent"].append(st.step(persistent, 1))
            persistent.close()
        else:
            rows["idle"].append(rows["off"][-1])
            rows["idle-persistent"].append(rows["off"][-1])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]['total']:.3f}s" for k, v in rows.items()),
              flush=True)
    return rows, waits


def print_ratios(rows: dict, waits: list[float], diag: GradientDiagnostics, cfg, rounds: int) -> None:
    off, cap, idle, pers = (med(rows[k]) for k in ("off", "capture", "idle", "idle-persistent"))
    print(f"\nstep time medians over {rounds} interleaved rounds: off {off:.4f}s  capture {cap:.4f}s  "
          f"idle {idle:.4f}s  idle-persistent {pers:.4f}s")
    print("capture step breakdown (medians): " + "  ".join(
        f"{k} {med(rows['capture'], k):.4f}s (off {med(rows['off'], k):.4f}s)"
        for k in ("fwd_bwd", "snapshot", "optim", "stats")))
    if diag._background:
        print(f"statistics ran on a CPU worker; still running when the capture step ended: median "
              f"{statistics.median(waits):.4f}s more (not in the ratios below; the measured blocks include it)")
    print(f"idle hooks: removed {idle / off:.4f}x off, persistent {pers / off:.4f}x off")
    for k in sorted({cfg.every, 10, 1}, reverse=True):
        ratio = ((k - 1) * idle + cap) / (k * off)
        goal = "  (goal < 1.10: " + ("met" if ratio < 1.10 else "NOT met") + ")" if k == 10 else ""
        print(f"overhead ratio every={k}: {ratio:.4f}{goal}")


def measured_blocks(st: Stepper, model, cfg, n_blocks: int) -> None:
    """Whole 10-step blocks off, at every=10 and at every=1, interleaved; their median times."""
    d10 = GradientDiagnostics(model, DiagnosticsConfig(**{**cfg.__dict__, "every": 10}))
    d1 = GradientDiagnostics(model, DiagnosticsConfig(**{**cfg.__dict__, "every": 1}))
    blocks: dict[str, list[float]] = {"off": [], "every=10": [], "every=1": []}
    n10 = n1 = 0
    for _ in range(cfg.window):  # d10's history full before timing, like the main run
        st.step(d10, n10)
        n10 += 10
    d10.flush()

    def block(d: GradientDiagnostics | None, start: int) -> float:
        total = sum(st.step(d, start + i)["total"] for i in range(10))
        t = time.perf_counter()
        if d is not None:
            d.flush()  # a block owns its own captures' statistics, finished
        return total + time.perf_counter() - t

    for b in range(n_blocks):
        blocks["off"].append(block(None, 0))
        blocks["every=10"].append(block(d10, n10))
        blocks["every=1"].append(block(d1, n1))
        n10, n1 = n10 + 10, n1 + 10
    base = statistics.median(blocks["off"])
    print(f"\nmeasured 10-step blocks ({n_blocks} interleaved rounds, medians): off {base:.3f}s; " + "; ".join(
        f"{k} {statistics.median(v):.3f}s = {statistics.median(v) / base:.4f}x" for k, v in blocks.items() if k != "off"))
    d10.close()
    d1.close()


def main() -> None:
    a = parse_args()
    device = torch.device(a.device)
    model = build(a.model, a.rank, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g).to(device)
    st = Stepper(model, ids, device)
    cfg = DiagnosticsConfig(enabled=True, every=a.every, modules=a.modules.split(","), max_rank_dim=a.max_rank_dim)
    diag = GradientDiagnostics(model, cfg)
    print(f"model={a.model} device={device} batch={a.batch}x{a.seq} lora r={a.rank} all-linear; "
          f"diagnostics every={cfg.every} modules={cfg.modules} max_rank_dim={cfg.max_rank_dim} "
          f"lags={cfg.lags} window={cfg.window}; {len(diag.modules)} modules watched", flush=True)
    rows, waits = interleaved_rounds(st, diag, model, cfg, a.rounds)
    print_ratios(rows, waits, diag, cfg, a.rounds)
    if a.blocks:
        measured_blocks(st, model, cfg, a.blocks)
    diag.close()


if __name__ == "__main__":
    main()
