"""The ingest stage: a documents folder → `chunks.jsonl`, `stats.json` and `manifest.json`.

Files are discovered in sorted order (hidden files and `*.meta.yaml` sidecars excluded), loaded
by suffix, chunked with the base model's tokenizer and written atomically. A file that cannot be
used — not a regular file, over a size limit (`limits`), refused or failed by its loader, over
the per-file time budget — is skipped with a one-line reason, warned about and listed in the
manifest, and the stage goes on; a folder without any usable document is an `InputError` (exit
code 2). Exact-duplicate chunks (same text after case folding and whitespace normalisation) are
dropped and counted.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from sovllm import layout
from sovllm.artifacts import (
    StageContext,
    StageResult,
    run_stage,
    sha256_file,
    write_atomic,
    write_jsonl,
)
from sovllm.config import Config
from sovllm.errors import InputError
from sovllm.ingest import limits
from sovllm.ingest.chunk import chunk_document
from sovllm.ingest.discover import check_file, discover, display_path
from sovllm.ingest.document import SkipDocument
from sovllm.ingest.groups import MIN_UNITS, count_units
from sovllm.ingest.language import detect_language
from sovllm.ingest.loaders import LOADERS, loader_for
from sovllm.ingest.metadata import json_safe, sidecar_metadata
from sovllm.models.tokenizer import load_tokenizer


def doc_id_for(relative_path: str) -> str:
    """Stable document id: hash of the path relative to the documents folder (POSIX form)."""
    return hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:16]


def chunk_id_for(doc_id: str, position: int) -> str:
    """Stable chunk id: the document id and the chunk's position in it (unique by construction)."""
    return f"{doc_id}-{position:05d}"


def pick_quick(files: list[Path], n: int) -> list[Path]:
    """A few documents for --quick, round-robin over formats so every loader is exercised."""
    by_suffix: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        by_suffix[f.suffix.lower()].append(f)
    picked: list[Path] = []
    queues = [by_suffix[s] for s in sorted(by_suffix)]
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return sorted(picked)


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def ingest_folder(folder: Path, tokenizer, cfg: Config, *, quick: bool = False,
                  warn: Callable[[str], None] = print, progress: Callable | None = None) -> dict:
    """Load and chunk every document in `folder`. Returns records, per-document stats and skips."""
    files = discover(folder)
    if quick:
        files = pick_quick(files, cfg.ingest.quick_documents)
    languages = tuple(cfg.ingest.languages)
    records, documents, skipped = [], [], []
    seen_text: set[str] = set()
    seen_ids: dict[str, str] = {}
    duplicates = 0
    timings = {"load": 0.0, "chunk": 0.0}

    def skip(shown: str, reason) -> None:
        reason = " ".join(str(reason).split())[:500] or "skipped"  # one line in the manifest
        skipped.append({"path": shown, "reason": reason})
        warn(f"skipped {shown}: {reason}")

    for path in files:
        shown = display_path(path, folder)
        if progress:
            progress(shown)
        problem = check_file(path, folder)
        if problem:
            skip(shown, problem)
            continue
        rel = path.relative_to(folder).as_posix()
        loader = loader_for(path)
        if loader is None:
            skip(shown, f"unsupported format '{path.suffix or '(none)'}' (supported: {', '.join(sorted(LOADERS))})")
            continue
        try:
            with limits.time_budget(limits.TIME_BUDGET_S):
                loaded, metadata, notes, chunks = _load_and_chunk(path, folder, loader, tokenizer, cfg, timings)
            sha = sha256_file(path)
        except SkipDocument as exc:
            skip(shown, exc)
            continue
        except limits.TimeBudgetExceeded as exc:
            skip(shown, exc)
            continue
        except OSError as exc:
            skip(shown, f"unreadable ({exc.strerror or exc})")
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file (or a loader's bug on it) never stops ingest
            skip(shown, f"could not be loaded ({type(exc).__name__}: {exc})")
            continue
        for note in notes:
            warn(f"{rel}: {note}")
        if not chunks:
            skip(shown, "no text after extraction")
            continue
        doc_id = doc_id_for(rel)
        if doc_id in seen_ids:  # two paths with one 64-bit hash: never seen, but never silent
            raise InputError(f"{rel}: document id {doc_id} collides with {seen_ids[doc_id]}",
                             hint="rename one of the two files")
        seen_ids[doc_id] = rel
        doc_lang = detect_language("\n".join(s.text for s in loaded.sections), languages, fallback="und")
        kept = 0
        for position, chunk in enumerate(chunks):
            key = _normalise(chunk.text)
            if key in seen_text:
                duplicates += 1
                continue
            seen_text.add(key)
            kept += 1
            records.append({
                "id": chunk_id_for(doc_id, position),
                "doc_id": doc_id,
                "text": chunk.text,
                "n_tokens": chunk.n_tokens,
                "heading_path": chunk.heading_path,
                "lang": detect_language(chunk.text, languages, fallback=doc_lang),
                "source": {"path": rel, "sha256": sha, "page": chunk.page},
                "meta": metadata,
            })
        documents.append({"path": rel, "doc_id": doc_id, "format": path.suffix.lower().lstrip("."),
                          "lang": doc_lang, "sections": len(loaded.sections), "chunks": kept,
                          "tokens": sum(r["n_tokens"] for r in records[len(records) - kept:])})
    if not documents:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]) or "the folder is empty"
        raise InputError(f"{folder}: no usable document ({len(skipped)} skipped: {reasons})",
                         hint=f"add .md, .txt, .html, .pdf or .docx files to {folder}")
    return {"records": records, "documents": documents, "skipped": skipped, "duplicates": duplicates,
            "files": len(files), "load_s": timings["load"], "chunk_s": timings["chunk"]}


