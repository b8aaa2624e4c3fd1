"""The merged path's verified map of where the loader puts each weight (rl/rollout/param_map.py).

vLLM's own loader runs only inside a GPU engine here (on CPU vLLM repacks its linear weights
and drops the parameters the loader writes), so these tests drive the map with small models
whose ``load_weights`` lays weights out as vLLM's does (q/k/v fused into one parameter, each
narrowed and copied) or breaks one of the map's conditions. tests/test_gpu_merged.py runs it
on vLLM's loader.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from rl.rollout.param_map import ATTR, ParamMap, map_state, write_served_weights

Q, KV, HIDDEN = 8, 4, 6
SHARDS = {"q_proj": (0, Q), "k_proj": (Q, KV), "v_proj": (Q + KV, KV)}


class FusedModel(torch.nn.Module):
    """q/k/v stacked in one ``qkv_proj`` as vLLM holds them; ``how`` breaks the loader on purpose."""

    def __init__(self, how: str = "vllm"):
        super().__init__()
        self.qkv_proj = torch.nn.Parameter(torch.zeros(Q + 2 * KV, HIDDEN), requires_grad=False)
        self.o_proj = torch.nn.Parameter(torch.zeros(HIDDEN, Q), requires_grad=False)
        self.scratch = torch.zeros(HIDDEN, Q)  # not a parameter
        self.how = how
        self.recorded = []  # per load: whether a dispatch mode (the map's recorder) watched it

    def load_weights(self, weights):
        self.recorded.append(_get_current_dispatch_mode() is not None)
        loaded = set()
        for name, w in weights:
            leaf = name.split(".")[-2]
            if leaf in SHARDS:
                start, size = SHARDS[leaf]
                if self.how == "overlap":
                    start = 0
                dst = self.qkv_proj.data.narrow(0, start, size)
                dst.copy_(w.narrow(0, 0, size).to(torch.float64) if self.how == "cast" else w.narrow(0, 0, size))
                if self.how == "twice":
                    dst.copy_(w)
                if self.how == "post":
                    dst.add_(1.0)
                loaded.add("qkv_proj")
            else:
                (self.scratch if self.how == "elsewhere" else self.o_proj.data).copy_(w)
                loaded.add("o_proj")
        return loaded


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (Q, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, Q)}
    return {f"layers.0.{leaf}.weight": torch.randn(shape, generator=g) for leaf, shape in shapes.items()}


def worker_of(model) -> SimpleNamespace:
    return SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: model))


def test_the_first_load_teaches_the_map_and_later_versions_land_where_the_loader_puts_them():
    model = FusedModel()
    worker = worker_of(model)
    assert write_served_weights(worker, weights(0)) == {"written": 2, "direct": False}
    assert map_state(worker) == "mapped"
    for version in (1, 2):
        new = weights(version)
        assert write_served_weights(worker, new) == {"written": 4, "direct": True}
        by_loader = FusedModel()
        by_loader.load_weights(new.items())
        assert torch.equal(model.qkv_proj, by_loader.qkv_proj) and torch.equal(model.o_proj, by_loader.o_proj)
    assert model.recorded == [True]  # the loader ran once, recorded


def test_another_set_of_weights_goes_through_the_loader_and_is_mapped_anew():
    model = FusedModel()
    worker = worker_of(model)
    write_served_weights(worker, weights(0))
    fewer = {k: v for k, v in weights(1).items() if "o_proj" not in k}
    assert write_served_weights(worker, fewer)["direct"] is False
    assert isinstance(getattr(worker, ATTR), ParamMap) and len(getattr(worker, ATTR).destinations) == 3
    assert torch.equal(model.qkv_proj[:Q], fewer["layers.0.q_proj.weight"])


@pytest.mark.parametrize("how, why", [
    ("cast", "copied 'layers.0.q_proj.weight' 0 times"),
    ("twice", "copied 'layers.0.q_proj.weight' 2 times"),
    ("post", "does not hold 'layers.0.q_proj.weight' as given"),
    ("overlap", "overlap"),
    ("elsewhere", "somewhere other than a contiguous view of a parameter"),
])
def test_a_loader_the_map_cannot_follow_leaves_no_map_and_keeps_loading(how, why):
    model = FusedModel(how)
    worker = worker_of(model)
    for version in range(3):
        assert write_served_weights(worker, weights(version))["direct"] is False
        assert why in map_state(worker), map_state(worker)
    # Recorded once: the same weights are not recorded again after a decline, another set is.
    write_served_weights(worker, {k: v for k, v in weights(3).items() if "o_proj" not in k})
    assert model.recorded == [True, False, False, True]
