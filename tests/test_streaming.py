"""A step learned in parts as its groups finish (trainer.stream_groups): the same update as the
whole batch at once, on real parts (tiny Llama, FSDP2 on gloo, vLLM on the CPU, Ray on loopback).

On a CPU streaming cannot make a step faster (vLLM and the learner share the cores); these tests
check that it is the same algorithm: the same gradient, the same metrics, the same run.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rl.config import Config, load_config
from rl.grpo import LOSS_AGG_MODES, aggregate, batch_normaliser
from rl.learner.group import LearnerGroup, concat_batches
from rl.metrics_log import read_metrics
from tests.test_learner import LORA, TOL, make_batch, make_cfg, max_diff

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "launch" / "configs" / "tiny.yaml"


# ---------------------------------------------------------------- pure parts
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_parts_summed_then_divided_equal_the_whole_batch_loss(mode):
    g = torch.Generator().manual_seed(0)
    values, mask = torch.randn(10, 7, generator=g), (torch.rand(10, 7, generator=g) < 0.6).float()
    whole = aggregate(values, mask, mode, max_tokens=7)
    summed = sum(aggregate(values[a:b], mask[a:b], mode, max_tokens=7, num_sequences=1, num_tokens=1.0)
                 for a, b in ((0, 3), (3, 4), (4, 10)))
    divided = summed / batch_normaliser(mode, float(mask.sum()), 10)
    assert math.isclose(float(divided), float(whole), rel_tol=1e-6)


def test_parts_concatenate_in_order_padded_to_the_longest():
    a, b = make_batch(3, T=12, seed=1), make_batch(2, T=20, seed=2)
    both = concat_batches([a, b])
    both.validate()
    assert both.input_ids.shape == (5, 20) and torch.equal(both.advantages, torch.cat([a.advantages, b.advantages]))
    assert torch.equal(both.response_mask[:3, :12], a.response_mask) and both.response_mask[:3, 12:].sum() == 0
    assert torch.equal(both.rollout_logprobs[3:], b.rollout_logprobs)


def test_reward_results_of_parts_merge_into_the_batch_result():
    from rewards.runner import RewardResult

    one = RewardResult([1.0, 0.0], {"f": [1.0, None]}, {"f": 1.0}, errors={"f": 1}, seconds={"f": 0.5})
    two = RewardResult([0.5], {"f": [0.5]}, {"f": 1.0}, seconds={"f": 0.25}, leaked_threads=1)
    merged = RewardResult.concat([one, two])
    assert merged.total == [1.0, 0.0, 0.5] and merged.per_function == {"f": [1.0, None, 0.5]}
    assert merged.errors == {"f": 1} and merged.seconds == {"f": 0.75} and merged.leaked_threads == 1


@pytest.mark.parametrize("override, field", [
    ({"trainer": {"max_staleness": 1}}, "trainer.max_staleness"),
    ({"learner": {"updates_per_batch": 2}}, "learner.updates_per_batch"),
    ({"learner": {"loss_token_cap": 64}}, "learner.loss_token_cap"),
    ({"diagnostics": {"enabled": True}}, "diagnostics.enabled"),
    ({"rollout": {"sleep_mode": True}}, "rollout.sleep_mode"),
    ({"algorithm": {"loss": "sft"}}, "algorithm.loss"),
])
def test_what_streaming_cannot_go_with_is_refused_in_one_line(override, field):
    from rl.config import config_from_dict

    tree = {"trainer": {"stream_groups": 2}}
    for section, values in override.items():
        tree[section] = {**tree.get(section, {}), **values}
    with pytest.raises(ValueError, match=rf"^{field}=.* cannot go with trainer.stream_groups=2: .*set ") as e:
        config_from_dict(tree)
    assert "\n" not in str(e.value)
    Config().validate()  # streaming off: nothing is refused


def test_the_run_summary_says_a_streamed_learner_time_is_what_followed_the_rollout(tmp_path):
    import json

    from rl.run_summary import summarize

    def step(i: int, parts: float) -> str:
        return json.dumps({"step": i, "time/step_s": 2.0, "time/rollout_s": 1.5, "time/reward_s": 0.1,
                           "time/learner_s": 0.3, "time/sync_s": 0.05, "rollout/stream_parts": parts})

    (tmp_path / "metrics.jsonl").write_text("\n".join(step(i, 4.0) for i in (1, 2)) + "\n")
    assert "groups streamed to the learner" in summarize(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n".join(step(i, 0.0) for i in (1, 2)) + "\n")
    assert "streamed" not in summarize(tmp_path)


def test_streaming_puts_no_rollout_to_sleep():
    from rl.config import config_from_dict
    from rl.startup import rollout_settings

    cfg = config_from_dict({"trainer": {"stream_groups": 1}, "cluster": {"colocate": True}})
    assert rollout_settings(cfg, "float32").sleep_mode is False


# ---------------------------------------------------------------- the learner
@pytest.mark.slow
def test_a_batch_learned_in_parts_is_the_whole_batch_update(ray_local, tiny_model_path):
    """accumulate x3 + apply against train_step on the same rows, on one rank and on two, with a
    KL term: the same adapter after two steps, the same metrics, the parts' logprobs in row order."""
    learner = {"lr": 1e-2, "micro_batch_size": 4, "warmup_steps": 1}
    built = {}
    try:
        for name, ranks in (("whole", 1), ("parts", 1), ("parts2", 2)):
            cfg = make_cfg(tiny_model_path, learner={**learner, "num_ranks": ranks}, algorithm={"kl_coef": 0.05})
            built[name] = LearnerGroup(cfg, tiny_model_path, LORA)
        init = built["whole"].lora_state()
        for seed in (1, 2):
            batch = make_batch(11, seed=seed)
            cuts = [(0, 4), (4, 5), (5, 11)]  # uneven parts; one of a single row
            parts = [make_part(batch, a, b) for a, b in cuts]
            m = {"whole": built["whole"].train_step(batch)}
            for name in ("parts", "parts2"):
                m[name] = built[name].apply([(p, built[name].accumulate(p)) for p in parts])
            for name in ("parts", "parts2"):
                for k in ("loss", "pg_loss", "grad_norm", "entropy", "clip_fraction", "kl", "tokens", "lr",
                          "logprob_mismatch_abs_diff_mean", "logprob_mismatch_kl_k3"):
                    assert math.isclose(m[name][k], m["whole"][k], rel_tol=1e-4, abs_tol=1e-6), (name, k)
        states = {k: g.lora_state() for k, g in built.items()}
        assert max_diff(states["whole"], init) > 1e-3  # the updates are not trivial
        # Summed and divided once instead of divided piece by piece: fp32 rounding, which Adam's
        # normalisation carries into the update (1.4e-5 seen, against updates of about lr = 1e-2).
        assert max_diff(states["parts"], states["whole"]) < 10 * TOL
        assert max_diff(states["parts2"], states["whole"]) < 10 * TOL
        with pytest.raises(RuntimeError, match="apply without accumulate"):
            built["parts"].apply([])
    finally:
        for g in built.values():
            g.shutdown()


