"""The Grafana dashboards' JSON: the template variables the issue names, no job names written in,
queries only on the series sovllm and vLLM export, valid panel layout."""

from __future__ import annotations

import json
import re

from sovllm.monitoring import dashboards
from sovllm.monitoring.push import exposition

SERVING_METRICS = {"vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                   "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                   "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total",
                   "vllm:prefix_cache_queries_total", "http_requests_total"}


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"((?:vllm|sovllm):[a-z0-9_:]+|http_requests_total)\{", expr))


def test_three_dashboards_with_the_variables_and_no_job_names():
    boards = dashboards.dashboards()
    assert set(boards) == {"sovllm-serving", "sovllm-adapters", "sovllm-pipeline"}
    variables = {stem: [v["name"] for v in board["templating"]["list"]] for stem, board in boards.items()}
    assert variables["sovllm-serving"] == ["datasource", "namespace", "job", "model"]
    assert variables["sovllm-adapters"] == ["datasource", "namespace", "job", "adapter", "tenant"]
    assert variables["sovllm-pipeline"] == ["datasource", "project"]
    for stem, board in boards.items():
        json.dumps(board)  # plain JSON
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)) and all(p["targets"] for p in board["panels"])
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}"
            for target in panel["targets"]:
                assert not re.search(r'job="', target["expr"]), target["expr"]  # never a hard-coded job
                assert "$job" in target["expr"] or stem == "sovllm-pipeline"


def test_queries_read_only_series_that_exist():
    for panel in dashboards.serving_panels():
        for expr, _ in panel.queries:
            assert metrics_in(expr) and metrics_in(expr) <= SERVING_METRICS, expr
    pushed = {line.split("{")[0] for stage in ("ingest", "synth", "curate", "train", "eval")
              for line in exposition(stage, seconds=1, failed=False, skipped=False,
                                     counts={"pairs": 1, "kept": 1, "steps": 1},
                                     extra={"metrics": {"best_val_loss": 0.1}, "headline": {"m": {"f1": 0.5}},
                                            "promotion": {"promoted": True}}).splitlines()
              if not line.startswith("#")}
    for panel in dashboards.pipeline_panels():
        for expr, _ in panel.queries:
            assert metrics_in(expr) <= pushed, expr  # every pipeline panel reads a series a stage pushes
    assert dashboards.concrete('rate(x{job=~"$job"}[$__rate_interval])') == 'rate(x{job=~".*"}[1m])'
