"""`sovllm curate`: filter, deduplicate, judge and split the QA pairs; `curate review` writes the review page."""

from __future__ import annotations

import typer
from rich.table import Table

from sovllm.cli import options
from sovllm.progress import make_console

console = make_console()
err = make_console(stderr=True)


def print_funnel(funnel: dict, title: str = "curate") -> None:
    answerable = funnel["answerable"]
    console.print(f"{title}: kept {answerable['kept']} of {answerable['input']} answerable pairs")
    table = Table()
    table.add_column("step")
    table.add_column("removed", justify="right")
    for reason, count in answerable["removed"].items():
        table.add_row(reason, str(count))
    judge = funnel["judge"]
    if judge.get("mode") == "report":
        table.add_row(f"judge (report-only, {judge['graded']} graded)", f"0 (would remove {judge['would_remove']})")
    console.print(table)
    if judge.get("graded"):
        ratings = ", ".join(f"{k} {v}" for k, v in judge["ratings"].items())
        failures = sum(judge["failures"].values())
        console.print(f"judge {judge['model']} ({judge['mode']}): {ratings}; hallucinations {judge['hallucinations']}; "
                      f"failed verdicts {failures}")
        if judge.get("why_report_only"):
            console.print(f"[dim]report-only because {judge['why_report_only']}[/dim]")
    unit = funnel.get("split_unit", "document")
    console.print(f"splits (grouped by {unit}):")
    splits = Table()
    for column in ("split", "documents", "chunks", "answerable", "unanswerable", "on-topic / foreign", "with distractors",
                   "by type",
                   "by language"):
        splits.add_column(column, justify="right" if column not in ("split", "by type", "by language") else "left")
    for name, row in funnel["splits"].items():
        splits.add_row(name, str(row["documents"]), str(row["chunks"]), str(row["answerable"]),
                       f"{row['unanswerable']}/{row['unanswerable_wanted']}",
                       f"{row.get('unanswerable_on_topic', 0)} / {row.get('unanswerable_foreign', row['unanswerable'])}",
                       str(row["with_distractors"]),
                       ", ".join(f"{k} {v}" for k, v in row["by_type"].items()),
                       ", ".join(f"{k} {v}" for k, v in row["by_lang"].items()))
    console.print(splits)
    if funnel.get("leakage"):
        console.print(f"[yellow]note: {funnel['leakage']}[/yellow]")


def curate(
    args: list[str] = typer.Argument(None, metavar="[DIR] | review [DIR]",
                                     help="Project folder (default .); 'review DIR' writes the review page."),
    quick: bool = options.quick("Judge only curate.judge.quick_limit pairs (the CI smoke run)."),
    set_: list[str] = options.overrides(),
    force: bool = options.force(),
    output: str = typer.Option(None, "--output", "-o", help="With 'review': where to write the page "
                                                            "(default out/curate/review.html)."),
) -> None:
    """Flag, deduplicate and judge QA pairs; build leak-free train/val/eval splits with negatives."""
    from pathlib import Path

    from sovllm.curate import stage
    from sovllm.endpoint import open_endpoint
    from sovllm.pipeline.run import check_endpoints
    from sovllm.progress import bar_factory

    reviewing, root, cfg = options.open_project(args, "review", set_)
    if reviewing:
        path = stage.write_review_page(root, cfg, Path(output) if output else None)
        console.print(f"review page: {path}")
        return
    check_endpoints(cfg)
    log = lambda msg: err.print(f"[dim]{msg}[/dim]")  # noqa: E731
    result = options.pushed(cfg, "curate", "splits", root, lambda: stage.run(
        root, cfg, lambda: open_endpoint(cfg, log=log), quick=quick, force=force,
        progress_factory=bar_factory("judge", err), log=log), log)
    print_funnel(result.manifest.extra["funnel"], "curate (up to date, skipped)" if result.skipped else "curate")


def register(app: typer.Typer) -> None:
    app.command()(curate)
