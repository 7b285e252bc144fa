"""`sovllm top`: the serving panels' current values per server, from a Prometheus (no Grafana needed)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sovllm.progress import make_console

console = make_console()


def top(
    prometheus: str = typer.Option("http://127.0.0.1:9090", "--prometheus", help="Prometheus base URL."),
    namespace: str = typer.Option(".*", "--namespace", help="Namespace label (regular expression)."),
    job: str = typer.Option(".*", "--job", help="Job label (regular expression)."),
    window: str = typer.Option("5m", "--window", help="Rate and quantile window (a Prometheus duration)."),
    html: Path = typer.Option(None, "--html", help="Also write the table as an HTML page here."),
    project: Path = typer.Option(None, "--project", "-p", help="Project whose egress.allow names the Prometheus host."),
) -> None:
    """Requests, tokens, latency quantiles, queue, KV cache and errors per server job, like kubectl top."""
    from urllib.parse import urlsplit

    from sovllm import egress
    from sovllm.config import load_config
    from sovllm.errors import ConfigError
    from sovllm.monitoring.top import COLUMNS, as_html, snapshot

    if urlsplit(prometheus).scheme not in ("http", "https") or not urlsplit(prometheus).hostname:
        raise ConfigError(f"--prometheus {prometheus!r}: expected http(s)://host:port")
    cfg = load_config(project) if project else None
    egress.install(cfg.egress.allow if cfg else [], proxy=cfg.egress.proxy if cfg else None)
    rows = snapshot(prometheus, namespace=namespace, job=job, window=window)
    if not rows:
        console.print(f"no server exports vLLM's metrics at {prometheus} (namespace {namespace}, job {job})")
        raise typer.Exit(1)
    table = Table(title=f"sovllm top — {prometheus}, last {window}")
    for column in ("job", *COLUMNS):
        table.add_column(column, justify="left" if column == "job" else "right")
    for row in rows:
        table.add_row(row.job, *(row.shown(c) for c in COLUMNS))
    console.print(table)
    if html:
        html.write_text(as_html(rows, prometheus), encoding="utf-8")
        console.print(f"wrote {html}")


def register(app: typer.Typer) -> None:
    app.command()(top)
