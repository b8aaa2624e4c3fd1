"""The numbers of one gradient capture, given the captures before it.

``CaptureStatistics.add(step, G, lora)`` turns one capture (the rank-free G of each
watched module, and its LoRA gradients) into flat metrics, and keeps the only state
that cross-step statistics need, on CPU and bounded: the last ``lags`` gradients
(float32) for cosines, the last ``window`` sign tensors (int8) and their running sum
(int16) for sign statistics, and one scalar per metric per capture for the summary.
For SmolLM2-135M watching down_proj and v_proj in all 30 layers, the gradient history
holds about 0.6 GB (pinned when an accelerator computes against it).

Metric names: ``diag/<kind>/<module>/<stat>`` per module (kind ``G`` or ``lora``),
``diag/<kind>/<type>/<stat>_mean`` per module type (when several are watched),
``diag/<kind>/<stat>_mean`` over all modules, ``diag/<kind>/<layer>/importance`` and
``diag/<kind>/importance_spread`` / ``importance_top30_share`` / ``importance_gini`` over
layers, and
``diag/step`` (the step the capture belongs to). A layer's gradient norm is that of its
watched modules together, ``N_l = sqrt(sum_m ||g_m||^2)``. For LoRA, ``norm`` covers
both factors, ``eff_rank``/``stable_rank`` are those of dL/dB (d_out x r), and
``*_A`` those of dL/dA; cosines and signs use both factors flattened together.
``zero_grad`` is 1 for an all-zero gradient; such a capture stays out of the cosine lags
and the sign window (which then span the last non-zero captures).

Left out: anything about how the gradients were obtained (rl/diagnostics/capture.py does that)
and the maths itself (rl/diagnostics/tensor_stats.py).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict, deque

import torch

from rl.diagnostics import tensor_stats

_LAYER_RE = re.compile(r"(?:^|\.)(layers\.\d+)\.")


def layer_of(module: str) -> str:
    """``layers.3.mlp.down_proj`` -> ``layers.3``; names without a layer index are their own layer."""
    m = _LAYER_RE.search(module + ".")
    return m.group(1) if m else module


class CrossStepHistory:
    """The bounded past of one gradient: cosines need values, sign statistics need signs."""

    def __init__(self, lags: int, window: int):
        self.past: deque[torch.Tensor] = deque(maxlen=lags)
        self.signs: deque[torch.Tensor] = deque(maxlen=window)
        self.sign_sum: torch.Tensor | None = None

    def update(self, flat: torch.Tensor) -> dict[str, float]:
        """Statistics of ``flat`` (float32, 1-D, a copy the caller gives up) against the past,
        then remember it; an all-zero ``flat`` is only counted (``zero_grad``), never remembered.

        The same statistics as ``tensor_stats.cosine``/``sign_agreement``, computed in float32
        with cached norms and an int8 sign product. The past is stored on the host; when
        ``flat`` is on an accelerator the arithmetic runs there and the past is copied in
        for it (host CPU threads are what a launch-bound training loop needs most).
        """
        dev = flat.device
        norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
        if norm == 0:
            # An all-zero gradient (every GRPO group flat) has no direction and no signs: it stays
            # out of the history, so lags and the sign window count non-zero captures only.
            return {"zero_grad": 1.0}
        out = {"zero_grad": 0.0}
        for k in range(1, len(self.past) + 1):
            past, past_norm = self.past[-k]
            denom = norm * past_norm
            dot = float(torch.dot(flat, past.to(dev, non_blocking=True)))
            # clamped: float32 rounding can leave |cos| a hair above 1
            out[f"cos_lag{k}"] = max(-1.0, min(1.0, dot / denom)) if denom > 0 else float("nan")
        sign = torch.sign(flat).to(torch.int8)
        if self.signs:
            prod = sign * self.signs[-1].to(dev, non_blocking=True)  # 1: same sign, -1: opposite, 0: a zero
            both = int(torch.count_nonzero(prod))
            out["sign_agree"] = int(torch.count_nonzero(prod > 0)) / both if both else float("nan")
        if self.sign_sum is None:
            self.sign_sum = _host(torch.zeros(sign.shape, dtype=torch.int16), dev)
        sign_sum = self.sign_sum.to(dev, non_blocking=True)
        if len(self.signs) == self.signs.maxlen:
            sign_sum -= self.signs[0].to(dev, non_blocking=True)
        sign_sum += sign
        self.signs.append(_host(sign, dev))
        if len(self.signs) == self.signs.maxlen:  # only full windows: E|sum sign|/T depends on T
            out["sign_consistency"] = tensor_stats.sign_consistency_from_sum(sign_sum, len(self.signs))
        if sign_sum is not self.sign_sum:
            self.sign_sum.copy_(sign_sum)
        self.past.append((_host(flat, dev), norm))
        return out


def _host(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` kept on the host; pinned when it travels to and from an accelerator."""
    if dev.type == "cpu":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


