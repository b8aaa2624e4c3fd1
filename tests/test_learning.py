"""The loop learns, it does not only run: on the synthetic arithmetic task, a seeded
GRPO run of SmolLM2-135M-Instruct raises its mean reward.

The reward is strict GSM8K correctness (the number after '####') plus a small bonus for
the '####' line itself; the base model rarely uses that format, so the signal GRPO has
to find is real but reachable in a few steps on a CPU.
"""
from pathlib import Path

import pytest

from rl.config import load_config
from rl.metrics_log import read_metrics

REPO = Path(__file__).resolve().parent.parent
# Eight SmolLM2 GRPO steps of 32 completions of at most 40 tokens: rollouts from merged
# weights and logits only over completions make a step 25-45 s on a 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

STEPS = 8


def test_mean_reward_rises_on_synthetic_arithmetic(ray_local, smollm2_path, tmp_path):
    from rl.trainer import Trainer

    cfg = load_config(REPO / "launch/configs/gsm8k_grpo.yaml", [
        "data.task=synthetic", "data.synthetic_max_ops=1", "data.synthetic_size=512",
        "data.instruction=Solve the problem. Give the final answer on its own line as '#### <number>'.",
        f"trainer.steps={STEPS}", "trainer.eval_size=0", f"trainer.save_every={STEPS}",
        "rollout.prompts_per_step=4", "rollout.group_size=8", "rollout.max_new_tokens=40",
        "learner.lr=5e-4", "learner.warmup_steps=0", "learner.micro_batch_size=8",
        "reward.functions=[{name: gsm8k_strict, weight: 1.0}, {name: format_hash, weight: 0.5}]",
        f"logging.output_dir={tmp_path}", "logging.run_name=learn", "logging.progress=false",
        "logging.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "learn")
    try:
        trainer.fit()
    finally:
        trainer.close()
    rewards = [m["reward/mean"] for m in read_metrics(tmp_path / "learn") if "reward/mean" in m]
    assert len(rewards) == STEPS
    early, late = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"mean reward per step: {[round(r, 3) for r in rewards]}; first 3 {early:.3f}, last 3 {late:.3f}")
    assert late > early + 0.1, rewards
