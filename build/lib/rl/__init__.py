"""placerl training system: the driver, config, GRPO math, data and checkpoints; rollout/, learner/, diagnostics/ and experiments/ below."""
