"""`sovllm ingest`: documents → chunks.jsonl, with a statistics table."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from sovllm import layout
from sovllm.cli import options
from sovllm.progress import make_console

console = make_console()
err = make_console(stderr=True)


def print_stats(stats: dict, title: str = "ingest") -> None:
    """The statistics tables: totals, token-length histogram, languages, per-document counts."""
    summary = Table(title=f"{title}: {stats['documents']} documents → {stats['chunks']} chunks")
    for column in ("documents", "skipped", "chunks", "duplicates removed", "tokens", "chunk size"):
        summary.add_column(column, justify="right")
    summary.add_row(str(stats["documents"]), str(len(stats["skipped"])), str(stats["chunks"]),
                    str(stats["duplicates_removed"]), str(stats["tokens"]), str(stats["chunk_size"]))
    console.print(summary)
    hist = Table(title="chunk length (tokens)")
    hist.add_column("tokens")
    hist.add_column("chunks", justify="right")
    hist.add_column("")
    peak = max(stats["token_histogram"].values() or [1]) or 1
    for bucket, n in stats["token_histogram"].items():
        hist.add_row(bucket, str(n), "█" * round(30 * n / peak))
    console.print(hist)
    docs = Table(title="documents")
    for column in ("path", "format", "lang", "sections", "chunks", "tokens"):
        docs.add_column(column, justify="left" if column in ("path", "format", "lang") else "right")
    for d in stats["per_document"]:
        docs.add_row(d["path"], d["format"], d["lang"], str(d["sections"]), str(d["chunks"]), str(d["tokens"]))
    console.print(docs)
    console.print("languages: " + ", ".join(f"{k} {v}" for k, v in stats["languages"].items()))
    for skip in stats["skipped"]:
        console.print(f"[yellow]skipped[/] {skip['path']}: {skip['reason']}")


def ingest(
    directory: Path = options.project_dir(),
    quick: bool = options.quick(),
    set_: list[str] = options.overrides(),
    force: bool = options.force(),
) -> None:
    """Load the project's documents and split them into token-sized chunks (chunks.jsonl)."""
    from sovllm import egress
    from sovllm.config import load_config, project_root
    from sovllm.ingest import stage
    from sovllm.progress import bar_factory

    root = project_root(directory)
    cfg = load_config(root, tuple(set_))
    egress.install(cfg.egress.allow, proxy=cfg.egress.proxy)
    warn = lambda m: err.print(f"[yellow]warning:[/] {m}")  # noqa: E731
    result = options.pushed(cfg, "ingest", "chunks", root, lambda: stage.run(
        root, cfg, quick=quick, force=force, warn=warn, progress_factory=bar_factory("ingest", err)), warn)
    out_dir = layout.folder(root, cfg, "chunks")
    stats = json.loads((out_dir / "stats.json").read_text(encoding="utf-8"))
    print_stats(stats, "ingest (up to date, skipped)" if result.skipped else "ingest")
    timings = result.manifest.timings
    console.print(f"wall {timings.get('wall_s', 0):.2f} s, chunking {timings.get('chunk_tokens_per_s', 0):,.0f} tokens/s"
                  f" → {out_dir / 'chunks.jsonl'}")


def register(app: typer.Typer) -> None:
    app.command()(ingest)
