"""Gradient diagnostics for LoRA training: what to capture, when, and the history it needs.

``GradientDiagnostics`` watches a chosen set of PEFT LoRA layers and, every
``cfg.every`` optimizer steps, captures two gradients per layer:

- the LoRA gradients (``lora_A``/``lora_B`` ``.grad``), snapshot after backward;
- the rank-free gradient of the FROZEN base weight, ``G = sum_tokens grad_out^T x``,
  rebuilt from a forward hook on the layer's ``base_layer`` (which keeps ``x``) and a
  tensor hook on its output (which sees ``grad_out``). ``dL/dB = s G A^T`` has rank at
  most r and cannot show a rank contrast; G can. G accumulates over every micro-batch
  between ``begin_step`` and ``end_step``, exactly as ``weight.grad`` would if the
  weight were trainable; with ``all_reduce`` it is summed over data-parallel ranks and
  divided by the world size, matching DDP/FSDP's averaged gradients.

The statistics themselves are pure functions in ``rl.gradstats``. Only the history
that cross-step statistics need is kept, on CPU: the last ``lags`` gradients (float32)
for cosines and the last ``window`` sign tensors (int8) plus their running sum.

Hooks exist only during capture steps by default (register in ``begin_step``, remove
in ``end_step``), so non-capture steps run the model untouched;
``persistent_hooks=True`` keeps them registered and returns early instead (a compiled
model should not see its hooks change).

FSDP2: ``fully_shard`` may be applied after construction; it does not replace the
``base_layer`` modules the hooks live on, and activations seen by the hooks are plain
local tensors. LoRA gradients are then DTensors: they are gathered with
``full_tensor()`` (a collective, so every rank must call ``after_backward`` on capture
steps). That is the cheap correct choice: LoRA gradients are r x d, and the spectra
need the whole matrix anyway. Every rank then computes the same numbers.

Left out on purpose: the LoRA gradient of a DeepSpeed/ZeRO-partitioned model (its
``.grad`` is not populated), embeddings and convolutions, and DoRA's magnitude vector.
"""
from __future__ import annotations

import functools
import math
import re
from collections import defaultdict, deque
from typing import Callable

import torch
from torch import nn

from rl import gradstats
from rl.config import ConfigError, DiagnosticsConfig

_LAYER_RE = re.compile(r"(?:^|\.)(layers\.\d+)\.")


def _short_name(name: str) -> str:
    """``base_model.model.model.layers.3.mlp.down_proj`` -> ``layers.3.mlp.down_proj``."""
    m = re.search(r"(?:^|\.)(layers\.\d+\..*)$", name)
    if m:
        return m.group(1)
    return name.removeprefix("base_model.model.")


def _is_lora_linear(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and len(m.lora_A) > 0
            and hasattr(getattr(m, "base_layer", None), "in_features"))


