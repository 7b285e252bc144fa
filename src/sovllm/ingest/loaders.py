"""Document loaders by file suffix: Markdown, plain text, HTML, PDF and DOCX.

The registry is an extension point: `@register_loader(".rst")` on a function `path ->
LoadedDocument` adds a format, and packages can do so through the `sovllm.loaders` entry-point
group (the entry point's module registers its loaders when imported). A loader raises
`SkipDocument(reason)` for a file it cannot use; the ingest stage warns and goes on.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Callable

import yaml

from sovllm.ingest.document import LoadedDocument, SectionBuilder, SkipDocument

Loader = Callable[[Path], LoadedDocument]
LOADERS: dict[str, Loader] = {}
_plugins_loaded = False


def register_loader(*suffixes: str) -> Callable[[Loader], Loader]:
    """Register a loader for file suffixes (lower case, with the dot)."""

    def decorate(fn: Loader) -> Loader:
        for suffix in suffixes:
            LOADERS[suffix.lower()] = fn
        return fn

    return decorate


def loader_for(path: Path) -> Loader | None:
    """The loader for a file's suffix, or None when the format is not supported."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for entry_point in importlib.metadata.entry_points(group="sovllm.loaders"):
            entry_point.load()
    return LOADERS.get(path.suffix.lower())


# --- text decoding -------------------------------------------------------------------------------


def read_text(path: Path, declared: str | None = None) -> str:
    """Decode a text file: UTF-8 (BOM optional), UTF-16 with BOM, or a charset the file declares."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SkipDocument(f"unreadable ({exc.strerror or exc})") from None
    if not data.strip():
        raise SkipDocument("empty file")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    if b"\x00" in data[:8192]:
        raise SkipDocument("binary content (NUL bytes) in a text format")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if declared:
            try:
                return data.decode(declared)
            except (LookupError, UnicodeDecodeError):
                pass
        bad = data[exc.start]
        raise SkipDocument(f"not valid UTF-8 (byte 0x{bad:02x} at offset {exc.start}); re-save it as UTF-8") from None


# --- Markdown and plain text -----------------------------------------------------------------------

_ATX = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_EMPHASIS = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")


def split_front_matter(text: str) -> tuple[dict, str, list[str]]:
    """Split YAML front matter (`---` … `---`) from a Markdown text."""
    if not text.startswith("---\n"):
        return {}, text, []
    end = re.search(r"^(---|\.\.\.)\s*$", text[4:], flags=re.MULTILINE)
    if not end:
        return {}, text, []
    raw, body = text[4:4 + end.start()], text[4 + end.end():].lstrip("\n")
    try:
        meta = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        return {}, body, [f"front matter ignored: invalid YAML ({getattr(exc, 'problem', exc)})"]
    if not isinstance(meta, dict):
        return {}, body, ["front matter ignored: not a mapping"]
    return {str(k): v for k, v in meta.items()}, body, []


def _clean_md_line(line: str) -> str:
    return _EMPHASIS.sub(r"\2", _LINK.sub(r"\1", line))


@register_loader(".md", ".markdown")
def load_markdown(path: Path) -> LoadedDocument:
    meta, body, warnings = split_front_matter(read_text(path))
    builder = SectionBuilder()
    paragraph: list[str] = []
    fence: str | None = None
    lines = body.splitlines()

    def flush():
        builder.block("\n".join(paragraph))
        paragraph.clear()

    for i, line in enumerate(lines):
        if fence:
            paragraph.append(line)
            if line.strip().startswith(fence):
                fence = None
                flush()
            continue
        match = _FENCE.match(line.strip())
        if match:
            flush()
            fence = match.group(1)
            paragraph.append(line)
            continue
        heading = _ATX.match(line)
        if heading:
            flush()
            builder.heading(len(heading.group(1)), _clean_md_line(heading.group(2)))
            continue
        if re.fullmatch(r"\s*(=+|-+)\s*", line) and len(paragraph) == 1 and len(line.strip()) >= 3:
            title = paragraph.pop()  # setext heading: a single line underlined with === or ---
            builder.heading(1 if "=" in line else 2, _clean_md_line(title))
            continue
        if not line.strip():
            flush()
            continue
        if _TABLE_RULE.match(line) and paragraph and "|" in paragraph[-1]:
            continue  # the |---|---| rule under a table header carries no text
        paragraph.append(_clean_md_line(line.rstrip()))
    flush()
    return LoadedDocument(builder.build(), meta, warnings)


_CAPS_TITLE = re.compile(r"^[^a-zäöüß]*[A-ZÄÖÜ][^a-zäöüß]*$")


@register_loader(".txt", ".text")
def load_text(path: Path) -> LoadedDocument:
    """Plain text: blank lines separate paragraphs; a short ALL-CAPS line alone is a heading."""
    builder = SectionBuilder()
    for block in re.split(r"\n\s*\n", read_text(path)):
        stripped = block.strip()
        if "\n" not in stripped and len(stripped) <= 80 and _CAPS_TITLE.match(stripped) and \
                sum(c.isalpha() for c in stripped) >= 3:
            builder.heading(1, stripped.title() if stripped.isupper() else stripped)
        else:
            builder.block(block)
    return LoadedDocument(builder.build())


# The HTML, PDF and DOCX loaders live in their own modules; importing them registers them.
from sovllm.ingest import loaders_html, loaders_office  # noqa: E402,F401
