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


def open_project(args: list[str] | None, subcommand: str, overrides_: list[str]):
    """Parse `[DIR] | SUBCOMMAND [DIR]`, load the project's config and install its egress guard.

    Returns (whether SUBCOMMAND was given, project root, config).
    """
    from sovllm.errors import ConfigError

    args = list(args or [])
    sub = bool(args) and args[0] == subcommand
    if sub:
        args = args[1:]
    if len(args) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(args[1:])}")
    return (sub, *load_project(args[0] if args else ".", overrides_))


def load_project(directory, overrides_: list[str]):
    """(project root, config) for `directory`, with the project's egress guard installed."""
    from sovllm import egress
    from sovllm.config import load_config, project_root

    root = project_root(directory)
    cfg = load_config(root, tuple(overrides_))
    egress.install(cfg.egress.allow, proxy=cfg.egress.proxy)
    return root, cfg


def pushed(cfg, stage: str, artifact: str, root, call, log, *, folder=None, outputs: tuple[str, ...] = ()):
    """Run a stage command's `call()`: its `s3://` folders fetched before and its `outputs` (default:
    `artifact`) uploaded after (`sovllm.objectstore.materialised`), and its outcome pushed to
    `monitoring.pushgateway` (when set), as `sovllm run` does, so the Argo workflow's steps report too."""
    from sovllm.layout import folder as stage_folder
    from sovllm.monitoring.push import pushed as push
    from sovllm.objectstore import materialised

    with materialised(cfg, outputs or (artifact,)):
        where = folder() if callable(folder) else folder
        return push(cfg.monitoring.pushgateway, cfg.project.name, stage, call, where or stage_folder(root, cfg, artifact),
                    warn=log)


def stage_project(directory, overrides_: list[str]):
    """(root, config, log) for a stage command: the project loaded, its endpoints checked against
    `egress.allow`, and a logger that prints dim lines to stderr."""
    from sovllm.pipeline.run import check_endpoints
    from sovllm.progress import make_console

    root, cfg = load_project(directory, overrides_)
    check_endpoints(cfg)
    err = make_console(stderr=True)
    return root, cfg, lambda msg: err.print(f"[dim]{msg}[/dim]")
