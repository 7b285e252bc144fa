"""Benchmarks: one script per benchmark, each printing JSON with ours, the baseline and the ratio."""
