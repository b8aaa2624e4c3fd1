"""Gradient diagnostics read back from a run's ``metrics.jsonl`` records.

The learner logs each capture's statistics as flat keys, ``diag/<kind>/<name>/<stat>``
(kind ``G`` for the rank-free gradient of the frozen weight, ``lora`` for the LoRA
gradients), prefixed with ``learner/`` by the trainer. This module turns a list of
records (``rl.metrics_log.read_metrics``) back into time series, per-layer gradient
norms and run-level layer importance, for the reports of ``placerl regime`` and
``placerl compare``.

Run-level importance follows the gradrank scorer's definition: a layer's norm is that
of its watched modules together, ``N_l = sqrt(sum_m ||g_m||^2)`` per capture, averaged
over captures, then ``I_l = N_l / sum N``. A mean of per-capture max/min ratios is
reported beside it by the callers, since one noisy capture can dominate a ratio.

Left out: any statistic not logged by ``rl.diagnostics.capture`` (nothing is recomputed from
gradients here) and plotting.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

from rl.diagnostics import tensor_stats

PREFIXES = ("learner/diag/", "diag/")
KINDS = ("G", "lora")
_LAYER_RE = re.compile(r"(?:^|\.)(layers\.\d+)\.")


def _number(v) -> float | None:
    """Metric values are floats, or strings ("nan", "inf") where they were not finite."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def diag_values(record: dict) -> dict[str, float]:
    """The diagnostics of one record with the logging prefix removed: ``G/eff_rank_mean`` -> value."""
    out = {}
    for key, v in record.items():
        for p in PREFIXES:
            if key.startswith(p):
                num = _number(v)
                if num is not None:
                    out[key[len(p):]] = num
                break
    return out


def last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last one logged, in step order: a resumed run re-logs the
    steps between its checkpoint and the crash."""
    by_step: dict[int, dict] = {}
    for r in records:
        by_step[int(r.get("step", -1))] = r
    return [by_step[s] for s in sorted(by_step)]


def layer_of(module: str) -> str:
    """``layers.3.mlp.down_proj`` -> ``layers.3``; a name without a layer index is its own layer."""
    m = _LAYER_RE.search(module + ".")
    return m.group(1) if m else module


def layer_index(layer: str) -> int:
    m = re.search(r"(\d+)$", layer)
    return int(m.group(1)) if m else -1


def is_zero_capture(values: dict[str, float], kind: str) -> bool:
    """A capture whose gradient is exactly zero: a GRPO batch where every group had equal
    rewards has zero advantages. Its ranks are 0 and its cosines undefined, which says
    nothing about the regime, so the reports leave such captures out (and count them)."""
    return values.get(f"{kind}/norm_mean") == 0.0


def zero_captures(records: list[dict], kind: str) -> int:
    return sum(is_zero_capture(diag_values(r), kind) for r in records)


def series(records: list[dict], kind: str, stat: str) -> list[tuple[int, float]]:
    """(step, value) of ``diag/<kind>/<stat>`` over the non-zero captures that logged it (NaN kept)."""
    out = []
    for r in records:
        values = diag_values(r)
        v = values.get(f"{kind}/{stat}")
        if v is not None and not is_zero_capture(values, kind):
            out.append((int(r.get("step", len(out))), v))
    return out


def finite_mean(values) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else float("nan")


def mean_of(records: list[dict], kind: str, stat: str) -> tuple[float, int]:
    """Mean over captures of the finite values of one statistic, and how many there were."""
    vals = [v for _, v in series(records, kind, stat) if math.isfinite(v)]
    return (sum(vals) / len(vals) if vals else float("nan")), len(vals)


def module_norms(records: list[dict], kind: str) -> list[dict[str, float]]:
    """Per capture: module short name -> gradient norm (modules are names with a dot, e.g. ``layers.0.mlp.down_proj``)."""
    out = []
    for r in records:
        caps = {}
        values = diag_values(r)
        if is_zero_capture(values, kind):
            continue
        for key, v in values.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == kind and parts[2] == "norm" and "." in parts[1]:
                caps[parts[1]] = v
        if caps:
            out.append(caps)
    return out


def layer_norms(records: list[dict], kind: str) -> list[dict[str, float]]:
    """Per capture: layer -> N_l = sqrt(sum over its watched modules of ||g_m||^2)."""
    out = []
    for caps in module_norms(records, kind):
        sq: dict[str, float] = defaultdict(float)
        for module, n in caps.items():
            if math.isfinite(n):
                sq[layer_of(module)] += n * n
        out.append({layer: math.sqrt(s) for layer, s in sq.items()})
    return out


def mean_layer_norms(records: list[dict], kind: str) -> dict[str, float]:
    """Each layer's norm averaged over the captures (layers missing from a capture are skipped there)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for caps in layer_norms(records, kind):
        for layer, n in caps.items():
            sums[layer] += n
            counts[layer] += 1
    return {layer: sums[layer] / counts[layer] for layer in sorted(sums, key=layer_index)}


def run_importance(records: list[dict], kind: str) -> tensor_stats.Importance | None:
    """Run-level layer importance from mean layer norms; None with fewer than two layers or no gradient."""
    norms = mean_layer_norms(records, kind)
    if len(norms) < 2 or sum(norms.values()) <= 0:
        return None
    return tensor_stats.importance(norms)