def make_part(batch, a: int, b: int):
    from rl.learner.group import TrainBatch

    return TrainBatch(batch.input_ids[a:b], batch.attention_mask[a:b], batch.response_mask[a:b],
                      batch.advantages[a:b], batch.rollout_logprobs[a:b], batch.max_tokens)


# ---------------------------------------------------------------- runs
STEPS = ["trainer.save_every=1", "trainer.eval_size=0", "rollout.max_new_tokens=8", "logging.progress=false",
         "logging.tensorboard=false",
         # One group decodes at a time, so groups finish one after another and parts are really streamed.
         "rollout.max_num_seqs=4"]


def _run(tmp_path, name: str, *extra: str, kill_after_first_part_of: int = 0):
    """A tiny run; with ``kill_after_first_part_of=s`` the rollout worker is killed once step s's
    first part has reached the driver, while it still decodes the rest."""
    import ray

    from rl.trainer import Trainer

    cfg = load_config(TINY, [f"logging.output_dir={tmp_path}", f"logging.run_name={name}", *STEPS, *extra])
    # The random tiny model never solves the task; a length reward varies within a group.
    cfg.reward.functions = [{"name": "length_penalty", "weight": 1.0, "kwargs": {"max_len": 64, "unit": "chars"}}]
    trainer = Trainer(cfg, tmp_path / name)
    if kill_after_first_part_of:
        stream = trainer.rollout.stream

        def stream_then_kill(*args, **kwargs):
            for i, part in enumerate(stream(*args, **kwargs)):
                yield part
                if i == 0 and trainer.step + 1 == kill_after_first_part_of:
                    ray.kill(trainer.rollout.workers[0], no_restart=True)

        trainer.rollout.stream = stream_then_kill
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer, read_metrics(tmp_path / name)


@pytest.mark.slow
def test_a_streamed_run_is_the_whole_batch_run_survives_a_killed_worker_and_resumes(ray_local, tiny_model_path,
                                                                                    tmp_path):
    whole, whole_m = _run(tmp_path, "whole", "trainer.steps=2")
    streamed, streamed_m = _run(tmp_path, "streamed", "trainer.steps=2", "trainer.stream_groups=1",
                                kill_after_first_part_of=2)
    assert [m["step"] for m in streamed_m] == [1, 2]
    # Four prompts, one group at a time: four parts, each sent to the learner as it finished.
    assert streamed_m[0]["rollout/stream_parts"] == 4.0
    assert streamed.trained_prompts == whole.trained_prompts
    first, ref = streamed_m[0], whole_m[0]
    # Step 1: the same prompts, seeds and adapter, so the same completions and rewards ...
    for k in ("reward/mean", "rollout/response_tokens_mean", "learner/tokens"):
        assert first[k] == ref[k], k
    # ... and the same update, summed in another order.
    for k in ("learner/loss", "learner/grad_norm", "learner/entropy", "learner/logprob_mismatch_abs_diff_mean"):
        assert math.isclose(first[k], ref[k], rel_tol=1e-4, abs_tol=1e-6), k
    assert all(m["rollout/staleness"] == 0.0 and m["time/rollout_generate_s"] > 0 for m in streamed_m)
    # Step 2 lost its worker after one part: a fresh one generated the other three prompts' groups,
    # so the step still learned from all four (tokens from 16 completions, none repeated).
    second = streamed_m[1]
    assert second["rollout/worker_restarts"] == 1.0 and second["rollout/stream_parts"] >= 2
    assert second["learner/tokens"] > 0 and second["rollout/response_tokens_mean"] > 0
    # The same command with more steps resumes from step 2's checkpoint; two workers now stream at once.
    again, again_m = _run(tmp_path, "streamed", "trainer.steps=3", "trainer.stream_groups=1", "rollout.num_workers=2")
    assert sorted(again.trained_prompts) == [3] and [m["step"] for m in again_m] == [1, 2, 3]
    assert again_m[-1]["rollout/stream_parts"] == 4.0
