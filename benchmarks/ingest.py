"""Ingest scaling benchmark: is chunking one long document linear in its length?

The baseline is the 1× document: the whole example corpus as one Markdown file. Ours is the same
text repeated N times (default 20) in one document, every paragraph and heading numbered with its
copy so deduplication keeps them all. Each is ingested (load + chunk + language detection) with
the bundled model's tokenizer, best of `--repeats` runs. Linear scaling gives a time ratio near
N; the tutorial's quadratic chunker would give about N². Prints JSON.

    .venv/bin/python benchmarks/ingest.py [--copies 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "acme"


def corpus_markdown() -> list[tuple[int, str]]:
    """The example corpus as (heading level or 0 for body, text) blocks, via sovllm's own loaders."""
    from sovllm.ingest.loaders import loader_for
    from sovllm.ingest.stage import discover

    blocks: list[tuple[int, str]] = []
    for path in discover(EXAMPLE / "documents"):
        loader = loader_for(path)
        if loader is None:
            continue
        previous: list[str] = []
        for section in loader(path).sections:
            for depth, title in enumerate(section.heading_path, start=1):
                if previous[:depth] != section.heading_path[:depth]:
                    blocks.append((min(depth, 6), title))
            previous = section.heading_path
            blocks.extend((0, paragraph) for paragraph in section.text.split("\n\n"))
    return blocks


def long_document(blocks: list[tuple[int, str]], copies: int) -> str:
    parts = []
    for copy in range(1, copies + 1):
        for level, text in blocks:
            parts.append(f"{'#' * level} [{copy}] {text}" if level else f"[{copy}] {text}")
    return "\n\n".join(parts) + "\n"


def time_ingest(text: str, tokenizer, cfg, repeats: int) -> tuple[float, int, int]:
    """Best wall time of ingesting one document holding `text`; also its chunk and token counts."""
    from sovllm.ingest.stage import ingest_folder

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.md").write_text(text, encoding="utf-8")
        best, result = float("inf"), None
        for _ in range(repeats):
            started = time.perf_counter()
            result = ingest_folder(Path(tmp), tokenizer, cfg, warn=lambda _: None)
            best = min(best, time.perf_counter() - started)
    tokens = sum(r["n_tokens"] for r in result["records"])
    return best, len(result["records"]), tokens


def measure(copies: int = 20, repeats: int = 3) -> dict:
    from sovllm.config import load_config
    from sovllm.models import registry
    from sovllm.models.tokenizer import load_tokenizer

    cfg = load_config(EXAMPLE)
    tokenizer = load_tokenizer(registry.prepare(cfg.model.base).path)
    blocks = corpus_markdown()
    t1, chunks1, tokens1 = time_ingest(long_document(blocks, 1), tokenizer, cfg, repeats)
    tn, chunksn, tokensn = time_ingest(long_document(blocks, copies), tokenizer, cfg, repeats)
    return {
        "benchmark": "ingest-scaling",
        "baseline": {"name": "1x corpus document", "seconds": round(t1, 3), "chunks": chunks1,
                     "tokens": tokens1, "tokens_per_s": round(tokens1 / t1)},
        "ours": {"name": f"{copies}x corpus document", "seconds": round(tn, 3), "chunks": chunksn,
                 "tokens": tokensn, "tokens_per_s": round(tokensn / tn)},
        "copies": copies,
        "time_ratio": round(tn / t1, 2),
        "linear_would_be": round(tokensn / tokens1, 2),
        "quadratic_would_be": round((tokensn / tokens1) ** 2, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(args.copies, args.repeats)
    print(json.dumps(result, indent=2))
    return 0 if result["time_ratio"] <= 25 * args.copies / 20 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
