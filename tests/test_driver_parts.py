"""Pure parts of the driver: batch padding, bundle layout, even splits."""
from types import SimpleNamespace

import torch

from rl.learner.batch import grpo_batch, pad_sequences, sft_batch
from rl.evaluate import split_evenly
from rl.resources import cpu_threads, gpu_shortfall, plan_bundles


def test_pad_sequences_aligns_masks_and_logprobs():
    ids, attn, resp, lps = pad_sequences([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0,
                                         response_logprobs=[[-0.1, -0.2, -0.3], [-0.4]])
    assert ids.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert resp.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert torch.allclose(lps, torch.tensor([[0, 0, -0.1, -0.2, -0.3], [0, -0.4, 0, 0, 0]]))


def test_overlong_completions_get_no_loss():
    done = SimpleNamespace(token_ids=[5, 2], logprobs=[-1.0, -1.0], finish_reason="stop")
    cut = SimpleNamespace(token_ids=[5, 6, 7], logprobs=[-1.0] * 3, finish_reason="length")
    adv = torch.tensor([1.0, -1.0])
    kept = grpo_batch([[1], [1]], [done, cut], adv, pad_id=0, max_tokens=3, overlong_mask=False)
    masked = grpo_batch([[1], [1]], [done, cut], adv, pad_id=0, max_tokens=3, overlong_mask=True)
    assert kept.response_mask[1].sum() == 3 and masked.response_mask[1].sum() == 0
    assert torch.equal(kept.response_mask[0], masked.response_mask[0])
    assert masked.max_tokens == 3 and masked.advantages.dtype == torch.float32


def test_sft_batch_has_zero_advantages():
    b = sft_batch([[1, 2]], [[3, 4]], pad_id=0, max_tokens=8)
    assert b.advantages.tolist() == [0.0] and b.response_mask.tolist() == [[0, 0, 1, 1]]


def test_bundles_colocated_and_separate():
    bundles, lb, rb = plan_bundles(2, 1, colocate=True, gpus_learner=0.5, gpus_rollout=0.4)
    assert len(bundles) == 2 and lb == [0, 1] and rb == [0]
    assert bundles[0]["GPU"] == 0.9
    bundles, lb, rb = plan_bundles(2, 2, colocate=False, gpus_learner=1, gpus_rollout=1)
    assert len(bundles) == 4 and rb == [2, 3] and all(b["GPU"] == 1 for b in bundles)
    cpu_only, _, _ = plan_bundles(1, 1, colocate=True, gpus_learner=0, gpus_rollout=0)
    assert cpu_only == [{"CPU": 1.0}]


def test_bundles_that_cannot_fit_the_gpus_are_refused_in_one_line_before_ray_waits():
    # One learner rank and two vLLM workers colocated on one GPU: two bundles.
    default, _, _ = plan_bundles(1, 2, colocate=True, gpus_learner=0.5, gpus_rollout=0.4)
    why = gpu_shortfall(default, cluster_gpus=1, colocate=True)
    assert "\n" not in why and "asks for 1.8 GPUs in 2 bundles but the cluster has 1" in why
    assert "set both to 0.25" in why
    quarters, _, _ = plan_bundles(1, 2, colocate=True, gpus_learner=0.25, gpus_rollout=0.25)
    assert gpu_shortfall(quarters, cluster_gpus=1, colocate=True) is None
    apart, _, _ = plan_bundles(1, 1, colocate=False, gpus_learner=1, gpus_rollout=1)
    assert "cluster.gpus_per_rollout_worker" in gpu_shortfall(apart, cluster_gpus=1, colocate=False)
    assert gpu_shortfall(plan_bundles(1, 1, True, 0, 0)[0], cluster_gpus=0, colocate=True) is None  # CPU only


def test_cpu_threads_share_the_host_among_one_kind_of_actor():
    assert cpu_threads(0, 1, host_cores=2) == 2  # one learner rank (or rollout worker): every core
    assert cpu_threads(0, 2, host_cores=2) == 1  # two gloo ranks computing at once
    assert cpu_threads(0, 3, host_cores=2) == 1  # never zero
    assert cpu_threads(3, 2, host_cores=2) == 3  # cluster.cpu_threads wins


def test_split_evenly_keeps_order():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_pad_sequences_matches_row_by_row_padding_on_ragged_rows():
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(1, 99) for _ in range(rng.randrange(1, 9))] for _ in range(13)]
    responses = [[rng.randrange(1, 99) for _ in range(rng.randrange(0, 12))] for _ in range(13)]
    logprobs = [[-rng.random() for _ in r] for r in responses]
    ids, attn, resp, lps = pad_sequences(prompts, responses, pad_id=0, response_logprobs=logprobs)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        assert ids[i].tolist() == p + r + [0] * (ids.shape[1] - n)
        assert attn[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert resp[i].tolist() == [0.0] * len(p) + [1.0] * len(r) + [0.0] * (ids.shape[1] - n)
        assert torch.equal(lps[i, len(p):n], torch.tensor(logprobs[i], dtype=torch.float32))
        assert not lps[i, :len(p)].any() and not lps[i, n:].any()
    assert (ids.dtype, attn.dtype, resp.dtype, lps.dtype) == (torch.long, torch.long, torch.float32, torch.float32)


def test_pad_sequences_refuses_logprobs_that_do_not_match_the_tokens():
    import pytest

    with pytest.raises(ValueError, match="row 1: 1 rollout logprobs for 2 response tokens"):
        pad_sequences([[1], [2]], [[3], [4, 5]], pad_id=0, response_logprobs=[[-0.1], [-0.2]])
