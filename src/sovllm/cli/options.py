"""Options shared by the stage commands, so `run`, `ingest`, `doctor` … read the same way."""

from __future__ import annotations

from pathlib import Path

import typer


def project_dir():
    return typer.Argument(Path("."), help="Project folder with sovllm.yaml.")


def overrides():
    return typer.Option([], "--set", help="Override a config value, e.g. --set ingest.chunk_size=256 (repeatable).")


def quick(help: str = "Work on a few documents only (ingest.quick_documents): the CI smoke run."):
    return typer.Option(False, "--quick", help=help)


def force():
    return typer.Option(False, "--force", help="Run even if the output is up to date.")
