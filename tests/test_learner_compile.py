"""``learner.compile``: decoder layers compiled with torch.compile train exactly as eager ones, and
the start-up warm-up builds the one graph that every micro-batch of more than one row uses (the
FSDP2 learner on Ray with the tiny Llama; inductor's CPU backend)."""
from __future__ import annotations

import math

import pytest
import ray
import torch

from rl.learner.group import LearnerGroup
from test_learner import LORA, make_batch, make_cfg  # pytest puts tests/ on the path


@pytest.mark.slow
@pytest.mark.parametrize("padding_mask", ["auto", "never"])  # compiled layers: with the mask, without it
def test_compiled_layers_give_the_same_updates_and_logprobs(ray_local, tiny_model_path, padding_mask):
    # Defined in here so that Ray ships it by value (a worker cannot import the test module).
    def _compiled_graphs(rank) -> int:
        """Runs in a learner rank actor: the graphs torch.compile built in that process."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    learner = {"lr": 1e-2, "micro_batch_size": 4, "updates_per_batch": 2}
    built = {}
    try:
        for name, compiled in (("eager", False), ("compiled", True)):
            built[name] = LearnerGroup(make_cfg(tiny_model_path, learner={
                **learner, "compile": compiled, "padding_mask": padding_mask}), tiny_model_path, LORA)
        # The warm-up compiled at start-up (on synthetic micro-batches, its gradients dropped: the
        # updates below still match eager ones) ...
        warm = built["compiled"].ready()
        assert built["eager"].ready() == {} and warm["compiled_graphs"] > 0 and warm["warm_up_s"] > 0
        init = built["eager"].lora_state()
        unpadded = make_batch(8, T=18, seed=3)  # every row full length: no padding to mask
        unpadded.attention_mask[:] = 1
        unpadded.response_mask[:, 5:] = 1
        unpadded.rollout_logprobs = torch.where(unpadded.response_mask.bool(), -10.0, 0.0)
        # Two batches of different lengths (dynamic shapes), one without padding (with the mask it
        # gets an empty column, so it takes the padded rows' graph; without, it is like any other),
        # then a single row.
        for batch in (make_batch(8, T=20, seed=1), make_batch(8, T=24, seed=2), unpadded, make_batch(1, T=22, seed=4)):
            metrics = {k: g.train_step(batch) for k, g in built.items()}
            for k in ("loss", "grad_norm", "entropy"):
                assert math.isclose(metrics["eager"][k], metrics["compiled"][k], rel_tol=1e-4, abs_tol=1e-6), k
            # ... and the real micro-batches, of other rows and lengths, compiled nothing more; a
            # single row where a micro-batch holds four is the one kind that builds graphs of its own.
            single = batch.input_ids.shape[0] == 1
            assert (metrics["compiled"]["compiled_graphs"] > warm["compiled_graphs"]) == single, batch.input_ids.shape
        states = {k: g.lora_state() for k, g in built.items()}
        assert max((states["eager"][k] - init[k]).abs().max().item() for k in init) > 1e-3  # it trained
        assert max((states["eager"][k] - states["compiled"][k]).abs().max().item() for k in init) < 1e-5
        probe = make_batch(4, seed=9)
        lp = {k: g.logprobs(probe, temperature=1.0) for k, g in built.items()}
        assert (lp["eager"] - lp["compiled"]).abs().max() < 1e-4
        assert torch.isfinite(lp["compiled"]).all()
        graphs = {k: ray.get(g.ranks[0].__ray_call__.remote(_compiled_graphs)) for k, g in built.items()}
        assert graphs["eager"] == 0 and graphs["compiled"] > 0, graphs  # the compiled layers did run compiled
    finally:
        for g in built.values():
            g.shutdown()
