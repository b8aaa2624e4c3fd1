"""The gradient diagnostics as a ``transformers.TrainerCallback``, for TRL and Trainer users.

Usage with TRL::

    cb = GradientDiagnosticsCallback(DiagnosticsConfig(enabled=True, every=10), trainer=None)
    trainer = GRPOTrainer(..., callbacks=[cb])
    cb.trainer = trainer          # optional: logs through the trainer (see below)
    trainer.train()               # metrics "diag/G/...", "diag/lora/..." appear in the logs

Where it hooks into Trainer's loop (transformers 5.x): ``on_step_begin`` runs before the
first micro-batch of an optimizer step (start accumulating G), ``on_pre_optimizer_step``
runs after the last backward (snapshot LoRA gradients), ``on_step_end`` after
``zero_grad`` (compute statistics). Trainer clips gradients *before*
``on_pre_optimizer_step``, so LoRA gradient norms seen here are the clipped ones; G is
rebuilt from activations and is never clipped. Ranks, cosines, signs and importance
shares do not depend on the common clipping factor. On an accelerator the statistics
run on a CPU thread and a capture's metrics are logged a few steps later, with
``diag/step`` naming the step they belong to; the last ones are flushed at train end.

Logging: with a TRL trainer (it keeps ``_metrics``) the values join TRL's own metrics
and are averaged over the logging interval like them; with any other bound trainer
they are sent through ``trainer.log``; with no trainer bound they are appended to
``state.log_history`` and added to the ``logs`` of the next ``on_log`` (seen by the
callbacks after this one). The end-of-run summary is written to
``<output_dir>/gradient_diagnostics.json`` by the main process.

Left out: DeepSpeed ZeRO (LoRA ``.grad`` is partitioned away), and evaluation loops.
"""
from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

from rl.config import DiagnosticsConfig
from rl.diagnostics.capture import GradientDiagnostics

SUMMARY_FILE = "gradient_diagnostics.json"


class GradientDiagnosticsCallback(TrainerCallback):
    """Runs :class:`rl.diagnostics.capture.GradientDiagnostics` inside a transformers Trainer loop."""

    def __init__(self, cfg: DiagnosticsConfig | None = None, trainer=None):
        self.cfg = cfg if cfg is not None else DiagnosticsConfig(enabled=True)
        self.trainer = trainer
        self.diagnostics: GradientDiagnostics | None = None
        self.metrics: dict[str, float] = {}  # the latest capture's metrics
        self.summary: dict | None = None
        self._step: int | None = None
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.cfg.enabled or model is None:
            return
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.diagnostics = GradientDiagnostics(model, self.cfg, all_reduce=dist.all_reduce if distributed else None)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.diagnostics is not None:
            self._step = state.global_step
            self.diagnostics.begin_step(self._step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.diagnostics is not None and self._step is not None:
            self.diagnostics.after_backward(self._step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.diagnostics is None or self._step is None:
            return
        # On an accelerator a capture's metrics arrive at a later step (diag/step names it).
        metrics = self.diagnostics.end_step(self._step)
        self._step = None
        if metrics:
            self.metrics = metrics
            self._emit(metrics, state)

    def _emit(self, metrics: dict[str, float], state) -> None:
        store = getattr(self.trainer, "_metrics", None)
        if isinstance(store, dict) and "train" in store:
            for k, v in metrics.items():
                store["train"][k].append(v)
        elif self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": state.global_step})
            self._pending.update(metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        if self.diagnostics is None:
            return
        last = self.diagnostics.flush()
        if last:
            self.metrics = last
            if self.trainer is not None:
                self.trainer.log(dict(last))
            else:
                state.log_history.append({**last, "step": state.global_step})
        self.summary = self.diagnostics.summary()
        if state.is_world_process_zero and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, SUMMARY_FILE), "w") as f:
                json.dump(self.summary, f, indent=1)
        self.diagnostics.close()
