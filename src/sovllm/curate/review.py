"""The review page of `sovllm curate review`: one self-contained HTML file (inline CSS and JS, no
external resources) listing every curated pair worth a human look - dropped, flagged, or rated B or
C by the judge - with its chunk, and filter controls (labels, dropped/kept, text search) that work
offline from data attributes; an initial filter can come from the URL hash (`#flag=too_short`).
The page itself is the template `templates/review.html.j2`; this module chooses and labels the pairs.
"""

from __future__ import annotations

import pathlib
from collections import Counter

import jinja2

from sovllm.artifacts import write_atomic

# Autoescaping on for every value: questions, answers, chunks and even ids come from user documents.
_PAGES = jinja2.Environment(loader=jinja2.PackageLoader("sovllm.curate", "templates"), autoescape=True,
                            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _token(value: object) -> str:
    """A label usable in a space-separated data attribute."""
    return "_".join(str(value).split()) or "_"


def _is_shown(record: dict) -> bool:
    judge = record.get("judge") or {}
    return not record.get("kept") or bool(record.get("flags")) or judge.get("rating") in ("B", "C")


def _labels(record: dict) -> list[str]:
    """Filter labels of a pair: its flags, its drop reason and `judge:B` / `judge:C`."""
    labels = [_token(f) for f in record.get("flags") or []]
    if not record.get("kept"):
        labels.append(_token(record.get("drop_reason") or "dropped"))
    rating = (record.get("judge") or {}).get("rating")
    if rating in ("B", "C"):
        labels.append(f"judge:{rating}")
    return list(dict.fromkeys(labels))


def _funnel_rows(funnel: dict, depth: int = 0) -> list[tuple[str, str, str]]:
    """(name, count, left padding in em) per funnel step, nested steps indented below their parent."""
    rows = []
    for key, value in funnel.items():
        rows.append((str(key), "" if isinstance(value, dict) else str(value), f"{0.8 + 1.2 * depth:.1f}"))
        if isinstance(value, dict):
            rows.extend(_funnel_rows(value, depth + 1))
    return rows


def render_review(records: list[dict], chunks: dict[str, dict], *, title: str,
                  funnel: dict | None = None) -> str:
    """The complete review page for curated records and their chunks."""
    shown = [r for r in records if _is_shown(r)]
    counts = Counter(label for r in shown for label in _labels(r))
    anchors = {str(r.get("id", "")) for r in shown}
    pairs = [{"record": r, "kept": bool(r.get("kept")), "labels": _labels(r),
              "search": " ".join(str(r.get(k, "")) for k in ("id", "question", "answer")).lower(),
              "dup_here": str(r.get("dup_of")) in anchors, "chunk": chunks.get(r.get("chunk_id", ""))}
             for r in shown]
    return _PAGES.get_template("review.html.j2").render(
        title=title, total=len(records), pairs=pairs, funnel=_funnel_rows(funnel) if funnel else [],
        boxes=sorted(counts.items(), key=lambda kv: (kv[0].startswith("judge:"), kv[0])))


def write_review(path: pathlib.Path, records: list[dict], chunks: dict[str, dict], *, title: str,
                 funnel: dict | None = None) -> int:
    """Write the review page atomically to `path`; returns the number of pairs shown."""
    page = render_review(records, chunks, title=title, funnel=funnel)
    write_atomic(path, page)
    return sum(1 for r in records if _is_shown(r))
