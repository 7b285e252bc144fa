"""Evaluation: run base and adapters on the eval split, score them, compare them honestly, report."""
