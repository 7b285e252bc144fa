"""The `sovllm` command line (typer). Commands only parse arguments and print; the work lives in
the library modules they call."""

from sovllm.cli.app import app, main

__all__ = ["app", "main"]
