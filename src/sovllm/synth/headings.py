"""Headings inside a chunk's text: which lines are section titles, and what each section is about.

Ingest keeps a merged chunk's inner headings as lines of its text (a short line without closing
punctuation); the chunk's own section is the last entry of its `heading_path`, and the first is
the document's title. Structure pairs and extractive answer planning both need to know which
section a line belongs to and how to name it in a question.
"""

from __future__ import annotations

import re

from sovllm.synth.validate import LABEL

NUMBERING = re.compile(r"^(?:\d+(?:\.\d+)*\.?|[A-Z]\.)\s+")
MAX_HEADING_WORDS = 8


def is_heading(line: str) -> bool:
    """A short line without closing punctuation: a section title, not a sentence or table row."""
    return (len(line.split()) <= MAX_HEADING_WORDS and line[:1].isalnum() and line.count("|") < 2
            and not line.endswith((".", ":", "?", "!", ";", ",", ")")) and not LABEL.match(line))


def lines(text: str) -> list[str]:
    """The chunk's non-blank lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def title(chunk: dict) -> str:
    """The document's title: its top heading (a web page's <title> often carries the site's name)."""
    found = (chunk.get("heading_path") or [""])[0] or (chunk.get("meta") or {}).get("title") or ""
    return re.sub(r"\s+", " ", found).strip()


def topic(heading: str, above: str | None, chunk: dict) -> str:
    """The heading without its numbering, with its parent where the heading alone says little.

    `above` is a heading line right above it in the chunk. A one-word numbered sub-heading gets
    the parent its numbering nests it in (3.4 inside "3. Urlaub": „Urlaub: Anspruch“), taken from
    `above` or the chunk's heading path; an unnumbered heading under an unnumbered heading line
    gets that line ("Ledgerline 7.2: New features").
    """
    own = NUMBERING.match(heading)
    name = heading[own.end():].strip() if own else heading
    if own is None:
        if above is not None and NUMBERING.match(above) is None:
            return f"{above}: {name}"
        return name
    if len(name.split()) > 1:
        return name
    path = (chunk.get("heading_path") or [])[1:]
    for parent in ([above] if above else []) + path[-1:]:
        number = NUMBERING.match(parent)
        if number and own.group(0).strip().rstrip(".").startswith(number.group(0).strip().rstrip(".") + "."):
            return f"{parent[number.end():].strip()}: {name}"
    return name


def heading_above(found: list[str], i: int, doc_title: str) -> str | None:
    """The heading line right above line `i`, if there is one (never the document's title)."""
    return found[i - 1] if i and is_heading(found[i - 1]) and found[i - 1] != doc_title else None


def own_topic(chunk: dict) -> str | None:
    """The topic of the section the chunk itself belongs to (None when that is the whole document)."""
    path = chunk.get("heading_path") or []
    if len(path) < 2:
        return None
    return topic(path[-1], None, {**chunk, "heading_path": path[:-1]})


def line_topics(chunk: dict) -> list[str | None]:
    """For each line of `lines(chunk["text"])`, the topic of the section it stands in.

    That is the nearest heading line above it in the chunk, or before the first one the chunk's
    own section (None for a document's untitled opening).
    """
    found, doc_title = lines(chunk["text"]), title(chunk)
    current, out = own_topic(chunk), []
    for i, line in enumerate(found):
        if is_heading(line) and line != doc_title:
            current = topic(line, heading_above(found, i, doc_title), chunk)
        out.append(current)
    return out


def mark_section_openings(chunks: list[dict]) -> None:
    """Set `opens_section` on each chunk: True when its text starts its own section.

    A chunk opens its section when it is the first of its document or its heading path differs
    from the previous chunk's (the later chunks of a long section repeat its path). Computed on
    the whole, ordered chunk list, before any sampling or sharding.
    """
    previous = None
    for chunk in chunks:
        chunk["opens_section"] = (previous is None or previous.get("doc_id") != chunk.get("doc_id")
                                  or previous.get("heading_path") != chunk.get("heading_path"))
        previous = chunk
