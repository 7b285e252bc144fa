"""`sovllm models list|prepare|fetch`: the base-model registry, and copying models from an object store."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from sovllm.progress import make_console

app = typer.Typer(help="Base models: list the registry, prepare a bundled model, fetch models from an object store.", no_args_is_help=True)
console = make_console()


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List registry models with their install and preparation state."""
    from sovllm.models.registry import list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="base models (any local Hugging Face model directory works too)")
    for column in ("name", "installed", "prepared", "base_id", "summary"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], "yes" if row["installed"] else f"no: {row['install']}",
                      "yes" if row["prepared"] else "no", (row["base_id"] or "-")[:16], row["summary"])
    console.print(table)
    for row in rows:
        console.print(f"note: {row['name']} is {row['note']}")


@app.command()
def prepare(
    name: str = typer.Argument("smollm2-135m-instruct", help="Registry name or local model directory."),
    force: bool = typer.Option(False, "--force", help="Convert again even if already prepared."),
) -> None:
    """Make a base model ready: dequantise a bundled GGUF once into a Hugging Face directory."""
    from sovllm.models.registry import prepare as prepare_model

    info = prepare_model(name, force=force, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    console.print(f"{info.name}: ready at {info.path}")
    console.print(f"base_id: {info.base_id}")
    if info.note:
        console.print(f"note: {info.note}")


@app.command()
def fetch(
    endpoint: str = typer.Option(..., "--endpoint", help="The S3-compatible object store, e.g. http://minio.minio:9000."),
    bucket: str = typer.Option(..., "--bucket", help="The bucket holding the archives."),
    base: str = typer.Option(..., "--base", help="Object key of the base model (.tgz of its folder)."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=KEY of an adapter archive (repeatable)."),
    to: str = typer.Option(..., "--to", help="Folder to fill: base/ and adapters/<name>/."),
    base_id: str = typer.Option(None, "--base-id", help="Expected weights hash of the base (default: the adapters' base_id)."),
) -> None:
    """Copy a base model and adapters from an object store, verified by sha256 (the serving init container).

    Credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Nothing is fetched from a model hub."""
    from pathlib import Path

    from sovllm import egress
    from sovllm.errors import ConfigError
    from sovllm.serve.fetch import Store
    from sovllm.serve.fetch import fetch as fetch_models

    adapters = {}
    for item in adapter:
        name, sep, key = item.partition("=")
        if not sep or not name or not key:
            raise ConfigError(f"--adapter {item!r}: expected NAME=KEY", hint="e.g. --adapter klinik=sovllm/klinik/adapter.tgz")
        adapters[name] = key
    from urllib.parse import urlsplit

    host = urlsplit(endpoint).hostname
    if not host or urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"--endpoint {endpoint!r}: expected http(s)://host:port")
    egress.install([host])  # this one store, nothing else
    done = fetch_models(Store(endpoint, bucket), base_key=base, adapters=adapters, to=Path(to), base_id=base_id,
                        log=lambda m: console.print(m, markup=False, highlight=False))
    console.print(f"ready: {Path(to) / 'base'} and {len(done['adapters'])} adapter(s) in {Path(to) / 'adapters'}")
