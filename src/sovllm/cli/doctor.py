"""`sovllm doctor`: environment, bundled model and sovereignty checks."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sovllm.cli import options
from sovllm.progress import make_console

console = make_console()
_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def doctor(
    directory: Path = options.project_dir(),
    set_: list[str] = options.overrides(),
) -> None:
    """Check versions, CPU/GPU, disk, the bundled model and endpoints outside the allow-list."""
    from sovllm.doctor import run_checks

    checks = run_checks(directory, tuple(set_))
    table = Table(title="sovllm doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for check in checks:
        table.add_row(check.name, f"[{_STYLE[check.status]}]{check.status}[/]", check.detail)
    console.print(table)
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed:[/] {', '.join(failed)}")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