class CaptureStatistics:
    """Per-capture metrics plus the history and time series behind them (see module docstring)."""

    def __init__(self, lags: int, window: int, max_rank_dim: int):
        self.lags, self.window, self.max_rank_dim = lags, window, max_rank_dim
        self._history: dict[tuple[str, str], CrossStepHistory] = {}
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._layer_norm_sum: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.captures: list[int] = []

    def add(self, step: int, G: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
            grams: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Metrics of one capture; spectra run on each tensor's own device. ``grams``:
        ``tensor_stats.gram`` of some G, computed where G was (an accelerator does it fast)."""
        grams = grams or {}
        spectra = self._spectra({n: grams.get(n, g) for n, g in G.items()}, set(grams))
        per_module: dict[str, dict[str, dict[str, float]]] = {"G": {}, "lora": {}}
        for name, g in G.items():
            per_module["G"][name] = self._matrix_stats("G", name, g, spectra[name])
        for name, (da, db) in lora.items():
            stats = self._matrix_stats("lora", name, torch.cat([da.reshape(-1), db.reshape(-1)]),
                                       tensor_stats.spectrum(db, self.max_rank_dim))
            sa = tensor_stats.spectrum(da, self.max_rank_dim)
            stats.update(norm_A=tensor_stats.frobenius_norm(da), norm_B=tensor_stats.frobenius_norm(db),
                         eff_rank_A=tensor_stats.effective_rank(sa), stable_rank_A=tensor_stats.stable_rank(sa))
            per_module["lora"][name] = stats
        metrics = {"diag/step": float(step)}
        for kind, mods in per_module.items():
            if mods:
                metrics.update(self._flatten(kind, mods))
        self.captures.append(step)
        for k, v in metrics.items():
            self.series[k].append((step, v))
        return metrics

    def _spectra(self, mats: dict[str, torch.Tensor], are_grams: set[str]) -> dict[str, tensor_stats.Spectrum]:
        return {n: tensor_stats.spectrum_from_gram(m) if n in are_grams else tensor_stats.spectrum(m, self.max_rank_dim)
                for n, m in mats.items()}

    def _matrix_stats(self, kind: str, name: str, flat: torch.Tensor, sp: tensor_stats.Spectrum) -> dict[str, float]:
        stats = {"norm": math.sqrt(sp.fro_sq), "eff_rank": tensor_stats.effective_rank(sp),
                 "stable_rank": tensor_stats.stable_rank(sp)}
        hist = self._history.get((kind, name))
        if hist is None:
            hist = self._history[(kind, name)] = CrossStepHistory(self.lags, self.window)
        flat = flat.detach().reshape(-1).to(dtype=torch.float32, copy=True)
        if kind == "lora":  # the norm of a LoRA gradient covers both factors
            stats["norm"] = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
        if stats["norm"] == 0:  # no gradient, no rank: NaN keeps it out of every mean
            stats["eff_rank"] = stats["stable_rank"] = float("nan")
        stats.update(hist.update(flat))
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
            layer_sq[layer_of(name)] += stats["norm"] ** 2
        if len(by_type) > 1:
            for mtype, stats in by_type.items():
                out.update({f"diag/{kind}/{mtype}/{s}_mean": _nanmean(v) for s, v in stats.items()})
        out.update({f"diag/{kind}/{s}_mean": _nanmean(v) for s, v in overall.items()})
        norms = {layer: math.sqrt(sq) for layer, sq in layer_sq.items()}
        for layer, n in norms.items():
            self._layer_norm_sum[kind][layer] += n
        if len(norms) > 1 and sum(norms.values()) > 0:
            imp = tensor_stats.importance(norms)
            out.update({f"diag/{kind}/{layer}/importance": s for layer, s in imp.shares.items()})
            out[f"diag/{kind}/importance_spread"] = imp.spread
            out[f"diag/{kind}/importance_top30_share"] = imp.top_share
            out[f"diag/{kind}/importance_gini"] = imp.gini
        return out

    def summary(self) -> dict:
        """Per metric mean/min/max/first/last over captures, and importance over the whole run
        (each layer's gradient norm summed over captures)."""
        metrics = {}
        for key, pts in self.series.items():
            vals = [v for _, v in pts if not math.isnan(v)]
            if vals and key != "diag/step":
                metrics[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                                "first": vals[0], "last": vals[-1], "n": len(vals)}
        run_importance = {}
        for kind, sums in self._layer_norm_sum.items():
            if len(sums) > 1 and sum(sums.values()) > 0:
                imp = tensor_stats.importance(dict(sums))
                run_importance[kind] = {"shares": imp.shares, "spread": imp.spread, "top30_share": imp.top_share,
                                        "gini": imp.gini}
        return {"captures": list(self.captures), "metrics": metrics, "importance_run": run_importance}

    def close(self) -> None:
        """Drop the gradient history (the series and summary stay)."""
        self._history.clear()


def _nanmean(vals: list[float]) -> float:
    ok = [v for v in vals if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else float("nan")
