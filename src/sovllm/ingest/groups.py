"""The units curate splits a corpus by, known already at ingest (which refuses a corpus too small to split).

With enough documents (`curate.splits.min_documents`) a split unit is a document: no eval context
shares a document with anything trained on. Below that a unit is a section: a chunk, or the chunks of a
long section split with overlap (their shared text must stay in one split): the only
way a four-document corpus gets a train, a val and an eval part, at the risk that an eval question
is about a document whose other sections were trained on.
"""

from __future__ import annotations

from sovllm.config import SplitSection

MIN_UNITS = 3  # one each for train, val and eval


def split_unit(n_documents: int, section: SplitSection) -> str:
    """'document' or 'section' for a corpus of `n_documents` documents."""
    if section.unit != "auto":
        return section.unit
    return "document" if n_documents >= section.min_documents else "section"


def _continues(chunk: dict, previous: dict | None) -> bool:
    """Whether `chunk` continues `previous` (the chunker starts it with the end of the previous one)."""
    if previous is None or previous["doc_id"] != chunk["doc_id"]:
        return False
    opening = " ".join(chunk["text"].split()[:8])
    return len(opening) >= 20 and opening in " ".join(previous["text"].split())


def chunk_groups(chunks: list[dict], unit: str) -> dict[str, str]:
    """The split group of every chunk (in ingest order): its document, or its section."""
    out: dict[str, str] = {}
    previous = None
    for chunk in chunks:
        if unit == "document":
            out[chunk["id"]] = chunk["doc_id"]
        else:
            out[chunk["id"]] = out[previous["id"]] if _continues(chunk, previous) else chunk["id"]
        previous = chunk
    return out


def count_units(chunks: list[dict], section: SplitSection) -> tuple[str, int]:
    """(unit, number of split groups) of a corpus."""
    unit = split_unit(len({c["doc_id"] for c in chunks}), section)
    return unit, len(set(chunk_groups(chunks, unit).values()))
