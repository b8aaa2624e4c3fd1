"""placerl training system: the driver, config, GRPO math, data, checkpoints and the GRPO probe's rollout; rollout/, learner/, diagnostics/ and experiments/ below."""
