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

What a capture's numbers are, and the bounded host-side history behind cross-step
statistics, is ``rl.diagnostics.capture_stats.CaptureStatistics``; the maths is ``rl.diagnostics.tensor_stats``.

Where the statistics run: in place when G lives on the CPU, so a capture's numbers
come back from its own ``end_step``. When G lives on an accelerator,
``end_step`` only copies G on the device and forms its Gram matrices (milliseconds);
a worker thread then does the rest on a side stream (eigenvalues, and the cross-step
arithmetic against the history, which stays on the host) and the metrics come back
from a later ``end_step``/``poll``/``flush``, with ``diag/step`` naming the capture
(``background=False`` forces in place). On an H100 with SmolLM2-135M (a 0.2 s step,
60 modules watched) the worker needs about 0.3 s per capture; in the training thread
that alone would cost 15% at every=10. Host CPU threads doing that work in parallel
were no better: they slowed the launch-bound training thread down more than they saved.
At most one capture is in flight: a slow worker slows training instead of queueing.

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
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from rl.diagnostics import tensor_stats
from rl.config import ConfigError, DiagnosticsConfig
from rl.diagnostics.capture_stats import CaptureStatistics


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


def _to_cpu_copy(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # FSDP2 DTensor gradient: gather the shards (collective)
        t = t.full_tensor()
    return t.detach().to("cpu", dtype=torch.float32, copy=True)


class GradientDiagnostics:
    """Captures G and LoRA gradients of selected layers every ``cfg.every`` steps (see module docstring).

    Per step: ``begin_step(step)`` before the first forward, ``after_backward(step)``
    after the last backward (before clipping and ``zero_grad``), ``end_step(step)``
    once the step is over; it returns the flat metrics that are ready (see the module
    docstring for when). ``summary()`` at the end, then ``close()``.
    """

    def __init__(self, model: nn.Module, cfg: DiagnosticsConfig,
                 all_reduce: Callable[[torch.Tensor], object] | None = None, *,
                 world_size: int | None = None, persistent_hooks: bool = False,
                 background: bool | None = None):
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
        self.stats = CaptureStatistics(cfg.lags, cfg.window, cfg.max_rank_dim)
        self._background = background
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._side_stream = None
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

    def _sizes(self) -> list[int]:
        return [o * i for o, i in self._shapes.values()]

    def _accumulator(self, name: str, device: torch.device) -> torch.Tensor:
        if self._buffer is None or self._buffer.device != device:
            self._buffer = torch.zeros(sum(self._sizes()), dtype=torch.float32, device=device)
            views = torch.split(self._buffer, self._sizes())
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
        """Finish a capture (reduce G, compute or queue its statistics) and return the
        metrics that are ready: this capture's when computed in place, else any finished
        background capture's (``diag/step`` says which); ``{}`` when none is."""
        ready = self.poll()
        if self._capturing != step:
            return ready
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
        lora, self._lora = self._lora, {}
        if self._background is None:
            self._background = self._buffer.device.type == "cuda"
        if not self._background:
            ready.update(self.stats.add(step, self._G, lora))
            return ready
        # One copy to CPU; the spectra and history then run on a CPU thread while the
        # accelerator trains on. One capture in flight at most: a slow worker slows
        # training down instead of queueing captures without bound.
        # On the accelerator, in this thread: a copy of G (the buffer is reused by the next
        # capture) and the Gram matrices of the exact path (milliseconds). On a side stream,
        # in the worker thread: the eigenvalues (cuSOLVER: 6 ms for 576 x 576 on an H100,
        # 20 ms in LAPACK on its host) and the cross-step arithmetic against the history,
        # which stays on the host. Host CPU threads working in parallel slowed the
        # launch-bound training thread down by more than the statistics cost.
        snapshot = self._buffer.clone()
        grams = {n: tensor_stats.gram(g) for n, g in self._G.items()
                 if tensor_stats.uses_exact_path(g.shape, self.cfg.max_rank_dim)}
        ready_event = None
        if snapshot.device.type == "cuda":
            ready_event = torch.cuda.Event()
            ready_event.record()
        ready.update(self.flush())
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grad-diagnostics")
        self._pending = self._worker.submit(self._background_add, step, snapshot, grams, lora, ready_event)
        return ready

    def _background_add(self, step: int, snapshot: torch.Tensor, grams: dict[str, torch.Tensor],
                        lora: dict, ready_event) -> dict[str, float]:
        def add() -> dict[str, float]:
            G = {n: v.view(*self._shapes[n]) for n, v in zip(self._shapes, torch.split(snapshot, self._sizes()))}
            return self.stats.add(step, G, lora, grams)

        if ready_event is None:
            return add()
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=snapshot.device)
        with torch.cuda.stream(self._side_stream):
            self._side_stream.wait_event(ready_event)
            return add()

    def poll(self) -> dict[str, float]:
        """The background capture's metrics if it has finished, else ``{}`` (never waits)."""
        if self._pending is None or not self._pending.done():
            return {}
        return self.flush()

    def flush(self) -> dict[str, float]:
        """Wait for the background capture, if any, and return its metrics."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else {}

    def cancel(self) -> None:
        """Abandon the capture in progress without computing anything."""
        self._capturing = None
        self._lora = {}
        if not self._persistent:
            self._remove()

    def captured_G(self) -> dict[str, torch.Tensor]:
        """The last capture's G per module (reduced); views of a buffer the next capture overwrites."""
        return dict(self._G)

    @property
    def series(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric over the captures so far (background captures once finished)."""
        return self.stats.series

    def summary(self) -> dict:
        """The run so far (waits for a background capture): see CaptureStatistics.summary."""
        self.flush()
        return {**self.stats.summary(), "modules": list(self.modules)}

    def close(self) -> None:
        """Wait for background work, remove hooks, drop buffers and history."""
        self.flush()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        self._remove()
        self._capturing = None
        self._buffer, self._G, self._lora = None, {}, {}
        self.stats.close()


# ----------------------------------------------------------------------------- the learner's seam

def attach_to_learner(peft_model: nn.Module, cfg) -> list[Callable[[int], dict[str, float]]]:
    """``rl.learner.rank``'s diagnostics seam: called on every rank before ``fully_shard``.

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
        else:
            metrics = self.diag.poll()
        if self.update + 1 >= self.updates:  # the next call is the first update of the next step
            self.diag.begin_step(step + 1)
        return metrics
