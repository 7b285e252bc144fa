"""Alert rules, written once: a plain Prometheus rules file and the PrometheusRule of `sovllm render k8s`.

Every serving rule uses vLLM's metric names, which `sovllm serve` exports too, so one rule set
watches either engine; the pipeline rules read the `sovllm:pipeline_*` series the stages push to a
Pushgateway (`sovllm.monitoring.push`). Rules group by `namespace` and `job` (no job names are
written in), so they cover every server Prometheus scrapes. Each rule is a threshold on an
expression: `Rule.signal` is the expression without its threshold, which the tests evaluate on a
real Prometheus scraping both engines to prove every rule watches series that exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from sovllm.config import Config

BY = "namespace, job"


@dataclass(frozen=True)
class Rule:
    name: str
    signal: str  # the watched expression
    comparison: str  # e.g. "> 10"
    duration: str
    severity: str
    summary: str
    action: str  # what to do

    @property
    def expr(self) -> str:
        return f"({self.signal}) {self.comparison}"

    def as_dict(self) -> dict:
        return {"alert": self.name, "expr": self.expr, "for": self.duration, "labels": {"severity": self.severity},
                "annotations": {"summary": self.summary, "description": self.action}}


def rules(cfg: Config) -> list[Rule]:
    m = cfg.monitoring
    requests = f"sum by ({BY}) (rate(http_requests_total[5m]))"
    errors = f'sum by ({BY}) (rate(http_requests_total{{status="5xx"}}[5m]))'
    # sovllm serve counts failed loads itself; on vLLM sovllm's plugin middleware counts them (vLLM has no such metric)
    failed_loads = f"sum by ({BY}) (increase(sovllm:adapter_load_failures_total[15m]))"
    return [
        Rule("SovllmRequestsWaiting", f"sum by ({BY}) (vllm:num_requests_waiting)", f"> {m.queue_waiting}", "5m",
             "warning", "More than {{ $value }} requests have been waiting in {{ $labels.job }} for 5 minutes.",
             "Add replicas (is the autoscaler at its maximum, or do new replicas not start?) or lower the load."),
        Rule("SovllmTimeToFirstTokenHigh",
             f"histogram_quantile(0.95, sum by ({BY}, le) (rate(vllm:time_to_first_token_seconds_bucket[5m])))",
             f"> {m.ttft_p95_seconds:g}", "10m", "warning",
             "Time to first token p95 is {{ $value | humanizeDuration }} in {{ $labels.job }}.",
             "Long prompts or a full batch: check the queue and KV-cache panels; add replicas or shorten contexts."),
        # 0 when no request failed (the 5xx series appears only with the first failure)
        Rule("SovllmErrorRate", f"({errors} or {requests} * 0) / {requests}", f"> {m.error_rate:g}", "5m",
             "critical", "{{ $value | humanizePercentage }} of requests to {{ $labels.job }} fail with 5xx.",
             "Read the server log; an engine error or out-of-memory restarts show here first."),
        Rule("SovllmKVCacheNearlyFull", f"max by ({BY}) (vllm:kv_cache_usage_perc)", f"> {m.kv_cache_usage:g}", "10m",
             "warning", "The KV cache of {{ $labels.job }} is {{ $value | humanizePercentage }} full.",
             "Requests will be preempted or wait: add replicas, lower max-num-seqs or the context length."),
        Rule("SovllmAdapterLoadFailures", failed_loads, "> 0", "0m", "warning",
             "Adapter loads failed in {{ $labels.job }} in the last 15 minutes.",
             "An adapter's folder, rank or base model is wrong: the server log and the load response name it."),
        Rule("SovllmPipelineStageFailed", "max by (project, stage) (sovllm:pipeline_stage_failed)", "> 0", "0m",
             "critical", "Stage {{ $labels.stage }} of project {{ $labels.project }} failed.",
             "The stage's manifest.json (error field) and the run's log say why; fix it and run again."),
        Rule("SovllmEvalGateRefused", "max by (project) (sovllm:pipeline_eval_gate_refused)", "> 0", "0m", "info",
             "The eval gate kept the champion of {{ $labels.project }}: the candidate was not better.",
             "Nothing breaks; read the eval report to see why the new adapter lost before retrying."),
        Rule("SovllmServerNotScraped", f"sum by ({BY}) (up)", "== 0", "5m", "critical",
             "No target of {{ $labels.job }} has been scraped for 5 minutes.",
             "Pods down, the metrics port blocked by a NetworkPolicy, or the ServiceMonitor selects nothing."),
    ]


def group(cfg: Config) -> dict:
    return {"name": "sovllm", "rules": [rule.as_dict() for rule in rules(cfg)]}


def rules_file(cfg: Config) -> dict:
    """A plain Prometheus rules file (`rule_files:` in prometheus.yml)."""
    return {"groups": [group(cfg)]}
