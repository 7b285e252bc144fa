"""Prometheus metrics of the gateway: sovllm serve's per-adapter series with a `tenant` label.

`sovllm:adapter_requests_total{adapter, finished_reason, tenant}`, `sovllm:adapter_tokens_total{
adapter, kind, tenant}` and `sovllm:adapter_load_failures_total{adapter, tenant}` carry the names
`sovllm serve` exports, so the per-adapter dashboard (which sums over the other labels) works for
vLLM behind the gateway. Label values are only configured tenant and model names. The gateway's
own series: `sovllm:gateway_rejected_total{tenant, reason}` (`auth`, `not_found`, `forbidden`,
`rate_limit`, `bad_request`), `sovllm:gateway_upstream_healthy{upstream}`,
`sovllm:gateway_time_to_first_byte_seconds{tenant}` and `http_requests_total{handler, method, status}`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.adapter_requests = Counter("sovllm:adapter_requests", "Finished requests per adapter.",
                                        ["adapter", "finished_reason", "tenant"], registry=r)
        self.adapter_tokens = Counter("sovllm:adapter_tokens", "Prompt and generated tokens per adapter.",
                                      ["adapter", "kind", "tenant"], registry=r)
        self.adapter_load_failures = Counter("sovllm:adapter_load_failures", "Adapter loads that failed.",
                                             ["adapter", "tenant"], registry=r)
        self.rejected = Counter("sovllm:gateway_rejected", "Requests the gateway refused, by reason.",
                                ["tenant", "reason"], registry=r)
        self.upstream_healthy = Gauge("sovllm:gateway_upstream_healthy", "1 while the upstream's /health answers.",
                                      ["upstream"], registry=r)
        self.ttfb = Histogram("sovllm:gateway_time_to_first_byte_seconds",
                              "From the request's arrival to the first response byte from the upstream.",
                              ["tenant"], buckets=TTFB_BUCKETS, registry=r)
        self.http_requests = Counter("http_requests", "Total number of requests by method, status and handler.",
                                     ["handler", "method", "status"], registry=r)

    def finished(self, tenant: str, adapter: str, reason: str, prompt: int, completion: int) -> None:
        self.adapter_requests.labels(adapter, reason, tenant).inc()
        if prompt:
            self.adapter_tokens.labels(adapter, "prompt", tenant).inc(prompt)
        if completion:
            self.adapter_tokens.labels(adapter, "generation", tenant).inc(completion)

    def render(self, pool) -> bytes:
        for upstream in pool.upstreams:
            self.upstream_healthy.labels(upstream.url).set(1 if upstream.healthy else 0)
        return generate_latest(self.registry)
