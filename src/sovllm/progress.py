"""Progress bars for long stages (rich), shown only on a terminal so logs and CI output stay clean."""

from __future__ import annotations

import os
from typing import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


def make_console(*, stderr: bool = False) -> Console:
    """A rich console. Off a terminal (a log file, CI, an Argo pod) rich assumes 80 columns and
    wraps every table cell; there it gets 160 unless COLUMNS says otherwise."""
    plain = Console(stderr=stderr)
    if plain.is_terminal or os.environ.get("COLUMNS"):
        return plain
    return Console(stderr=stderr, width=160)


class Bar:
    """One progress bar; `advance(label)` moves it by one and shows the current item."""

    def __init__(self, total: int, description: str, console: Console):
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("[dim]{task.fields[item]}"),
                                  console=console, transient=True, disable=not console.is_terminal)
        self._task = self._progress.add_task(description, total=total, item="")
        self._progress.start()

    def advance(self, item: str = "", step: int = 1) -> None:
        self._progress.update(self._task, advance=step, item=item)

    def close(self) -> None:
        self._progress.stop()


def bar_factory(description: str, console: Console | None = None) -> Callable[[int], Bar]:
    """A factory that stages call with their item count to open a bar."""
    return lambda total: Bar(total, description, console or make_console(stderr=True))
