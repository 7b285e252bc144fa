"""docs/cli.md is generated from the CLI: it must match what the generator writes today, and the
generator must describe commands as `--help` does (hidden ones left out, no terminal dependence)."""

from __future__ import annotations

import difflib
from pathlib import Path

import typer

from sovllm.cli import reference

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_docs_cli_md_matches_the_cli():
    expected = reference.render()
    current = DOCS.read_text(encoding="utf-8")
    if current != expected:
        diff = "".join(list(difflib.unified_diff(current.splitlines(keepends=True), expected.splitlines(keepends=True),
                                                 "docs/cli.md", "generated"))[:40])
        raise AssertionError(f"docs/cli.md differs from the CLI's help: run `make docs`\n{diff}")


def _toy_app() -> typer.Typer:
    app = typer.Typer(name="toy", help="A toy CLI.", add_completion=False, rich_markup_mode=None)

    @app.command()
    def visible(
        target: str = typer.Argument(..., help="What to act on."),
        count: int = typer.Option(3, "--count", help="How many times."),
        secret: bool = typer.Option(False, "--secret", hidden=True, help="Not for users."),
    ) -> None:
        """Do the visible thing with <TARGET>."""

    @app.command(hidden=True)
    def internal() -> None:
        """An internal command."""

    sub = typer.Typer(help="A group of tools.")

    @sub.command("tool")
    def tool() -> None:
        """Use the tool."""

    app.add_typer(sub, name="group")
    return app


def test_reference_lists_visible_commands_and_options_with_defaults_and_leaves_hidden_ones_out():
    page = reference.render(_toy_app(), name="toy")
    assert "## `toy visible`" in page and "## `toy group tool`" in page
    assert "toy visible [OPTIONS] {target}" in page
    assert "- `target <str>`: What to act on.  [required]" in page
    assert "- `--count <int>`: How many times.  [default: 3]" in page
    assert "Do the visible thing with \\<TARGET>." in page  # a bare <TARGET> would be read as HTML
    assert "internal" not in page and "--secret" not in page and "Not for users" not in page
    assert "- [`toy group tool`](#toy-group-tool): Use the tool." in page


def test_reference_does_not_depend_on_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = reference.render()
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert reference.render() == narrow


def test_every_sovllm_option_in_help_appears_in_the_reference():
    from sovllm.cli.app import app

    page = reference.render()
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        section = page.split(f"## `sovllm {name}`", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            if not param.hidden and param.param_type_name == "option":
                assert all(opt in section for opt in [*param.opts, *param.secondary_opts]), (name, param.opts)


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text("# old\n", encoding="utf-8")
    assert reference.main(["--check", str(stale)]) == 1
    assert "run `make docs`" in capsys.readouterr().err
    assert reference.main([str(stale)]) == 0
    assert reference.main(["--check", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == reference.render()
