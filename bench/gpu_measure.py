"""Measurement helpers of the GPU benchmarks: a result file rewritten as it grows, and the GPU's peak memory."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class Recorder:
    """A part's results, rewritten to its file after every measurement."""

    def __init__(self, path: str):
        self.path, self.data = Path(path), {}

    def __call__(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))
        print(f"[{key}] {json.dumps(value)}", flush=True)


def _nvml_handle(pynvml):
    """NVML's handle for this process's CUDA device 0. NVML numbers every GPU of the host and
    ignores CUDA_VISIBLE_DEVICES, so the first visible entry (an index or a UUID) picks it."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(first))
    if first.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(first)
    return pynvml.nvmlDeviceGetHandleByIndex(0)


class PeakMemory:
    """The GPU's peak used memory over all processes, sampled every 50 ms from this process."""

    def __init__(self):
        import torch

        self.peak, self._stop, self.ok = 0, threading.Event(), torch.cuda.is_available()
        self._read = None
        if self.ok:
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = _nvml_handle(pynvml)
                self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
            except Exception:  # no NVML binding: torch's view of the device (it opens a context)
                self._read = lambda: (lambda free, total: total - free)(*torch.cuda.mem_get_info(0))
            self.base = self._read()
            threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._read())

    def result(self) -> dict:
        self._stop.set()
        if not self.ok:
            return {"peak_gpu_used_gib": None, "note": "no CUDA device: not measured"}
        return {"peak_gpu_used_gib": round(self.peak / 2**30, 2), "before_run_gib": round(self.base / 2**30, 2)}


def device_name() -> str:
    """CUDA device 0's name, or "cpu"; informative only, so never an error."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # noqa: BLE001 - the name is informative only
        return f"unknown ({e})"
