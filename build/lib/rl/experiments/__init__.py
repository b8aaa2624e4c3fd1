"""Experiments built on training runs: the SFT-vs-GRPO regime contrast and placement comparisons, with their reports and plots."""