def select_lora_modules(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """The LoRA linear layers whose names end with one of ``patterns``, by short name."""
    lora = {n: m for n, m in model.named_modules() if _is_lora_linear(m)}
    if not lora:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(f"diagnostics needs a PEFT LoRA model but no LoRA linear layer was found "
                          f"(module classes present: {', '.join(kinds[:12])}); wrap it with peft.get_peft_model first")
    types = sorted({n.rsplit(".", 1)[-1] for n in lora})
    chosen: dict[str, nn.Module] = {}
    for pat in patterns:
        hits = {n: m for n, m in lora.items() if n == pat or n.endswith("." + pat)}
        if not hits:
            raise ConfigError(f"diagnostics.modules entry {pat!r} matches no LoRA layer; "
                              f"LoRA module types in this model: {', '.join(types)}")
        chosen.update({_short_name(n): m for n, m in hits.items()})
    return dict(sorted(chosen.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _layer_of(short: str) -> str:
    m = _LAYER_RE.search(short + ".")
    return m.group(1) if m else short


def _to_cpu_copy(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # FSDP2 DTensor gradient: gather the shards (collective)
        t = t.full_tensor()
    return t.detach().to("cpu", dtype=torch.float32, copy=True)


class _CrossStepHistory:
    """The bounded past of one gradient: cosines need values, sign statistics need signs."""

    def __init__(self, lags: int, window: int):
        self.past: deque[torch.Tensor] = deque(maxlen=lags)
        self.signs: deque[torch.Tensor] = deque(maxlen=window)
        self.sign_sum: torch.Tensor | None = None

    def update(self, flat: torch.Tensor) -> dict[str, float]:
        out = {f"cos_lag{k}": gradstats.cosine(flat, self.past[-k]) for k in range(1, len(self.past) + 1)}
        sign = torch.sign(flat).to(torch.int8)
        if self.signs:
            out["sign_agree"] = gradstats.sign_agreement(sign, self.signs[-1])
        if self.sign_sum is None:
            self.sign_sum = torch.zeros(sign.shape, dtype=torch.int16)
        if len(self.signs) == self.signs.maxlen:
            self.sign_sum -= self.signs[0]
        self.signs.append(sign)
        self.sign_sum += sign
        if len(self.signs) == self.signs.maxlen:  # only full windows: E|sum sign|/T depends on T
            out["sign_consistency"] = gradstats.sign_consistency_from_sum(self.sign_sum, len(self.signs))
        self.past.append(flat)
        return out


class GradientDiagnostics:
    """Captures G and LoRA gradients of selected layers every ``cfg.every`` steps (see module docstring).

    Per step: ``begin_step(step)`` before the first forward, ``after_backward(step)``
    after the last backward (before clipping and ``zero_grad``), ``end_step(step)``
    once the step is over; it returns flat metrics for capture steps and ``{}`` otherwise.
    """

    def __init__(self, model: nn.Module, cfg: DiagnosticsConfig,
                 all_reduce: Callable[[torch.Tensor], object] | None = None, *,
                 world_size: int | None = None, persistent_hooks: bool = False):
        self.cfg = cfg
        self._all_reduce = all_reduce
        if world_size is None:
            dist = torch.distributed
            world_size = (dist.get_world_size() if all_reduce is not None and dist.is_available()
                          and dist.is_initialized() else 1)
        self._world = world_size
        self._persistent = persistent_hooks
        self.modules = select_lora_modules(model, list(cfg.modules)) if cfg.enabled else {}
        self._shapes = {n: (m.base_layer.out_features, m.base_layer.in_features) for n, m in self.modules.items()}
        self._buffer: torch.Tensor | None = None  # all G accumulators in one flat buffer: one all_reduce
        self._G: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._capturing: int | None = None
        self._lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._history: dict[tuple[str, str], _CrossStepHistory] = {}
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._layer_norm_sum: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.captures: list[int] = []
        if persistent_hooks:
            self._register()

    # ------------------------------------------------------------------ hooks
    def _register(self) -> None:
        if self._handles:
            return
        for name, m in self.modules.items():
            self._handles.append(m.base_layer.register_forward_hook(functools.partial(self._on_forward, name)))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor):
        if self._capturing is None or not torch.is_grad_enabled():
            return None
        hook = functools.partial(self._on_grad_out, name, args[0].detach())
        if output.requires_grad:
            output.register_hook(hook)
            return None
        # Nothing upstream needs a gradient (e.g. layer 0 with a frozen embedding), so
        # autograd would never compute dL/d(output); a leaf that requires grad makes it
        # do so without changing any value or any other gradient.
        leaf = output.detach().requires_grad_()
        leaf.register_hook(hook)
        return leaf

    def _on_grad_out(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        acc = self._accumulator(name, grad.device)
        d_out, d_in = acc.shape
        acc.addmm_(grad.reshape(-1, d_out).T.float(), x.reshape(-1, d_in).float())

    def _accumulator(self, name: str, device: torch.device) -> torch.Tensor:
        if self._buffer is None or self._buffer.device != device:
            sizes = [o * i for o, i in self._shapes.values()]
            self._buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
            views = torch.split(self._buffer, sizes)
            self._G = {n: v.view(*self._shapes[n]) for n, v in zip(self._shapes, views)}
        return self._G[name]

    # ------------------------------------------------------------------ step API
    def begin_step(self, step: int) -> bool:
        """Whether ``step`` is a capture step; if so, start accumulating G."""
        if not self.cfg.enabled or step % self.cfg.every != 0:
            return False
        self._capturing = step
        self._lora = {}
        if self._buffer is not None:
            self._buffer.zero_()
        self._register()
        return True

    def after_backward(self, step: int) -> None:
        """Snapshot the LoRA gradients (call once all micro-batches are backpropagated)."""
        if self._capturing != step:
            return
        snap = {}
        for name, m in self.modules.items():
            parts = []
            for key in m.lora_A:
                if key not in m.lora_B or not m.lora_A[key].weight.requires_grad:
                    continue
                for p in (m.lora_A[key].weight, m.lora_B[key].weight):
                    parts.append(torch.zeros(p.shape) if p.grad is None else _to_cpu_copy(p.grad))
            if parts:  # several trainable adapters are stacked along rank: dA rows, dB columns
                snap[name] = (torch.cat(parts[0::2], 0), torch.cat(parts[1::2], 1))
        self._lora = snap

    def end_step(self, step: int) -> dict[str, float]:
        """Finish a capture: reduce G, compute statistics, update history; {} off capture steps."""
        if self._capturing != step:
            return {}
        self._capturing = None
        if not self._persistent:
            self._remove()
        if self._buffer is None:
            raise RuntimeError("diagnostics captured no activations on this step: the selected LoRA layers "
                               "never ran forward with gradients enabled between begin_step and end_step")
        if self._all_reduce is not None:
            out = self._all_reduce(self._buffer)
            if isinstance(out, torch.Tensor) and out is not self._buffer:
                self._buffer.copy_(out)
            if self._world > 1:
                self._buffer /= self._world
        per_module: dict[str, dict[str, dict[str, float]]] = {"G": {}, "lora": {}}
        for name, g in self._G.items():
            per_module["G"][name] = self._matrix_stats("G", name, g, g)
        for name, (da, db) in self._lora.items():
            stats = self._matrix_stats("lora", name, db, torch.cat([da.reshape(-1), db.reshape(-1)]))
            sa = gradstats.spectrum(da, self.cfg.max_rank_dim)
            stats.update(norm_A=gradstats.frobenius_norm(da), norm_B=gradstats.frobenius_norm(db),
                         eff_rank_A=gradstats.effective_rank(sa), stable_rank_A=gradstats.stable_rank(sa))
            per_module["lora"][name] = stats
        self._lora = {}
        metrics = {}
        for kind, mods in per_module.items():
            if mods:
                metrics.update(self._flatten(kind, mods))
        self.captures.append(step)
        for k, v in metrics.items():
            self.series[k].append((step, v))
        return metrics

    def cancel(self) -> None:
        """Abandon the capture in progress without computing anything."""
        self._capturing = None
        self._lora = {}
        if not self._persistent:
            self._remove()

    def captured_G(self) -> dict[str, torch.Tensor]:
        """The last capture's G per module (reduced); views of a buffer the next capture overwrites."""
        return dict(self._G)

    def _matrix_stats(self, kind: str, name: str, mat: torch.Tensor, flat: torch.Tensor) -> dict[str, float]:
        """Spectrum of ``mat`` on its own device; cross-step statistics of ``flat`` on CPU."""
        sp = gradstats.spectrum(mat, self.cfg.max_rank_dim)
        stats = {"norm": math.sqrt(sp.fro_sq), "eff_rank": gradstats.effective_rank(sp),
                 "stable_rank": gradstats.stable_rank(sp)}
        hist = self._history.get((kind, name))
        if hist is None:
            hist = self._history[(kind, name)] = _CrossStepHistory(self.cfg.lags, self.cfg.window)
        flat_cpu = flat.detach().reshape(-1).to("cpu", dtype=torch.float32, copy=True)
        if kind == "lora":  # the norm of a LoRA gradient covers both factors
            stats["norm"] = float(flat_cpu.double().norm())
        stats.update(hist.update(flat_cpu))
        return stats

    def _flatten(self, kind: str, mods: dict[str, dict[str, float]]) -> dict[str, float]:
        """Per-module, per-type and overall metrics, plus layer importance, as flat keys."""
        out: dict[str, float] = {}
        by_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        overall: dict[str, list[float]] = defaultdict(list)
        layer_sq: dict[str, float] = defaultdict(float)
        for name, stats in mods.items():
            mtype = name.rsplit(".", 1)[-1]
            for stat, v in stats.items():
                out[f"diag/{kind}/{name}/{stat}"] = v
                by_type[mtype][stat].append(v)
                overall[stat].append(v)
            layer_sq[_layer_of(name)] += stats["norm"] ** 2
        if len(by_type) > 1:
            for mtype, stats in by_type.items():
                out.update({f"diag/{kind}/{mtype}/{s}_mean": _nanmean(v) for s, v in stats.items()})
        out.update({f"diag/{kind}/{s}_mean": _nanmean(v) for s, v in overall.items()})
        norms = {layer: math.sqrt(sq) for layer, sq in layer_sq.items()}
        for layer, n in norms.items():
            self._layer_norm_sum[kind][layer] += n
        if len(norms) > 1:
            imp = gradstats.importance(norms)
            out.update({f"diag/{kind}/{layer}/importance": s for layer, s in imp.shares.items()})
            out[f"diag/{kind}/importance_spread"] = imp.spread
            out[f"diag/{kind}/importance_top30_share"] = imp.top_share
        return out

    # ------------------------------------------------------------------ run level
    def summary(self) -> dict:
        """The run so far: per metric mean/min/max/first/last over captures, and run-level importance."""
        metrics = {}
        for key, pts in self.series.items():
            vals = [v for _, v in pts if not math.isnan(v)]
            if vals:
                metrics[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                                "first": vals[0], "last": vals[-1], "n": len(vals)}
        run_importance = {}
        for kind, sums in self._layer_norm_sum.items():
            if len(sums) > 1 and sum(sums.values()) > 0:
                imp = gradstats.importance(dict(sums))
                run_importance[kind] = {"shares": imp.shares, "spread": imp.spread, "top30_share": imp.top_share}
        return {"captures": list(self.captures), "modules": list(self.modules),
                "metrics": metrics, "importance_run": run_importance}

    def close(self) -> None:
        """Remove hooks and drop buffers and history."""
        self._remove()
        self._capturing = None
        self._buffer, self._G, self._lora = None, {}, {}
        self._history.clear()


def _nanmean(vals: list[float]) -> float:
    ok = [v for v in vals if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else float("nan")


# ----------------------------------------------------------------------------- the learner's seam

def attach_to_learner(peft_model: nn.Module, cfg) -> list[Callable[[int], dict[str, float]]]:
    """``rl.learner_rank``'s diagnostics seam: called on every rank before ``fully_shard``.

    The seam only calls back after the last backward of each update (``fn(step)``, the
    same ``step`` for each of the ``learner.updates_per_batch`` updates of one batch), so
    the hooks for a capture are armed at the end of the call before it. The learner
    sums gradients over ranks (its FSDP divide factor is 1: the loss pieces are
    normalised by global counts), so G is summed over ranks too, not averaged.
    """
    if not cfg.diagnostics.enabled:
        return []
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    diag = GradientDiagnostics(peft_model, cfg.diagnostics,
                               all_reduce=dist.all_reduce if distributed else None, world_size=1)
    return [_UpdateClock(diag, cfg.learner.updates_per_batch)]


class _UpdateClock:
    """Turns after-backward calls into begin/after/end calls; captures the first update of a step."""

    def __init__(self, diag: GradientDiagnostics, updates_per_batch: int):
        self.diag, self.updates = diag, updates_per_batch
        self.last_step: int | None = None
        self.update = 0
        # The very first update is always armed: its step number (0, or later after a
        # resume) is only known when the first call arrives.
        diag.begin_step(0)

    def __call__(self, step: int) -> dict[str, float]:
        self.update = self.update + 1 if step == self.last_step else 0
        first_call = self.last_step is None
        self.last_step = step
        metrics = {}
        if self.update == 0:
            if first_call and self.diag._capturing is not None:
                if step % self.diag.cfg.every == 0:
                    self.diag._capturing = step  # the armed capture belongs to this step
                else:
                    self.diag.cancel()
            self.diag.after_backward(step)
            metrics = self.diag.end_step(step)
        if self.update + 1 >= self.updates:  # the next call is the first update of the next step
            self.diag.begin_step(step + 1)
        return metrics
