"""Rollouts that overlap learning (trainer.max_staleness): version bookkeeping and a resume in the
middle of an overlapped run, on real parts (tiny Llama, vLLM on the CPU, Ray on loopback, FSDP2).

On a CPU the overlap cannot make a step faster (rollout and learner share the same cores); these
tests check that it is correct: which adapter version every batch came from, that none older than
the bound is trained on, and that a stop with a batch in flight neither skips nor repeats a prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.config import load_config
from rl.data import PromptSampler
from rl.metrics_log import read_metrics
from rl.rollout.overlap import admit, check_overlap, staleness

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "launch" / "configs" / "tiny.yaml"
STEPS = 4
OVERLAPPED = ["trainer.max_staleness=1", f"trainer.steps={STEPS}", "trainer.save_every=1", "trainer.keep_checkpoints=10",
              "trainer.eval_size=0", "rollout.max_new_tokens=8",
              # A band tight enough that a one-version-old token leaves it, and an on-policy one does not.
              "algorithm.is_correction=icepop", "algorithm.icepop_low=0.995", "algorithm.icepop_high=1.005",
              "logging.progress=false", "logging.tensorboard=false"]


# ---------------------------------------------------------------- the bound, as pure functions
def test_staleness_is_counted_from_the_oldest_sample_and_the_bound_admits_up_to_it():
    assert staleness(5, [5, 4, 5]) == 1 and staleness(5, [5]) == 0
    assert admit(5, [4, 5], max_staleness=1) and admit(5, [5], max_staleness=0)
    assert not admit(5, [3, 5], max_staleness=1) and not admit(5, [4], max_staleness=0)


def test_overlap_is_refused_only_where_the_rollout_sleeps_for_the_learner():
    check_overlap(0, sleep_mode=True)  # the synchronous loop sleeps as before
    check_overlap(1, sleep_mode=False)
    with pytest.raises(ValueError, match=r"^trainer.max_staleness=2 cannot overlap .* set trainer.max_staleness=0") as e:
        check_overlap(2, sleep_mode=True)
    assert "\n" not in str(e.value)


def test_the_run_summary_says_how_much_of_an_overlapped_rollout_was_waited_for(tmp_path):
    from rl.run_summary import summarize

    def step(i: int, staleness: float) -> str:
        return json.dumps({"step": i, "time/step_s": 2.0, "time/rollout_s": 1.5, "time/rollout_wait_s": 0.25,
                           "time/reward_s": 0.1, "time/learner_s": 1.8, "time/sync_s": 0.05,
                           "rollout/staleness": staleness})

    (tmp_path / "metrics.jsonl").write_text("\n".join(step(i, float(i > 1)) for i in (1, 2, 3)) + "\n")
    assert "rollout overlapped with learning: 0.2 s of it waited for" in summarize(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n".join(step(i, 0.0) for i in (1, 2, 3)) + "\n")
    assert "overlapped" not in summarize(tmp_path)


# ---------------------------------------------------------------- real runs
def _trainer(tmp_path, name: str, *extra: str):
    from rl.trainer import Trainer

    cfg = load_config(TINY, [f"logging.output_dir={tmp_path}", f"logging.run_name={name}", *OVERLAPPED, *extra])
    # The random tiny model never solves the task; a reward on the completions' length in characters
    # varies within a group, so every step has advantages and the adapter moves.
    cfg.reward.functions = [{"name": "length_penalty", "weight": 1.0, "kwargs": {"max_len": 64, "unit": "chars"}}]
    return cfg, Trainer(cfg, tmp_path / name)


def _prompt_order(trainer, steps: int) -> dict[int, list[int]]:
    """The rows an uninterrupted run trains, step by step: the sampler's seeded order."""
    fresh = PromptSampler(len(trainer.train_rows), seed=trainer.cfg.data.seed)
    return {s: fresh.next_indices(trainer.cfg.rollout.prompts_per_step) for s in range(1, steps + 1)}


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap")
    cfg, trainer = _trainer(tmp, "whole")
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer, tmp / "whole"


