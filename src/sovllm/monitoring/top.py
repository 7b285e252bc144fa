"""`sovllm top`: the serving panels' current values per server job, read from a Prometheus, like
`kubectl top` for LLM serving (no Grafana needed). The queries are the serving dashboard's, on
vLLM's metric names, so vLLM and `sovllm serve` show alike."""

from __future__ import annotations

import html
from dataclasses import dataclass

from sovllm.errors import BackendError

# column → (query per job, formatting)
COLUMNS = {
    "req/s": ('sum by (job) (rate(vllm:request_success_total{{{s}}}[{w}]))', "{:.2f}"),
    "gen tok/s": ('sum by (job) (rate(vllm:generation_tokens_total{{{s}}}[{w}]))', "{:.1f}"),
    "TTFT p95 s": ('histogram_quantile(0.95, sum by (job, le) (rate(vllm:time_to_first_token_seconds_bucket{{{s}}}[{w}])))',
                   "{:.3f}"),
    "ITL p95 s": ('histogram_quantile(0.95, sum by (job, le) (rate(vllm:inter_token_latency_seconds_bucket{{{s}}}[{w}])))',
                  "{:.3f}"),
    "E2E p95 s": ('histogram_quantile(0.95, sum by (job, le) (rate(vllm:e2e_request_latency_seconds_bucket{{{s}}}[{w}])))',
                  "{:.2f}"),
    "running": ('sum by (job) (vllm:num_requests_running{{{s}}})', "{:.0f}"),
    "waiting": ('sum by (job) (vllm:num_requests_waiting{{{s}}})', "{:.0f}"),
    "KV cache": ('max by (job) (vllm:kv_cache_usage_perc{{{s}}})', "{:.0%}"),
    "5xx/s": ('sum by (job) (rate(http_requests_total{{{s}, status="5xx"}}[{w}]))', "{:.2f}"),
}


@dataclass
class Row:
    job: str
    values: dict[str, float | None]

    def shown(self, column: str) -> str:
        value = self.values.get(column)
        if value is None or value != value:  # absent or NaN (no requests in the window)
            return "-"
        return COLUMNS[column][1].format(value)


def snapshot(url: str, *, namespace: str = ".*", job: str = ".*", window: str = "5m") -> list[Row]:
    """One row per job that exports vLLM's metrics, with each column's current value."""
    import httpx

    selector = f'namespace=~"{namespace}", job=~"{job}"' if namespace != ".*" else f'job=~"{job}"'
    rows: dict[str, Row] = {}
    for column, (template, _) in COLUMNS.items():
        query = template.format(s=selector, w=window)
        try:
            answer = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=30)
        except httpx.HTTPError as exc:
            raise BackendError(f"{url}: Prometheus did not answer ({type(exc).__name__}: {exc})",
                               hint="check the URL (e.g. http://prometheus.monitoring:9090) and egress.allow") from None
        if answer.status_code != 200 or answer.json().get("status") != "success":
            raise BackendError(f"{url}: query failed ({answer.status_code}): {answer.text[:300]}")
        for series in answer.json()["data"]["result"]:
            name = series["metric"].get("job", "?")
            rows.setdefault(name, Row(name, {})).values[column] = float(series["value"][1])
    return [rows[name] for name in sorted(rows)]


def as_html(rows: list[Row], url: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("job", *COLUMNS))
    body = "".join("<tr><td>" + html.escape(r.job) + "</td>" + "".join(f"<td>{html.escape(r.shown(c))}</td>"
                                                                       for c in COLUMNS) + "</tr>" for r in rows)
    return (f"<!doctype html><meta charset='utf-8'><title>sovllm top</title>"
            f"<style>body{{font-family:sans-serif}}td,th{{padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}</style>"
            f"<h1>sovllm top</h1><p>from {html.escape(url)}</p><table><tr>{head}</tr>{body}</table>\n")
