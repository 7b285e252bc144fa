"""Prometheus metrics of the server, under vLLM's names and labels, plus sovllm's per-adapter series.

A dashboard or alert written for vLLM works unchanged: `model_name` is the served base name (as in
vLLM, adapters do not get their own `model_name`), histograms use vLLM's buckets, and the gauges
are read from the engine at scrape time. What the terms mean here:

- `vllm:num_requests_running` / `_waiting`: requests with a KV-cache slot / queued for one.
- `vllm:kv_cache_usage_perc`: share of KV-cache slots in use (a slot holds one sequence's whole
  context window, the analogue of vLLM's blocks).
- `vllm:num_preemptions_total`: always 0 — a sequence keeps its slot from admission to the end.
- `vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total`: prompt tokens looked up in
  the prefix cache / found there (both stay 0 with `--no-enable-prefix-caching`).
- `vllm:lora_requests_info`: value = time of the scrape; labels name the adapters of running and
  waiting requests and `max_lora` (adapters loaded at most at once: unlimited here, reported 0).

sovllm's own series split traffic by adapter (`__base__` for the base model):
`sovllm:adapter_requests_total{adapter, finished_reason}`, `sovllm:adapter_tokens_total{adapter,
kind}` (`prompt` | `generation`) and `sovllm:adapter_load_failures_total{adapter}` (a client may
name anything: only valid adapter names become label values, at most 64 distinct; the rest count
under `__other__`, so the exposition stays small and always valid UTF-8).
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sovllm.models.adapter import BASE_LABEL, OTHER_LABEL, bounded_label

disable_created_metrics()  # no `*_created` series: the exposition matches what vLLM dashboards expect

BASE = BASE_LABEL
OTHER = OTHER_LABEL  # load failures of invalid names, or beyond MAX_FAILURE_LABELS distinct names
MAX_FAILURE_LABELS = 64
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    """One registry per server; every method is safe to call from the engine thread."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", m,
                             registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", m,
                             registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", m,
                              registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", m,
                                   registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", m,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               m + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", m,
                             buckets=E2E_BUCKETS, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.", m, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens.", m, registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                               ["running_lora_adapters", "max_lora", "waiting_lora_adapters"], registry=r)
        self.adapter_requests = Counter("sovllm:adapter_requests", "Finished requests per adapter.",
                                        ["adapter", "finished_reason"], registry=r)
        self.adapter_tokens = Counter("sovllm:adapter_tokens", "Prompt and generated tokens per adapter.",
                                      ["adapter", "kind"], registry=r)
        self.adapter_load_failures = Counter("sovllm:adapter_load_failures", "Adapter loads that failed.",
                                             ["adapter"], registry=r)
        # what vLLM's API server exports through prometheus-fastapi-instrumentator: responses by route
        # template (never the raw path), method and status class, so one error-rate query fits both
        self.http_requests = Counter("http_requests", "Total number of requests by method, status and handler.",
                                     ["handler", "method", "status"], registry=r)
        for child in (self.preemptions, self.prompt_tokens, self.generation_tokens, self.prefix_queries,
                      self.prefix_hits):
            child.labels(model_name)  # present (at 0) from the first scrape, as in vLLM
        self._engine = None
        self._lora_labels: tuple | None = None
        self._failure_labels: set[str] = set()

    # --- from the engine thread ---------------------------------------------------------------------

    def prompt(self, adapter: str | None, tokens: int, cached: int | None = None) -> None:
        """A prefilled prompt of `tokens` tokens, `cached` of them from the prefix cache (None: caching off)."""
        self.prompt_tokens.labels(self.model_name).inc(tokens)
        if cached is not None:
            self.prefix_queries.labels(self.model_name).inc(tokens)
            self.prefix_hits.labels(self.model_name).inc(cached)
        self.adapter_tokens.labels(adapter or BASE, "prompt").inc(tokens)

    def token(self, adapter: str | None, first: bool, since: float) -> None:
        """One generated token; `since` = seconds since arrival (first token) or since the previous token."""
        self.generation_tokens.labels(self.model_name).inc()
        self.adapter_tokens.labels(adapter or BASE, "generation").inc()
        (self.ttft if first else self.itl).labels(self.model_name).observe(since)

    def finished(self, adapter: str | None, reason: str, seconds: float) -> None:
        """A request ended (`stop`, `length`, `abort` or `error`)."""
        if reason in ("stop", "length"):
            self.success.labels(self.model_name, reason).inc()
            self.e2e.labels(self.model_name).observe(seconds)
        self.adapter_requests.labels(adapter or BASE, reason).inc()

    def load_failed(self, adapter: str) -> None:
        """A failed load. The name comes from a client: only a valid adapter name becomes a label value,
        and at most `MAX_FAILURE_LABELS` distinct ones; any other counts under `__other__`."""
        self.adapter_load_failures.labels(bounded_label(adapter, self._failure_labels, MAX_FAILURE_LABELS)).inc()

    # --- at scrape time -----------------------------------------------------------------------------

    def attach(self, engine) -> None:
        """Read the gauges from `engine` (its `load()` snapshot) whenever Prometheus scrapes."""
        self._engine = engine

    def http_response(self, handler: str, method: str, status: int) -> None:
        self.http_requests.labels(handler, method, f"{status // 100}xx").inc()

    def render(self) -> bytes:
        if self._engine is not None:
            load = self._engine.load()
            self.running.labels(self.model_name).set(load["running"])
            self.waiting.labels(self.model_name).set(load["waiting"])
            self.kv_usage.labels(self.model_name).set(load["slots_used"] / max(load["slots"], 1))
            labels = (",".join(load["running_adapters"]), "0", ",".join(load["waiting_adapters"]))
            if self._lora_labels and self._lora_labels != labels:
                self.lora_info.remove(*self._lora_labels)  # one current series, as vLLM shows it
            self._lora_labels = labels
            self.lora_info.labels(*labels).set(time.time())
        return generate_latest(self.registry)
