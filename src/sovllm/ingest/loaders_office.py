"""PDF and DOCX loaders.

PDF (pypdf, text layer only): text runs are grouped into lines by position, headings are lines
set in a font clearly larger than the body text (level by size rank), page numbers are kept per
section, and lines that repeat at the top or bottom of most pages (running headers and footers,
page numbers, digits ignored) are removed. A PDF without a text layer or with a password is
skipped with that reason.

DOCX (python-docx): `Title`/`Heading N` paragraph styles give the heading path, list styles
become `- item` lines and tables `cell | cell` lines, in document order.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sovllm.ingest.document import LoadedDocument, SectionBuilder, SkipDocument
from sovllm.ingest.loaders import register_loader

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
    lines: list[_Line] = []
    for y, x, size, text in sorted(runs, key=lambda r: (-round(r[0], 0), r[1])):
        if lines and abs(lines[-1].y - y) < 0.5 * max(size, 1.0):
            last = lines[-1]
            joiner = "" if last.text.endswith(" ") or text.startswith(" ") else " "
            lines[-1] = _Line(last.text + joiner + text, max(last.size, size), last.y)
        else:
            lines.append(_Line(text, size, y))
    return [_Line(_clean(line.text), line.size, line.y) for line in lines if _clean(line.text)]


def _clean(text: str) -> str:
    """Collapse whitespace; bullets that standard PDF fonts extract as control characters become '- '."""
    text = " ".join(text.split())
    text = _BULLET_GLYPH.sub("- ", text)
    return _CONTROL.sub("", text).strip()


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

    builder = SectionBuilder()
    paragraph: list[str] = []

    def flush():
        builder.block("\n".join(paragraph))
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
            if size in heading_sizes and len(line.text) < 200:
                flush()
                builder.heading(heading_sizes.index(size) + 1, line.text)
                previous_y = None
                continue
            gap = None if previous_y is None else previous_y - line.y
            if gap is not None and gap > 1.6 * max(line.size, 1.0):
                flush()
            if _BULLET.match(line.text) or not paragraph:
                paragraph.append(line.text)
            elif paragraph[-1].endswith("-") and len(paragraph[-1]) > 1 and paragraph[-1][-2].isalpha() \
                    and line.text[:1].islower():
                paragraph[-1] = paragraph[-1][:-1] + line.text  # re-join a word hyphenated at the line end
            else:
                paragraph[-1] = paragraph[-1] + " " + line.text
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


@register_loader(".docx")
def load_docx(path: Path) -> LoadedDocument:
    import zipfile

    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        if path.stat().st_size == 0:
            raise SkipDocument("empty file")
        document = docx.Document(str(path))
    except SkipDocument:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise SkipDocument(f"not a valid DOCX (corrupt, or encrypted with a password): {type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - python-docx raises its own PackageNotFoundError etc.
        raise SkipDocument(f"not a valid DOCX (corrupt, or encrypted with a password): {type(exc).__name__}") from None

    builder = SectionBuilder()
    items: list[str] = []
    uses_title = any(p.style is not None and p.style.name == "Title" for p in document.paragraphs)

    def flush_items():
        builder.block("\n".join(items))
        items.clear()

    for element in document.element.body.iterchildren():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "p":
            paragraph = Paragraph(element, document)
            text = " ".join(paragraph.text.split())
            style = paragraph.style.name if paragraph.style is not None else ""
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
            rows = []
            for row in Table(element, document).rows:
                cells: list[str] = []
                for cell in row.cells:
                    value = " ".join(cell.text.split())
                    if not cells or cells[-1] != value:  # merged cells repeat their text
                        cells.append(value)
                if any(cells):
                    rows.append(" | ".join(cells))
            builder.block("\n".join(rows))
    flush_items()
    metadata = {"title": document.core_properties.title} if document.core_properties.title else {}
    return LoadedDocument(builder.build(), metadata)
