"""`sovllm models list|prepare`: the base-model registry."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from sovllm.progress import make_console

app = typer.Typer(help="Base models: list the registry, prepare a bundled model.", no_args_is_help=True)
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