def _load_and_chunk(path: Path, folder: Path, loader, tokenizer, cfg: Config, timings: dict):
    """One document: loaded, within the text limit, with JSON-safe metadata, chunked."""
    started = time.perf_counter()
    loaded = loader(path)
    n_chars = sum(len(section.text) for section in loaded.sections)
    if n_chars > limits.MAX_TEXT_CHARS:
        raise SkipDocument(f"too much text ({n_chars:,} characters; the limit is {limits.MAX_TEXT_CHARS:,} "
                           "per document): split it")
    meta, sidecar_problem = sidecar_metadata(path, folder)
    metadata = json_safe({**loaded.metadata, **meta})
    notes = [*loaded.warnings, *([sidecar_problem] if sidecar_problem else [])]
    timings["load"] += time.perf_counter() - started
    started = time.perf_counter()
    chunks = chunk_document(loaded.sections, tokenizer, cfg.ingest.chunk_size, cfg.ingest.chunk_overlap)
    timings["chunk"] += time.perf_counter() - started
    return loaded, metadata, notes, chunks


def check_size(records: list[dict], tokens: int, cfg: Config, folder: Path) -> None:
    """Refuse a corpus too small to give train, val and eval parts, before minutes of synth and training."""
    unit, groups = count_units(records, cfg.curate.splits)
    documents = len({r["doc_id"] for r in records})
    if groups < MIN_UNITS:
        raise InputError(f"{folder}: too small to split: {documents} document(s) with {groups} {unit}(s); sovllm needs "
                         f"at least {MIN_UNITS} (one each for train, val and eval)",
                         hint="add documents, or give the ones you have headings (each section can be a split unit)")
    if tokens < cfg.ingest.min_tokens:
        raise InputError(f"{folder}: too small: {tokens} tokens of text in {documents} document(s); sovllm needs at "
                         f"least ingest.min_tokens ({cfg.ingest.min_tokens}) to build train, val and eval pairs",
                         hint="add documents (four short pages are about 1,800 tokens)")


def histogram(lengths: list[int], size: int) -> dict[str, int]:
    """Token-length histogram with edges at 1/8, 1/4, 1/2, 3/4 and 1× the chunk size."""
    edges = sorted({0, size // 8, size // 4, size // 2, 3 * size // 4, size})
    bins = {f"{lo + 1 if lo else 0}-{hi}": 0 for lo, hi in zip(edges, edges[1:])}
    keys = list(bins)
    for n in lengths:
        for (lo, hi), key in zip(zip(edges, edges[1:]), keys):
            if n <= hi:
                bins[key] += 1
                break
    return bins


def run(root: Path, cfg: Config, *, quick: bool = False, force: bool = False,
        warn: Callable[[str], None] = print, progress_factory: Callable | None = None) -> StageResult:
    """Run (or skip, when up to date) the ingest stage of the project at `root`."""
    from sovllm.models import registry

    folder = layout.documents(root, cfg)
    out_dir = layout.folder(root, cfg, "chunks")
    model = registry.prepare(cfg.model.base)
    config = {"ingest": cfg.ingest.model_dump(), "base_id": model.base_id, "quick": quick}
    if not folder.is_dir():
        discover(folder)  # raises the InputError

    def work(ctx: StageContext) -> None:
        tokenizer = load_tokenizer(model.path)
        files = discover(folder)
        total = min(len(files), cfg.ingest.quick_documents) if quick else len(files)
        progress = progress_factory(total) if progress_factory else None
        try:
            result = ingest_folder(folder, tokenizer, cfg, quick=quick, warn=warn,
                                   progress=progress.advance if progress else None)
        finally:
            if progress:
                progress.close()
        lengths = [r["n_tokens"] for r in result["records"]]
        tokens = sum(lengths)
        if not quick:
            check_size(result["records"], tokens, cfg, folder)
        write_jsonl(ctx.out_dir / "chunks.jsonl", result["records"])
        stats = {
            "documents": len(result["documents"]),
            "files": result["files"],
            "skipped": result["skipped"],
            "chunks": len(lengths),
            "duplicates_removed": result["duplicates"],
            "tokens": tokens,
            "chunk_size": cfg.ingest.chunk_size,
            "token_histogram": histogram(lengths, cfg.ingest.chunk_size),
            "languages": dict(sorted(_count(d["lang"] for d in result["documents"]).items())),
            "per_document": result["documents"],
        }
        import json

        write_atomic(ctx.out_dir / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
        ctx.model.update(model.as_dict())
        ctx.counts.update({"documents": stats["documents"], "skipped": len(result["skipped"]),
                           "chunks": stats["chunks"], "duplicates_removed": result["duplicates"],
                           "tokens": tokens})
        chunk_s = max(result["chunk_s"], 1e-9)
        ctx.timings.update({"load_s": round(result["load_s"], 3), "chunk_s": round(result["chunk_s"], 3),
                            "chunk_tokens_per_s": round(tokens / chunk_s)})
        ctx.extra.update({"skipped": result["skipped"], "documents_folder": str(folder)})

    return run_stage("ingest", out_dir, work, inputs=[folder], config=config, force=force,
                     verify=lambda m: (out_dir / "chunks.jsonl").is_file() and (out_dir / "stats.json").is_file())


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item] += 1
    return dict(counts)
