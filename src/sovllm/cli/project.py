"""`sovllm init` and `sovllm run`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from sovllm.cli import options

console = Console()


def init(
    directory: Path = typer.Argument(..., help="Project folder to create (may exist)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing sovllm.yaml."),
) -> None:
    """Create a project: a commented sovllm.yaml and a documents/ folder."""
    from sovllm.project import init_project

    path = init_project(directory, force=force)
    console.print(f"Wrote {path} and {path.parent / 'documents'}/")
    console.print(f"Next: put your documents into {path.parent / 'documents'}/ and run 'sovllm run {directory}'.")


def run(
    directory: Path = options.project_dir(),
    quick: bool = options.quick("Run every stage on a few documents (the CI smoke run)."),
    set_: list[str] = options.overrides(),
    force: bool = options.force(),
    until: str = typer.Option(None, "--until", help="Stop after this stage (model, ingest, synth, curate, train)."),
) -> None:
    """Run the pipeline; up-to-date stages are skipped, so an interrupted run resumes."""
    from sovllm.pipeline.run import run_pipeline
    from sovllm.progress import bar_factory

    err = Console(stderr=True)
    report = run_pipeline(directory, overrides=tuple(set_), quick=quick, force=force, until=until,
                          log=lambda msg: console.print(f"[dim]{msg}[/dim]"),
                          warn=lambda msg: err.print(f"[yellow]warning:[/] {msg}"),
                          progress=lambda stage: bar_factory(stage, err))
    _print_stage_details(report)
    table = Table(title=f"sovllm run {report.root.name}" + (" --quick" if quick else "")
                  + (f" --until {until}" if until else ""))
    for column in ("stage", "status", "wall s", "details"):
        table.add_column(column)
    for name, result in report.stages:
        details = ", ".join(f"{k}={v}" for k, v in result.manifest.counts.items()
                            if k not in ("skipped", "reused", "generated"))
        if name == "model":
            details = f"{result.manifest.model.get('name')} base_id={str(result.manifest.model.get('base_id'))[:12]}…"
        table.add_row(name, "skipped (up to date)" if result.skipped else "ran", f"{result.seconds:.1f}", details)
    console.print(table)
    console.print(f"Run manifest: {report.out_dir / 'manifest.json'}")


def _print_stage_details(report) -> None:
    """Per-stage tables: ingest statistics, synth summary, curate funnel and splits, training result."""
    import json

    from sovllm.cli.curate import print_funnel
    from sovllm.cli.ingest import print_stats
    from sovllm.cli.synth import print_summary
    from sovllm.cli.train import print_result

    stats_file = report.out_dir / "ingest" / "stats.json"
    if stats_file.is_file():
        print_stats(json.loads(stats_file.read_text(encoding="utf-8")))
    for name, result in report.stages:
        if name == "synth" and "summary" in result.manifest.extra:
            print_summary(result.manifest.extra["summary"])
        if name == "curate" and "funnel" in result.manifest.extra:
            print_funnel(result.manifest.extra["funnel"])
        if name == "train" and "mlflow" in result.manifest.extra:
            print_result(result.manifest.extra)


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(run)
