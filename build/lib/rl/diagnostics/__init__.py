"""Gradient diagnostics: capture hooks, per-capture statistics, pure tensor statistics, metric records and the TRL callback."""
