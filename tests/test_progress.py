"""Console output off a terminal: tables in logs (CI, Argo pods) do not wrap at rich's 80 columns."""

from __future__ import annotations

from rich.table import Table

from sovllm.progress import make_console


def test_off_a_terminal_tables_get_160_columns_unless_columns_is_set(monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    console = make_console()
    assert not console.is_terminal and console.width == 160
    table = Table("metric", "base", "adapter", "adapter − base")
    table.add_row("token F1 (answerable)", "0.221", "0.196", "-0.025 [-0.098, +0.050] no difference")
    console.print(table)
    assert "-0.025 [-0.098, +0.050] no difference" in capsys.readouterr().out  # one cell, one line
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console().width == 100
