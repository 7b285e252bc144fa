"""`sovllm gateway`, `sovllm usage` and `sovllm ab`: the multi-tenant proxy, its usage and its A/B splits."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from sovllm.cli.options import overrides, project_dir
from sovllm.progress import make_console

console = make_console()
app = typer.Typer(help="The multi-tenant OpenAI-compatible gateway: tenants, keys, adapter access, limits, A/B.",
                  no_args_is_help=True)
ab_app = typer.Typer(help="A/B splits of gateway aliases: reports, recommendations, changes.", no_args_is_help=True)


def _store(root, cfg):
    from sovllm.gateway.usage import database_url, open_engine

    return open_engine(database_url(cfg.gateway.usage_database, Path(root) / cfg.project.output_dir,
                                   cfg.gateway.usage_database_env))


@app.command("serve")
def serve(
    directory: Path = project_dir(),
    set_: list[str] = overrides(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port (0: any free port; see --ready-file)."),
    grace_period: float = typer.Option(30.0, "--grace-period", help="Seconds running streams may finish after "
                                                                    "SIGTERM."),
    ready_file: Path = typer.Option(None, "--ready-file", help="Write {host, port, pid} here once listening."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve the project's gateway: tenants and aliases from sovllm.yaml's `gateway:` section."""
    import logging

    from sovllm.cli.options import load_project
    from sovllm.gateway.server import serve as run

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root, cfg = load_project(directory, set_)
    run(root, cfg, host=host, port=port, ready_file=str(ready_file) if ready_file else None, log_level=log_level,
        grace_period=grace_period)


@app.command("new-key")
def new_key() -> None:
    """Print a fresh random API key and, on stderr, the sha256 to put into the config."""
    from sovllm.gateway.keys import digest
    from sovllm.gateway.keys import new_key as make

    key = make()
    typer.echo(key)
    typer.echo(f"sha256: {digest(key)}", err=True)


@app.command("hash-key")
def hash_key() -> None:
    """Read keys from stdin (one per line) and print the sha256 of each, for `keys: [{sha256: ...}]`."""
    from sovllm.errors import ConfigError
    from sovllm.gateway.keys import digest

    keys = [line.strip() for line in sys.stdin if line.strip()]
    if not keys:
        raise ConfigError("no key on stdin", hint="e.g. sovllm gateway hash-key < key.txt")
    for key in keys:
        typer.echo(digest(key))


def usage(
    directory: Path = project_dir(),
    set_: list[str] = overrides(),
    hours: float = typer.Option(24.0, "--hours", help="Report the last N hours."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Requests, tokens, latency and errors per tenant and model, from the gateway's usage store."""
    from rich.table import Table

    from sovllm.cli.options import load_project
    from sovllm.gateway.report import usage_rows

    root, cfg = load_project(directory, set_)
    rows = usage_rows(_store(root, cfg), time.time() - hours * 3600)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"gateway usage, last {hours:g} h")
    columns = ["tenant", "model", "adapter", "requests", "errors", "prompt_tokens", "completion_tokens",
               "latency_p50_s", "latency_p95_s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("tenant", "model", "adapter") else "right")
    for row in rows:
        table.add_row(*("-" if row[c] is None else f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                        for c in columns))
    console.print(table)


@ab_app.command("report")
def ab_report(
    alias: str = typer.Argument(..., help="The gateway alias (gateway.aliases) to report on."),
    directory: Path = typer.Option(Path("."), "--project", "-p", help="Project folder with sovllm.yaml."),
    set_: list[str] = overrides(),
    hours: float = typer.Option(168.0, "--hours", help="Requests and feedback of the last N hours."),
    min_feedback: int = typer.Option(30, "--min-feedback", help="Ratings per variant before any recommendation."),
    apply: bool = typer.Option(False, "--apply", help="Apply the recommendation: change the split (and the MLflow "
                                                      "aliases champion/challenger when the alias names a "
                                                      "registered_model)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Per-variant volume, latency, errors and feedback with 95% intervals, a test, and keep/promote/rollback."""
    from sovllm.cli.options import load_project
    from sovllm.errors import ConfigError
    from sovllm.gateway.ab import applied_routes, report
    from sovllm.gateway.report import apply_split, current_routes, render_ab

    root, cfg = load_project(directory, set_)
    if alias not in cfg.gateway.aliases:
        raise ConfigError(f"gateway.aliases has no '{alias}'", hint=f"aliases: {', '.join(cfg.gateway.aliases) or '-'}")
    engine = _store(root, cfg)
    result = report(engine, alias, current_routes(engine, cfg, alias), time.time() - hours * 3600,
                    min_feedback=min_feedback)
    change = applied_routes(result)
    result["apply"] = {"routes": change[0], "reason": change[1]} if change else None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_ab(console, result)
    if apply:
        if change is None:
            console.print("nothing to apply: every challenger stays as it is")
            return
        for line in apply_split(cfg, engine, alias, *change):
            console.print(line)
        registered = cfg.gateway.aliases[alias].registered_model
        if registered:
            from sovllm.evaluate.promotion import settle_challenger

            console.print(settle_challenger(root, cfg, registered, change[1].startswith("promote"), console.print))


@ab_app.command("set")
def ab_set(
    alias: str = typer.Argument(..., help="The gateway alias to change."),
    routes: list[str] = typer.Argument(..., help="ADAPTER=WEIGHT pairs, e.g. acme-v3=0.9 acme-v4=0.1."),
    directory: Path = typer.Option(Path("."), "--project", "-p", help="Project folder with sovllm.yaml."),
    set_: list[str] = overrides(),
    reason: str = typer.Option("set by hand", "--reason", help="Recorded with the split."),
) -> None:
    """Set an alias's split by hand (also the documented rollback: give the old weights back)."""
    from sovllm.cli.options import load_project
    from sovllm.gateway.report import parse_routes, set_routes

    root, cfg = load_project(directory, set_)
    engine = _store(root, cfg)
    console.print(set_routes(cfg, engine, alias, parse_routes(routes), reason))


@ab_app.command("history")
def ab_history(
    alias: str = typer.Argument(..., help="The gateway alias."),
    directory: Path = typer.Option(Path("."), "--project", "-p", help="Project folder with sovllm.yaml."),
    set_: list[str] = overrides(),
) -> None:
    """Every split the alias had, newest last (what a rollback goes back to)."""
    from sovllm.cli.options import load_project
    from sovllm.gateway.usage import split_history

    root, cfg = load_project(directory, set_)
    rows = split_history(_store(root, cfg), alias)
    if not rows:
        console.print(f"{alias}: the config's split {cfg.gateway.aliases.get(alias).routes if alias in cfg.gateway.aliases else '-'} "
                      "(never changed)")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"]))
        console.print(f"{when}  {json.dumps(row['routes'])}  {row['reason'] or ''}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="gateway")
    root.command("usage")(usage)
    root.add_typer(ab_app, name="ab")
