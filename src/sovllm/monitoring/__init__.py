"""Observability: alert rules on vLLM's metric names (both engines) and the pipeline's pushed metrics."""
