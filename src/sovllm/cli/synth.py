"""`sovllm synth`: QA pairs from chunks, against the configured or the embedded endpoint."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from sovllm import layout
from sovllm.cli import options
from sovllm.progress import make_console

console = make_console()
err = make_console(stderr=True)


def print_summary(summary: dict, title: str = "synth") -> None:
    table = Table(title=f"{title}: {summary['pairs']} pairs from {summary['chunks']} chunks")
    for column in ("chunks", "with ≥1 pair", "pairs/chunk", "reused", "failures", "prompt tok", "generated tok", "wall s"):
        table.add_column(column, justify="right")
    table.add_row(str(summary["chunks"]), f"{summary['chunks_with_pair']} ({summary['share_with_pair']:.0%})",
                  str(summary["pairs_per_chunk"]), str(summary["reused"]), str(summary["failures"]),
                  str(summary["prompt_tokens"]), str(summary["generated_tokens"]), str(summary["wall_s"]))
    console.print(table)
    console.print("pairs by type: " + ", ".join(f"{k} {v}" for k, v in summary["pairs_by_type"].items()))
    if "pairs_by_method" in summary:
        console.print("pairs by method: " + ", ".join(f"{k} {v}" for k, v in summary["pairs_by_method"].items())
                      + f"; chunks with a model pair: {summary['chunks_with_model_pair']}")
    if summary["failures_by_reason"]:
        console.print("failures by reason: " + ", ".join(f"{k} {v}" for k, v in summary["failures_by_reason"].items()))
    for lang, row in summary["by_language"].items():
        console.print(f"  {lang}: {row['with_pair']}/{row['chunks']} chunks with a pair "
                      f"({row.get('with_model_pair', row['with_pair'])} with a model pair), {row['pairs']} pairs")
    if summary.get("pairs_per_min"):
        console.print(f"{summary['pairs_per_min']} pairs/min; prompt time {summary['prompt_time_s']} s, "
                      f"generation time {summary['generation_time_s']} s (summed over requests)")


def synth(
    args: list[str] = typer.Argument(None, metavar="[DIR] | merge [DIR]",
                                     help="Project folder (default .); 'merge DIR' combines shard outputs."),
    quick: bool = options.quick("Only synth.quick_chunks chunks (the CI smoke run)."),
    set_: list[str] = options.overrides(),
    force: bool = options.force(),
    shard: str = typer.Option(None, "--shard", help="Process shard K of N (K/N), into out/synth/shards/K-of-N (project.locations.shards)."),
    shards: int = typer.Option(None, "--shards", help="With 'merge': how many shards to combine."),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="Ignore cached results and generate everything again."),
    sweep: str = typer.Option(None, "--sweep", help="Measure throughput per concurrency level, e.g. 1,4,8,16."),
    sample: int = typer.Option(16, "--sample", help="Chunks per level for --sweep."),
) -> None:
    """Generate question-answer pairs for every chunk (factual, conceptual, comparison), resumably."""
    from sovllm.artifacts import write_atomic
    from sovllm.endpoint import open_endpoint
    from sovllm.errors import ConfigError
    from sovllm.progress import bar_factory
    from sovllm.synth import stage

    merging, root, cfg = options.open_project(args, "merge", set_)
    log = lambda msg: err.print(f"[dim]{msg}[/dim]")  # noqa: E731
    if merging:
        if not shards:
            raise ConfigError("'sovllm synth merge' needs --shards N")
        result = options.pushed(cfg, "synth", "pairs", root, lambda: stage.merge(root, cfg, shards), log)
        console.print(f"merged {result['shards']} shards: {result['pairs']} pairs, {result['failures']} failures "
                      f"→ {result['manifest']}")
        return
    if sweep:
        try:
            levels = [int(x) for x in sweep.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--sweep {sweep!r}: expected numbers like 1,4,8,16") from None
        cfg.synth.concurrency = max(levels)
        with open_endpoint(cfg, log=log) as endpoint:
            report = stage.sweep(root, cfg, endpoint, levels, sample, log=log)
        table = Table(title=f"synth sweep on {sample} chunks ({endpoint.model} at {endpoint.base_url})")
        for column in ("concurrency", "pairs/min", "chunks/min", "error rate", "prompt tok", "generated tok",
                       "prompt s", "generation s", "wall s"):
            table.add_column(column, justify="right")
        for r in report["levels"]:
            table.add_row(str(r["concurrency"]), str(r["pairs_per_min"]), str(r["chunks_per_min"]),
                          f"{r['error_rate']:.0%}", str(r["prompt_tokens"]), str(r["generated_tokens"]),
                          str(r["prompt_time_s"]), str(r["generation_time_s"]), str(r["wall_s"]))
        console.print(table)
        console.print(f"recommended synth.concurrency: {report['recommended_concurrency']} ({report['reason']})")
        write_atomic(layout.folder(root, cfg, "pairs") / "sweep.json", json.dumps(report, indent=2) + "\n")
        return
    part = stage.parse_shard(shard)
    result = options.pushed(
        cfg, f"synth-shard-{part[0]}" if part else "synth", "pairs", root,
        lambda: stage.run(root, cfg, lambda: open_endpoint(cfg, log=log), quick=quick, force=force, shard=part,
                          reuse=not no_reuse, progress_factory=bar_factory("synth", err), log=log), log,
        folder=(lambda: layout.folder(root, cfg, "shards") / f"{part[0]}-of-{part[1]}") if part else None,
        outputs=("shards",) if part else ("pairs",))
    print_summary(result.manifest.extra["summary"], "synth (up to date, skipped)" if result.skipped else "synth")


def register(app: typer.Typer) -> None:
    app.command()(synth)
