"""Where a run's numbers go: JSONL (always), TensorBoard and W&B (when asked).

``metrics.jsonl`` is the record of truth: one JSON object per step, appended and
flushed, so a crashed run keeps every step it finished and a resumed one appends.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | Path, logging_cfg, config_dict: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        if logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; a broken env only loses TB
                self._tb = None
        if logging_cfg.wandb:
            import wandb

            self._wandb = wandb.init(project=logging_cfg.wandb_project, name=Path(run_dir).name,
                                     config=config_dict or {}, dir=str(run_dir), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        record = {"step": step, "time": time.time(), **{k: (v if math.isfinite(v) else str(v))
                                                        for k, v in clean.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def rewind(self, step: int) -> None:
        """Keep only the records of steps up to ``step`` (a resume goes back to its checkpoint;
        what was logged after it belongs to work that was lost and is done again). A line torn
        by a crash mid-write goes too. The file is replaced whole, never truncated in place."""
        import os

        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if _step_of(line) is not None and _step_of(line) <= step]
        self._fh.close()
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._fh = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
