"""Grafana dashboards as JSON: serving overview, per adapter, pipeline.

The serving overview uses only vLLM's metric names, so it shows vLLM and `sovllm serve` alike; the
per-adapter view reads `sovllm:adapter_*` (`sovllm serve` exports them, on vLLM sovllm's plugin
middleware does, and `sovllm gateway` exports them with a `tenant` label, so the view works for any
engine behind the gateway, per tenant); the pipeline view reads the
`sovllm:pipeline_*` series the stages push (`sovllm.monitoring.push`). Every query is written
against template variables (datasource, namespace, job, model, adapter, tenant or project), never a job
name. `panels()` lists every query, which the tests run on a real Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass

RATE = "$__rate_interval"
SERVING = 'namespace=~"$namespace", job=~"$job", model_name=~"$model"'
HTTP = 'namespace=~"$namespace", job=~"$job"'
# series without a tenant (the servers' own) match tenant=~".*" too: "All" shows every job
ADAPTER = 'namespace=~"$namespace", job=~"$job", adapter=~"$adapter", tenant=~"$tenant"'
PIPELINE = 'project=~"$project"'


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]  # (expr, legend)
    description: str


def _quantiles(metric: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{SERVING}}}[{RATE}])))", f"p{int(q * 100)}")
                 for q in (0.5, 0.95, 0.99))


def serving_panels() -> list[Panel]:
    return [
        Panel("Requests / s", "reqps", ((f"sum by (job) (rate(vllm:request_success_total{{{SERVING}}}[{RATE}]))", "{{job}}"),),
              "Finished requests per second."),
        Panel("Tokens / s", "short",
              ((f"sum(rate(vllm:prompt_tokens_total{{{SERVING}}}[{RATE}]))", "prompt"),
               (f"sum(rate(vllm:generation_tokens_total{{{SERVING}}}[{RATE}]))", "generated")),
              "Prefill and decode throughput."),
        Panel("Time to first token", "s", _quantiles("vllm:time_to_first_token_seconds"),
              "Queue wait plus prefill: what a user waits before the first word."),
        Panel("Inter-token latency", "s", _quantiles("vllm:inter_token_latency_seconds"),
              "Time between streamed tokens: the reading speed."),
        Panel("End-to-end latency", "s", _quantiles("vllm:e2e_request_latency_seconds"),
              "Arrival to last token."),
        Panel("Queue", "short",
              ((f"sum(vllm:num_requests_running{{{SERVING}}})", "running"),
               (f"sum(vllm:num_requests_waiting{{{SERVING}}})", "waiting")),
              "Requests decoding and waiting; the autoscaler adds replicas on waiting."),
        Panel("KV cache used", "percentunit", ((f"max by (job) (vllm:kv_cache_usage_perc{{{SERVING}}})", "{{job}}"),),
              "Near 100 % requests wait or are preempted."),
        Panel("Preemptions / s", "short", ((f"sum(rate(vllm:num_preemptions_total{{{SERVING}}}[{RATE}]))", "preempted"),),
              "Sequences evicted from the KV cache and recomputed (always 0 on sovllm serve)."),
        Panel("Prefix cache hit rate", "percentunit",
              ((f"sum(rate(vllm:prefix_cache_hits_total{{{SERVING}}}[{RATE}])) / "
                f"sum(rate(vllm:prefix_cache_queries_total{{{SERVING}}}[{RATE}]))", "hits"),),
              "Share of prompt tokens served from the prefix cache (shared system prompts, contexts)."),
        Panel("Finish reasons / s", "reqps",
              ((f"sum by (finished_reason) (rate(vllm:request_success_total{{{SERVING}}}[{RATE}]))", "{{finished_reason}}"),),
              "stop: the model ended; length: max_tokens cut it; abort: the client went away."),
        Panel("Responses by status / s", "reqps",
              ((f"sum by (status, handler) (rate(http_requests_total{{{HTTP}}}[{RATE}]))", "{{status}} {{handler}}"),),
              "Errors by reason: 4xx are the clients' (bad requests, keys, unknown models), 5xx the server's."),
    ]


def adapter_panels() -> list[Panel]:
    return [
        Panel("Requests / s per adapter", "reqps",
              ((f"sum by (adapter) (rate(sovllm:adapter_requests_total{{{ADAPTER}}}[{RATE}]))", "{{adapter}}"),),
              "__base__ is the base model."),
        Panel("Tokens / s per adapter", "short",
              ((f"sum by (adapter, kind) (rate(sovllm:adapter_tokens_total{{{ADAPTER}}}[{RATE}]))", "{{adapter}} {{kind}}"),),
              "Prompt and generated tokens."),
        Panel("Finish reasons per adapter", "reqps",
              ((f"sum by (adapter, finished_reason) (rate(sovllm:adapter_requests_total{{{ADAPTER}}}[{RATE}]))",
                "{{adapter}} {{finished_reason}}"),),
              "An adapter that often hits length may not have learnt to stop."),
        Panel("Requests / s per tenant", "reqps",
              ((f'sum by (tenant, adapter) (rate(sovllm:adapter_requests_total{{{ADAPTER}, tenant!=""}}[{RATE}]))',
                "{{tenant}} {{adapter}}"),),
              "Through sovllm gateway: which team uses which adapter (an alias's A/B variants show separately)."),
        Panel("Failed adapter loads", "short",
              ((f"sum by (adapter) (increase(sovllm:adapter_load_failures_total{{{ADAPTER}}}[1h]))", "{{adapter}}"),),
              "In the last hour; the server log says why."),
    ]


def pipeline_panels() -> list[Panel]:
    return [
        Panel("Stage duration", "s", ((f"max by (stage) (sovllm:pipeline_stage_duration_seconds{{{PIPELINE}}})", "{{stage}}"),),
              "The last run of each stage (0-ish when it was up to date)."),
        Panel("Stage failed", "short", ((f"max by (stage) (sovllm:pipeline_stage_failed{{{PIPELINE}}})", "{{stage}}"),),
              "1 when the stage's last run failed."),
        Panel("Pairs generated and kept", "short",
              ((f"max(sovllm:pipeline_pairs_generated{{{PIPELINE}}})", "generated"),
               (f"max(sovllm:pipeline_pairs_kept{{{PIPELINE}}})", "kept")),
              "synth's pairs, and curate's kept answerable pairs."),
        Panel("Errors", "short", ((f"max by (stage) (sovllm:pipeline_stage_errors{{{PIPELINE}}})", "{{stage}}"),),
              "Records a stage could not use (synth: failed generations)."),
        Panel("Training val loss", "short", ((f"max(sovllm:pipeline_train_loss{{{PIPELINE}}})", "best val loss"),),
              "Best validation loss of the last training."),
        Panel("Eval F1 (gold context)", "percentunit",
              ((f"max by (model) (sovllm:pipeline_eval_f1{{{PIPELINE}}})", "{{model}}"),), "The headline per model."),
        Panel("Promotions", "short",
              ((f"max(sovllm:pipeline_eval_promoted{{{PIPELINE}}})", "promoted"),
               (f"max(sovllm:pipeline_eval_gate_refused{{{PIPELINE}}})", "gate refused")),
              "1 when the last eval --promote moved the champion alias, or kept the old champion."),
    ]


def _variable(name: str, query: str, label: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "includeAll": True,
            "allValue": ".*", "multi": True, "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1}


def _dashboard(uid: str, title: str, panels: list[Panel], variables: list[dict], description: str) -> dict:
    source = {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
              "current": {}, "refresh": 1}
    built = []
    for i, panel in enumerate(panels):
        built.append({
            "id": i + 1, "type": "timeseries", "title": panel.title, "description": panel.description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, (expr, legend) in enumerate(panel.queries)],
        })
    return {"uid": uid, "title": title, "description": description, "tags": ["sovllm"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "templating": {"list": [source, *variables]},
            "annotations": {"list": []}, "panels": built}


def dashboards() -> dict[str, dict]:
    """file stem → Grafana dashboard JSON."""
    namespace = _variable("namespace", "label_values(vllm:num_requests_running, namespace)", "Namespace")
    job = _variable("job", 'label_values(vllm:num_requests_running{namespace=~"$namespace"}, job)', "Job")
    model = _variable("model", 'label_values(vllm:num_requests_running{namespace=~"$namespace", job=~"$job"}, '
                               'model_name)', "Model")
    adapter_job = _variable("job", 'label_values(sovllm:adapter_requests_total{namespace=~"$namespace"}, job)', "Job")
    adapter = _variable("adapter", 'label_values(sovllm:adapter_requests_total{namespace=~"$namespace", '
                                   'job=~"$job"}, adapter)', "Adapter")
    tenant = _variable("tenant", 'label_values(sovllm:adapter_requests_total{namespace=~"$namespace", '
                                 'job=~"$job"}, tenant)', "Tenant (gateway)")
    project = _variable("project", "label_values(sovllm:pipeline_stage_duration_seconds, project)", "Project")
    return {
        "sovllm-serving": _dashboard("sovllm-serving", "sovllm / serving", serving_panels(), [namespace, job, model],
                                     "vLLM and sovllm serve on vLLM's metric names."),
        "sovllm-adapters": _dashboard("sovllm-adapters", "sovllm / adapters", adapter_panels(),
                                      [namespace, adapter_job, adapter, tenant],
                                      "Per adapter (and per tenant behind sovllm gateway): sovllm:adapter_* series."),
        "sovllm-pipeline": _dashboard("sovllm-pipeline", "sovllm / pipeline", pipeline_panels(), [project],
                                      "What each stage pushed to the Pushgateway."),
    }


def panels() -> dict[str, list[Panel]]:
    return {"sovllm-serving": serving_panels(), "sovllm-adapters": adapter_panels(), "sovllm-pipeline": pipeline_panels()}


def concrete(expr: str, values: dict[str, str] | None = None) -> str:
    """A dashboard query with its template variables filled in (all values by default), as Grafana
    sends it to Prometheus."""
    values = {"namespace": ".*", "job": ".*", "model": ".*", "adapter": ".*", "tenant": ".*", "project": ".*",
              "__rate_interval": "1m", **(values or {})}
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${name}", values[name])
    return expr
