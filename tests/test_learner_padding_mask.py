"""``learner.padding_mask``: right-padded micro-batches go into eager layers without their padding
mask (``auto``; ``never`` for compiled layers too) and train exactly as with it (``always``): the
FSDP2 learner on Ray with the tiny Llama, whose SDPA attention runs causal without the mask and
masked with it."""
from __future__ import annotations

import math

import pytest
import ray
import torch

from rl.config import ConfigError, load_config
from rl.learner.batching import right_padded, takes_padding_mask
from rl.learner.group import LearnerGroup, split_batch
from test_learner import LORA, make_cfg, max_diff, uneven_batch  # pytest puts tests/ on the path


def test_right_padded_rows_are_tokens_then_padding():
    assert right_padded(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    assert right_padded(torch.ones(2, 3, dtype=torch.long))
    assert not right_padded(torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))  # left padding
    assert not right_padded(torch.tensor([[1, 0, 1, 0]]))  # a hole: a token after padding


def test_bad_padding_mask_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"learner.padding_mask='sometimes' is not allowed"):
        load_config("launch/configs/tiny.yaml", ["learner.padding_mask=sometimes"])


def test_auto_leaves_the_mask_out_of_right_padded_rows_only_for_eager_layers():
    padded, left = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert not takes_padding_mask("auto", False, padded) and takes_padding_mask("auto", True, padded)
    assert not takes_padding_mask("never", True, padded) and not takes_padding_mask("never", False, padded)
    assert takes_padding_mask("always", False, padded)
    assert all(takes_padding_mask(mode, compiled, left) for mode in ("auto", "never", "always") for compiled in (0, 1))


@pytest.mark.slow
def test_unmasked_right_padded_rows_give_the_same_updates_and_logprobs(ray_local, tiny_model_path):
    # Defined in here so that Ray ships it by value (a worker cannot import the test module).
    def _masks_given(rank, shard) -> list[bool]:
        """Runs in a learner rank actor: whether each planned micro-batch's forward gets a mask."""
        return [mb["model_mask"] is not None for mb in rank._micro_batches(shard, "response_mask", rank._plan(shard))]

    # Packed by length, so that micro-batches hold rows of different lengths; whole rows (no
    # shared-prefix forward), the path the GPU recipe trains on.
    learner = {"lr": 1e-2, "updates_per_batch": 2, "micro_batch_size": 8, "micro_batch_tokens": 120,
               "shared_prefix": False}
    built = {}
    try:
        for mode in ("auto", "always"):
            built[mode] = LearnerGroup(make_cfg(tiny_model_path, learner={**learner, "padding_mask": mode}),
                                       tiny_model_path, LORA)
        init = built["always"].lora_state()
        batch = uneven_batch(1)
        shard = split_batch(batch, 1)[0]
        given = {k: ray.get(g.ranks[0].__ray_call__.remote(_masks_given, shard)) for k, g in built.items()}
        assert not any(given["auto"]) and all(given["always"]), given
        for seed in (1, 2):
            metrics = {k: g.train_step(uneven_batch(seed)) for k, g in built.items()}
            for key in ("loss", "grad_norm", "entropy", "clip_fraction"):
                assert math.isclose(metrics["auto"][key], metrics["always"][key], rel_tol=1e-4, abs_tol=1e-6), key
        states = {k: g.lora_state() for k, g in built.items()}
        assert max_diff(states["always"], init) > 1e-3  # it trained
        assert max_diff(states["auto"], states["always"]) < 1e-5
        lp = {k: g.logprobs(uneven_batch(3), temperature=1.0) for k, g in built.items()}
        assert lp["always"].abs().sum() > 0
        assert (lp["auto"] - lp["always"]).abs().max() < 1e-4
    finally:
        for g in built.values():
            g.shutdown()
