"""The CLI reference (docs/cli.md), generated from the command tree that `sovllm --help` prints.

The page is a short hand-written introduction followed by one section per visible command: its
usage line, its help text and its arguments and options exactly as `--help` describes them
(hidden commands and options are left out, as `--help` leaves them out). Everything is read from
the typer/click objects rather than from rendered help, so the page does not depend on the terminal
width or on colour. `make docs` rewrites the file; a unit test fails when the file and the CLI
disagree. Run it as `python -m sovllm.cli.reference [--check] [PATH]`.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

DEFAULT_PATH = Path("docs/cli.md")

GENERATED_NOTE = ("<!-- Generated from the CLI by `make docs` (python -m sovllm.cli.reference); edit the command "
                  "help or the introduction in src/sovllm/cli/reference.py, not this file. -->")

INTRODUCTION = """\
# CLI reference

Every command has `--help`; this page is generated from the same help, so the two agree.

Errors print one line per problem, prefixed `error: `, and exit non-zero: 2 for bad config or
input, 3 for a blocked egress attempt, 1 otherwise. SIGTERM ends a command like Ctrl-C does
(cleanup runs, embedded servers stop; exit code 143). Progress bars appear only on a terminal; off
one (a log file, CI, an Argo pod) tables are printed 160 columns wide so their cells do not wrap
(`COLUMNS` overrides).

Exit codes worth knowing per command:

| command | exit | when |
|---|---|---|
| `run` and the stage commands | 2 | a configured endpoint is outside `egress.allow` (checked before any work) |
| any command | 3 | the egress guard blocked a connection (e.g. `synth`, `bench serve`, `egress check`) |
| `ingest` | 2 | no document is usable |
| `curate` | 2 | fewer than `curate.min_kept` answerable pairs survive (the message names the filter that removed most) |
| `train` | 2 | the stop-token audit fails or a refused option is set |
| `train` | 1 | the stop check fails (the adapter is written but not registered) |
| `doctor` | 1 | any check fails (warnings do not fail) |

Stage commands (`ingest`, `synth`, `curate`, `train`, `eval`) skip their work when their inputs
and config are unchanged since their last successful run; `--force` runs them anyway. The guides
explain each stage in depth: [ingest](ingest.md), [synth](synth.md), [curate](curate.md),
[train](train.md), [eval](eval.md), [serve](serve.md) (every serving option and the load test),
[operations](operations.md).
"""


def _commands(command, ctx, path: str):
    """(path, command, context) for `command` and every visible subcommand below it, depth first."""
    yield path, command, ctx
    list_commands = getattr(command, "list_commands", None)
    if list_commands is None:
        return
    for name in list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        yield from _commands(sub, typer.Context(sub, info_name=name, parent=ctx), f"{path} {name}")


def _anchor(path: str) -> str:
    """The id GitHub gives a heading "`sovllm models list`"."""
    return path.replace(" ", "-")


def _prose(text: str) -> str:
    """Help text as Markdown prose: `<` would open an HTML tag, so it is escaped."""
    return text.replace("<", "\\<")


def _help_text(command) -> str:
    """The help paragraph(s) `--help` shows: the docstring up to the first form feed."""
    return inspect.cleandoc(command.help or "").partition("\f")[0].strip()


def _parameter_lines(command, ctx, kind: str) -> list[str]:
    """One bullet per visible argument or option (`kind`), as `--help` words it."""
    lines = []
    for param in command.params:
        if param.param_type_name != kind:
            continue
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        name, help_ = record
        lines.append(f"- `{name}`" + (f": {_prose(help_)}" if help_ else ""))
    return lines


def _section(path: str, command, ctx) -> list[str]:
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    lines = [f"## `{path}`", "", "```", usage, "```", ""]
    if _help_text(command):
        lines += [_prose(_help_text(command)), ""]
    for kind, title in (("argument", "Arguments"), ("option", "Options")):
        params = _parameter_lines(command, ctx, kind)
        if params:
            lines += [f"{title}:", "", *params, ""]
    return lines


def render(app: typer.Typer | None = None, name: str = "sovllm") -> str:
    """The whole reference page for `app` (default: sovllm's own CLI) as Markdown."""
    if app is None:
        from sovllm.cli.app import app
    root = typer.main.get_command(app)
    commands = list(_commands(root, typer.Context(root, info_name=name), name))
    index = [f"- [`{path}`](#{_anchor(path)}): {_prose(_help_text(command).splitlines()[0])}"
             if _help_text(command) else f"- [`{path}`](#{_anchor(path)})"
             for path, command, _ in commands[1:]]
    lines = [GENERATED_NOTE, "", INTRODUCTION, "## Commands", "", *index, ""]
    for path, command, ctx in commands:
        lines += _section(path, command, ctx)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference to PATH (default docs/cli.md); with --check, only say whether it is current."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    path = Path(paths[0]) if paths else DEFAULT_PATH
    text = render()
    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            print(f"{path} is out of date with the CLI: run `make docs`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
