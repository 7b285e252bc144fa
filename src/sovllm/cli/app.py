"""Root of the CLI: global options, the egress guard, and turning errors into one-line messages."""

from __future__ import annotations

import sys

import typer

from sovllm import __version__, egress
from sovllm.errors import SovllmError

app = typer.Typer(
    name="sovllm",
    help="Self-hosted LLM fine-tuning: documents -> QA pairs -> LoRA adapter -> served, evaluated model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def guard() -> None:
    """Install the egress guard (loopback only until a project config widens it)."""
    if egress.active_policy() is None:
        egress.install_from_env()


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"sovllm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_show_version, is_eager=True),
) -> None:
    """sovllm: every language-model call goes to an endpoint you run yourself."""
    guard()


def _register() -> None:
    from sovllm.cli import (
        bench,
        curate,
        doctor,
        egress_cmd,
        evaluate,
        gateway,
        ingest,
        models,
        project,
        render,
        serve,
        synth,
        top,
        train,
    )

    project.register(app)
    ingest.register(app)
    synth.register(app)
    curate.register(app)
    train.register(app)
    evaluate.register(app)
    serve.register(app)
    doctor.register(app)
    render.register(app)
    top.register(app)
    gateway.register(app)
    app.add_typer(models.app, name="models")
    app.add_typer(egress_cmd.app, name="egress")
    app.add_typer(bench.app, name="bench")


_register()


def _terminate_cleanly() -> None:
    """SIGTERM (`kill`, a Kubernetes pod stopping) exits like Ctrl-C does: through every `finally`, so
    an embedded server is stopped and the interrupted stage's manifest says so (exit code 143).
    `sovllm serve` replaces this with its own graceful shutdown."""
    import signal
    import threading

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app, printing sovllm errors as `error: ...` lines.

    Usage errors, --help and Ctrl-C are handled by typer (standalone mode); sovllm's own errors
    become one line per problem on stderr and the error's exit code, never a traceback.
    """
    guard()
    _terminate_cleanly()
    try:
        app(args=argv, prog_name="sovllm")
    except SovllmError as exc:
        for line in exc.lines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