@pytest.mark.slow
def test_every_step_after_the_first_trains_on_the_previous_version(uninterrupted):
    trainer, run = uninterrupted
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    # Step 1's rollout is launched and collected alone (version 0, the learner is at 0); every later
    # one was launched before the previous step trained, so it is exactly one version behind.
    assert [m["rollout/staleness"] for m in metrics] == [0.0] + [1.0] * (STEPS - 1)
    assert not any(m.get("rollout/stale_batch_skipped") for m in metrics)
    assert all(m["learner/logprob_mismatch_kl_k3"] >= 0 and "learner/is_masked_token_frac" in m for m in metrics)
    # The learner moved between versions, so the one-step-old batches differ from what the learner
    # would sample: the train/inference KL is measured on them (step 1 is on-policy: fp32 on both sides).
    kl = [m["learner/logprob_mismatch_kl_k3"] for m in metrics]
    assert min(kl[1:]) > 100 * kl[0], kl
    masked = [m["learner/is_masked_token_frac"] for m in metrics]
    assert masked[0] == 0.0 and max(masked[1:]) > 0.0, masked  # IcePop dropped stale tokens only
    assert trainer.trained_prompts == _prompt_order(trainer, STEPS)


@pytest.mark.slow
def test_a_checkpoint_leaves_the_batch_in_flight_out(uninterrupted):
    trainer, run = uninterrupted
    pps = trainer.cfg.rollout.prompts_per_step
    for step in range(1, STEPS + 1):
        saved = json.loads((run / "checkpoints" / f"step-{step:06d}" / "driver.json").read_text())
        # Step s+1's prompts were drawn (its rollout was in flight) when step s was saved: not counted.
        assert saved["sampler"]["position"] == step * pps, step


@pytest.mark.slow
def test_a_stop_with_a_batch_in_flight_resumes_without_skipping_or_repeating_a_prompt(uninterrupted, tmp_path):
    whole, _ = uninterrupted
    cfg, trainer = _trainer(tmp_path, "stopped")
    real_save = trainer.save

    def save_then_stop():
        path = real_save()
        if trainer.step == 2:
            assert trainer.rollouts.in_flight() == 1  # step 3's rollout is under way
            raise KeyboardInterrupt
        return path

    trainer.save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    finally:
        trainer.close()
    before = dict(trainer.trained_prompts)
    assert sorted(before) == [1, 2]
    _, again = _trainer(tmp_path, "stopped")  # the same command
    try:
        again.fit()
    finally:
        again.close()
    assert sorted(again.trained_prompts) == [3, 4]
    assert {**before, **again.trained_prompts} == whole.trained_prompts
    metrics = read_metrics(tmp_path / "stopped")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # The resumed step's batch comes from the resumed adapter; the next is one version behind again.
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.slow
def test_a_batch_older_than_the_bound_is_never_trained_on(ray_local, tiny_model_path, tmp_path):
    # The fault injected: a queue two steps deep under a bound of one. Step 3's batch was launched
    # before step 1 trained (version 0) and reaches a learner at version 2.
    _, trainer = _trainer(tmp_path, "too-deep")
    trainer.rollouts.depth = 2
    try:
        trainer.fit()
    finally:
        trainer.close()
    metrics = read_metrics(tmp_path / "too-deep")
    assert [m["rollout/staleness"] for m in metrics] == [0.0, 1.0, 2.0, 1.0]
    assert [m.get("rollout/stale_batch_skipped", 0.0) for m in metrics] == [0.0, 0.0, 1.0, 0.0]
    # Not trained on: no learner step and no new adapter version after step 3.
    assert ["learner/loss" in m for m in metrics] == [True, True, False, True]
    assert metrics[2]["time/sync_s"] == 0.0 and trainer.adapter_version == 3
