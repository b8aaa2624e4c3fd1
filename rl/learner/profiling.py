"""One learner step under torch's profiler: where the step's time goes, per kernel class.

``learner.profile_step: N`` runs each rank's N-th train step (1-based) under
``torch.profiler``; the rank writes ``<learner.profile_dir>/learner-step-N-rank-R.json`` (the
summary below) and ``.txt`` (torch's own table), and with ``learner.profile_trace`` a Chrome
trace for Perfetto. The trainer points ``profile_dir`` at ``<run>/profile`` unless it is set.

The summary answers the first questions about a slow step:
- ``device_busy_s`` against ``wall_s``: how much of the step the GPU computed at all (a low
  share means the step waits on the host: Python, kernel launches, transfers);
- ``by_class``: kernel time per class (matmuls, attention, elementwise and reductions, copies,
  the optimizer, collectives), and ``top_kernels`` / ``top_host_ops`` by their own time.
The profiler adds host work per operator, so a profiled step is slower than the others: compare
shares within it, and time steps without it. Summarising takes time too, inside the step's call:
on an H200 a 0.5B model's step of about 57,000 kernels took 5-6 s under the profiler and about
25 s more to summarise (reports/gpu/README.md section 12).
"""
from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# First match wins; a kernel's name says what it computes (cuBLAS/CUTLASS gemm names, SDPA's
# flash or memory-efficient kernels, PyTorch's elementwise and reduce templates, ...).
KERNEL_CLASSES = (
    ("collective", r"nccl"),
    ("attention", r"flash|fmha|attention|attn"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("matmul", r"gemm|cutlass|nvjet|cublas|sm\d\d_xmma|splitk|matmul"),
    ("copy", r"memcpy|memset|copy|cat|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|reduce|softmax|norm|unrolled"),
)
TOP = 25


def kernel_class(name: str) -> str:
    """The class of a GPU kernel from its name (pure); "other" when none matches."""
    lower = name.lower()
    return next((cls for cls, pattern in KERNEL_CLASSES if re.search(pattern, lower)), "other")


def summarize(rows, wall_s: float) -> dict:
    """The step's summary from ``(name, count, self host s, self device s, is kernel)`` rows
    (pure; :func:`profile_rows` reads them from a profiler)."""
    kernels = [r for r in rows if r[4]]
    busy = sum(r[3] for r in kernels)
    by_class: dict[str, float] = {}
    for name, _, _, device_s, _ in kernels:
        cls = kernel_class(name)
        by_class[cls] = by_class.get(cls, 0.0) + device_s
    host = [r for r in rows if not r[4]]
    return {
        "wall_s": round(wall_s, 4),
        "device_busy_s": round(busy, 4),
        "device_busy_share": round(busy / wall_s, 4) if wall_s > 0 and kernels else None,
        "kernel_launches": sum(r[1] for r in kernels),
        "by_class": {k: round(v, 4) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "calls": c, "device_s": round(d, 4), "class": kernel_class(n)}
                        for n, c, _, d, _ in sorted(kernels, key=lambda r: -r[3])[:TOP]],
        "top_host_ops": [{"name": n[:120], "calls": c, "self_host_s": round(h, 4)}
                         for n, c, h, _, _ in sorted(host, key=lambda r: -r[2])[:TOP]],
    }


def profile_rows(events) -> list[tuple]:
    """``(name, count, self host s, self device s, is kernel)`` per entry of ``key_averages()``.

    Ranges that code marks on the GPU's timeline (FSDP2's ``FSDP::pre_forward``, the
    optimizer's step) are left out: their device time is that of the kernels inside them.
    The same ranges on the host stay: their own time there is the Python around the ops."""
    rows = []
    for e in events:
        kernel = str(getattr(e, "device_type", "")).endswith("CUDA")
        if kernel and getattr(e, "is_user_annotation", False):
            continue
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:  # older torch
            device_us = getattr(e, "self_cuda_time_total", 0)
        rows.append((e.key, int(e.count), e.self_cpu_time_total / 1e6, device_us / 1e6, kernel))
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def profiled_step(learner_cfg, step: int, rank: int, device: torch.device):
    """Profile this block when ``step`` is ``learner_cfg.profile_step``; otherwise do nothing."""
    if not learner_cfg.profile_step or step != learner_cfg.profile_step:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _synchronize(device)  # earlier work stays out of the window
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
        _synchronize(device)
    wall = time.perf_counter() - t
    folder = Path(learner_cfg.profile_dir or "profile")
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"learner-step-{step}-rank-{rank}"
    events = prof.key_averages()
    summary = {"step": step, "rank": rank, "device": str(device), **summarize(profile_rows(events), wall)}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    stem.with_suffix(".txt").write_text(events.table(sort_by=sort, row_limit=40) + "\n")
    if learner_cfg.profile_trace:
        prof.export_chrome_trace(str(stem) + ".trace.json")
