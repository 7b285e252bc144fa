"""`sovllm init` and `sovllm run`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sovllm.cli import options
from sovllm.cli.evaluate import headline_lines
from sovllm.progress import make_console

console = make_console()


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
    until: str = typer.Option(None, "--until", help="Stop after this stage (model, ingest, synth, curate, train, "
                                                    "eval)."),
    promote: bool = typer.Option(False, "--promote", help="After eval, move the MLflow 'champion' alias to the new "
                                                          "adapter when it is better by the paired test. A "
                                                          "--target argo render has the gate in full runs "
                                                          "anyway; --promote adds it under --quick."),
    target: str = typer.Option("local", "--target", help="local: run here; argo: the Argo Workflow of the same "
                                                         "stage graph (with --dry-run: print it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --target argo: print what would be submitted."),
) -> None:
    """Run the pipeline; up-to-date stages are skipped, so an interrupted run resumes."""
    from sovllm.pipeline.run import run_pipeline
    from sovllm.progress import bar_factory

    if target != "local" or dry_run:
        _run_elsewhere(directory, set_, target=target, dry_run=dry_run, quick=quick, promote=promote or None)
        return

    err = make_console(stderr=True)
    report = run_pipeline(directory, overrides=tuple(set_), quick=quick, force=force, until=until, promote=promote,
                          log=lambda msg: console.print(f"[dim]{msg}[/dim]"),
                          warn=lambda msg: err.print(f"[yellow]warning:[/] {msg}"),
                          progress=lambda stage: bar_factory(stage, err))
    _print_stage_details(report)
    table = Table(title=f"sovllm run {report.root.name}" + (" --quick" if quick else "")
                  + (f" --until {until}" if until else ""))
    for column in ("stage", "status", "wall s", "prompt tok", "generated tok", "trained tok", "details"):
        table.add_column(column, justify="right" if "tok" in column or column == "wall s" else "left",
                         no_wrap=column == "status")
    for entry, (name, result) in zip(report.manifest.extra["stages"], report.stages):
        details = ", ".join(f"{k}={v}" for k, v in result.manifest.counts.items()
                            if k not in ("skipped", "reused", "generated") and "tokens" not in k)
        if name == "model":
            details = f"{result.manifest.model.get('name')} base_id={str(result.manifest.model.get('base_id'))[:12]}…"
        tokens = entry["tokens"]
        table.add_row(name, "skipped (up to date)" if result.skipped else "ran", f"{result.seconds:.1f}",
                      *(f"{tokens[k]:,}" if tokens[k] else "" for k in ("prompt", "generated", "trained")), details)
    console.print(table)
    _print_final(report)


def _run_elsewhere(directory, set_: list[str], *, target: str, dry_run: bool, quick: bool,
                   promote: bool | None) -> None:
    """`--target argo --dry-run`: the WorkflowTemplate and the Workflow that would be submitted."""
    import tempfile

    from sovllm.cli.render import render_argo
    from sovllm.errors import ConfigError

    if target != "argo":
        raise ConfigError(f"--target {target}: not a target; choose local or argo" if target != "local" else
                          "--dry-run needs --target argo (a local run has nothing to submit)")
    if not dry_run:
        raise ConfigError("--target argo submits nothing by itself yet",
                          hint="use --dry-run to see the objects, or 'sovllm render argo DIR -o OUT' and "
                               "kubectl apply / argo submit them (docs/operations.md)")
    with tempfile.TemporaryDirectory() as tmp:
        files = render_argo(directory, Path(tmp), set_, schedule=None, shards=None, quick=quick, promote=promote)
        console.print("# would be submitted (kubectl apply -f -, then argo submit):", markup=False)
        for kind in ("WorkflowTemplate", "NetworkPolicy", "Workflow"):
            console.print(f"---\n{files[kind].read_text(encoding='utf-8')}", markup=False, highlight=False,
                          soft_wrap=True)


def _print_final(report) -> None:
    """What was produced and where, the headline comparison, and how to look at and serve the result."""
    extra = report.manifest.extra
    memory = f", peak memory {extra['peak_memory_gb']:.2f} GB (process tree)" if extra.get("peak_memory_gb") else ""
    console.print(f"Run finished in {report.manifest.timings['wall_s']:.0f} s{memory}. "
                  f"Run manifest: {report.out_dir / 'manifest.json'}")
    stages = dict(report.stages)
    if "train" in stages:
        train = stages["train"].manifest.extra
        console.print(f"  adapter:  {train.get('adapter')}")
    if "eval" in stages:
        evaluation = stages["eval"].manifest.extra
        console.print(f"  report:   {report.folders['eval'] / 'report.html'}")
        for line in headline_lines(evaluation):
            console.print(f"  {line}")
    if "train" in stages:
        train = stages["train"].manifest.extra
        if train.get("mlflow"):
            console.print(f"  MLflow:   {train['mlflow']['ui']}")
        console.print(f"  serve:    sovllm serve --project {report.root} --adapter "
                      f"{_adapter_name(report)}={train.get('adapter')}")


def _adapter_name(report) -> str:
    config = report.manifest.config
    return config["train"].get("adapter_name") or config["project"]["name"]


def _print_stage_details(report) -> None:
    """Per-stage tables: ingest statistics, synth summary, curate funnel and splits, training result."""
    import json

    from sovllm.cli.curate import print_funnel
    from sovllm.cli.ingest import print_stats
    from sovllm.cli.synth import print_summary
    from sovllm.cli.train import print_result

    stats_file = report.folders["ingest"] / "stats.json"
    if stats_file.is_file():
        print_stats(json.loads(stats_file.read_text(encoding="utf-8")))
    for name, result in report.stages:
        if name == "synth" and "summary" in result.manifest.extra:
            print_summary(result.manifest.extra["summary"])
        if name == "curate" and "funnel" in result.manifest.extra:
            print_funnel(result.manifest.extra["funnel"])
        if name == "train" and "mlflow" in result.manifest.extra:
            print_result(result.manifest.extra)
        if name == "eval" and (report.folders["eval"] / "summary.json").is_file():
            from sovllm.cli.evaluate import print_summary

            print_summary(json.loads((report.folders["eval"] / "summary.json").read_text()), report.folders["eval"])


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(run)
