"""Benchmarks: each prints ratios measured within one run (framework against raw engine, diagnostics on against off, scorer cost against a training run)."""
