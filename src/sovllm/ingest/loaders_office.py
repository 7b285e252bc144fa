"""PDF and DOCX loaders.

PDF (pypdf, text layer only): text runs are grouped into lines by position, headings are lines
set in a font clearly larger than the body text (level by size rank), page numbers are kept per
section, and lines that repeat at the top or bottom of most pages (running headers and footers,
page numbers, digits ignored) are removed. A PDF without a text layer or with a password is
skipped with that reason.

DOCX (python-docx): `Title`/`Heading N` paragraph styles give the heading path, list styles
become `- item` lines and tables `cell | cell` lines, in document order. The zip's declared sizes
are checked before python-docx unpacks it, and styles and tables are read from the XML in one
pass (python-docx looks styles up per paragraph and walks vertical merges recursively).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sovllm.ingest import limits
from sovllm.ingest.document import LoadedDocument, SectionBuilder, SkipDocument
from sovllm.ingest.registry import register_loader

# --- PDF --------------------------------------------------------------------------------------------

_PAGE_NUMBER = re.compile(r"^(page|seite|p\.)?\s*\d+(\s*(of|von|/)\s*\d+)?$", re.IGNORECASE)
_BULLET = re.compile(r"^([-•▪◦*]|\d+[.)])\s+")
_BULLET_GLYPH = re.compile(r"^[\x7f\x95•▪◦●■]\s*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class _Line:
    text: str
    size: float
    y: float


def _page_lines(page) -> list[_Line]:
    """Lines of one page, top to bottom, each with its largest font size."""
    runs: list[tuple[float, float, float, str]] = []  # (y, x, size, text)

    def visit(text, cm, tm, font_dict, font_size):
        if not text or not text.strip():
            return
        scale_y = (tm[3] if tm[3] else 1.0) * (cm[3] if cm[3] else 1.0)
        y = tm[5] * (cm[3] or 1.0) + cm[5]
        x = tm[4] * (cm[0] or 1.0) + cm[4]
        for i, part in enumerate(text.split("\n")):
            if part.strip():
                runs.append((y - i * abs(font_size * scale_y), x, abs(font_size * scale_y), part))

    page.extract_text(visitor_text=visit)
    # Runs on one line are collected as lists and joined once: a page with very many runs on one
    # line made repeated string concatenation quadratic.
    grouped: list[tuple[list[str], float, float]] = []  # (parts, size, y)
    for y, x, size, text in sorted(runs, key=lambda r: (-round(r[0], 0), r[1])):
        if grouped and abs(grouped[-1][2] - y) < 0.5 * max(size, 1.0):
            parts, last_size, last_y = grouped[-1]
            if not (parts[-1].endswith(" ") or text.startswith(" ")):
                parts.append(" ")
            parts.append(text)
            grouped[-1] = (parts, max(last_size, size), last_y)
        else:
            grouped.append(([text], size, y))
    lines = [_Line(_clean("".join(parts)), size, y) for parts, size, y in grouped]
    return [line for line in lines if line.text]


def _clean(text: str) -> str:
    """Collapse whitespace; bullets that standard PDF fonts extract as control characters become '- '."""
    text = " ".join(text.split())
    text = _BULLET_GLYPH.sub("- ", text)
    return _CONTROL.sub("", text).strip()


def _tail(pieces: list[str], n: int) -> str:
    """The last `n` characters of "".join(pieces), without joining them all."""
    tail = ""
    for piece in reversed(pieces):
        tail = piece + tail
        if len(tail) >= n:
            break
    return tail[-n:]


def _repeated_edges(pages: list[list[_Line]], edge: int = 2) -> set[str]:
    """Normalised texts that stand at a page's top or bottom on at least half of the pages."""
    if len(pages) < 2:
        return set()
    counts: Counter[str] = Counter()
    for lines in pages:
        edges = {re.sub(r"\d+", "#", line.text.lower()) for line in lines[:edge] + lines[-edge:]}
        counts.update(edges)
    needed = max(2, (len(pages) + 1) // 2)
    return {text for text, n in counts.items() if n >= needed}


@register_loader(".pdf")
def load_pdf(path: Path) -> LoadedDocument:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        if path.stat().st_size == 0:
            raise SkipDocument("empty file")
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkipDocument("encrypted PDF (needs a password); decrypt it first")
        pages = [_page_lines(page) for page in reader.pages]
    except SkipDocument:
        raise
    except (PdfReadError, OSError, ValueError, KeyError, TypeError) as exc:
        raise SkipDocument(f"not a readable PDF ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - pypdf raises many kinds of errors on broken files
        if "crypt" in str(exc).lower():
            raise SkipDocument("encrypted PDF (needs a password); decrypt it first") from None
        raise SkipDocument(f"not a readable PDF ({type(exc).__name__}: {exc})") from None
    if not any(pages):
        raise SkipDocument("no text layer (a scanned PDF?); run OCR first")

    repeated = _repeated_edges(pages)
    sizes: Counter[float] = Counter()
    for lines in pages:
        for line in lines:
            sizes[round(line.size, 1)] += len(line.text)
    body = sizes.most_common(1)[0][0] if sizes else 0
    heading_sizes = sorted({round(l.size, 1) for p in pages for l in p if l.size >= 1.15 * body and body}, reverse=True)
    heading_rank = {size: rank for rank, size in enumerate(heading_sizes, start=1)}

    builder = SectionBuilder()
    paragraph: list[list[str]] = []  # lines, each a list of pieces joined once (no quadratic +=)

    def flush():
        builder.block("\n".join("".join(pieces) for pieces in paragraph))
        paragraph.clear()

    for number, lines in enumerate(pages, start=1):
        builder.page(number)
        previous_y = None
        for index, line in enumerate(lines):
            at_edge = index < 2 or index >= len(lines) - 2
            normalised = re.sub(r"\d+", "#", line.text.lower())
            if at_edge and (normalised in repeated or _PAGE_NUMBER.match(line.text)):
                continue
            size = round(line.size, 1)
            if size in heading_rank and len(line.text) < 200:
                flush()
                builder.heading(heading_rank[size], line.text)
                previous_y = None
                continue
            gap = None if previous_y is None else previous_y - line.y
            if gap is not None and gap > 1.6 * max(line.size, 1.0):
                flush()
            if _BULLET.match(line.text) or not paragraph:
                paragraph.append([line.text])
            else:
                pieces = paragraph[-1]
                tail = _tail(pieces, 2)
                if tail.endswith("-") and len(tail) > 1 and tail[-2].isalpha() and line.text[:1].islower():
                    pieces[-1] = pieces[-1][:-1]  # re-join a word hyphenated at the line end
                else:
                    pieces.append(" ")
                pieces.append(line.text)
            previous_y = line.y
        flush()  # paragraphs do not run across pages; keeps page numbers exact
    metadata = {}
    try:
        title = reader.metadata.title if reader.metadata else None
    except Exception:  # noqa: BLE001 - broken info dictionaries are common and harmless
        title = None
    if title:
        metadata["title"] = str(title)
    return LoadedDocument(builder.build(), metadata)


# --- DOCX -------------------------------------------------------------------------------------------


def _heading_level(style_name: str) -> int | None:
    if style_name == "Title":
        return 1
    match = re.match(r"Heading (\d)", style_name)
    return int(match.group(1)) + 1 if match else None


def _check_zip(path: Path) -> None:
    """Refuse a DOCX whose parts would unpack to too much (a zip bomb) before python-docx reads them."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    if len(infos) > limits.MAX_ZIP_MEMBERS:
        raise SkipDocument(f"DOCX with {len(infos):,} parts (the limit is {limits.MAX_ZIP_MEMBERS:,})")
    unpacked = sum(info.file_size for info in infos)  # zipfile never reads past a member's declared size
    if unpacked > limits.MAX_UNPACKED_BYTES:
        raise SkipDocument(f"DOCX unpacks to {limits.mib(unpacked)} (the limit is "
                           f"{limits.mib(limits.MAX_UNPACKED_BYTES)}; a zip bomb?)")
    largest = max(infos, key=lambda info: info.file_size, default=None)
    if largest is not None and largest.filename.endswith((".xml", ".rels")) \
            and largest.file_size > limits.MAX_XML_PART_BYTES:
        raise SkipDocument(f"DOCX part {largest.filename[:80]} unpacks to {limits.mib(largest.file_size)} "
                           f"(the limit is {limits.mib(limits.MAX_XML_PART_BYTES)})")


def _table_rows(tbl) -> list[str]:
    """`cell | cell` lines of a table, read from its XML in one pass.

    python-docx's `row.cells` finds the cell above a vertically merged one by searching from the
    start of the row, recursively up the column: quadratic in rows, a RecursionError for a long
    merge and a ValueError for a merge that starts in the first row. Here the text of each grid
    column's last cell is carried down instead.
    """
    rows: list[str] = []
    above: dict[int, str] = {}
    for tr in tbl.tr_lst:
        cells: list[str] = []
        offset = tr.grid_before
        for tc in tr.tc_lst:
            if tc.vMerge == "continue":
                value = above.get(offset, "")
            else:
                value = " ".join(" ".join(p.text for p in tc.p_lst).split())
            above[offset] = value
            offset += tc.grid_span
            if not cells or cells[-1] != value:  # merged cells repeat their text
                cells.append(value)
        if any(cells):
            rows.append(" | ".join(cells))
    return rows


@register_loader(".docx")
def load_docx(path: Path) -> LoadedDocument:
    import zipfile

    import docx
    from docx.enum.style import WD_STYLE_TYPE

    try:
        if path.stat().st_size == 0:
            raise SkipDocument("empty file")
        _check_zip(path)
        document = docx.Document(str(path))
        # One lookup table for paragraph styles: python-docx searches styles.xml for every paragraph.
        styles = {s.style_id: s.name for s in document.styles if s.type == WD_STYLE_TYPE.PARAGRAPH}
        default = document.styles.default(WD_STYLE_TYPE.PARAGRAPH)
        default_name = default.name if default is not None else ""
    except SkipDocument:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise SkipDocument(f"not a valid DOCX (corrupt, or encrypted with a password): {type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - python-docx raises its own PackageNotFoundError etc.
        raise SkipDocument(f"not a valid DOCX (corrupt, or encrypted with a password): {type(exc).__name__}") from None

    def style_of(p) -> str:
        return styles.get(p.style, default_name) or ""

    builder = SectionBuilder()
    items: list[str] = []
    body = document.element.body
    uses_title = any(style_of(p) == "Title" for p in body.iterchildren("{*}p"))

    def flush_items():
        builder.block("\n".join(items))
        items.clear()

    for element in body.iterchildren():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "p":
            text = " ".join(element.text.split())
            style = style_of(element)
            level = _heading_level(style)
            if level is not None and not uses_title:
                level -= 1 if style != "Title" else 0
            if level is not None and text:
                flush_items()
                builder.heading(max(level, 1), text)
            elif "List" in style and text:
                items.append(("1. " if "Number" in style else "- ") + text)
            else:
                flush_items()
                builder.block(text)
        elif tag == "tbl":
            flush_items()
            builder.block("\n".join(_table_rows(element)))
    flush_items()
    metadata = {"title": document.core_properties.title} if document.core_properties.title else {}
    return LoadedDocument(builder.build(), metadata)
