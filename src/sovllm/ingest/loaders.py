"""Document loaders by file suffix: Markdown, plain text, HTML, PDF and DOCX.

The registry is an extension point: `@register_loader(".rst")` on a function `path ->
LoadedDocument` adds a format, and packages can do so through the `sovllm.loaders` entry-point
group (the entry point's module registers its loaders when imported). A loader raises
`SkipDocument(reason)` for a file it cannot use; the ingest stage warns and goes on.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import stat
from pathlib import Path
from typing import Callable

from sovllm.ingest import limits
from sovllm.ingest.document import LoadedDocument, SectionBuilder, SkipDocument
from sovllm.ingest.markdown import atx_heading, clean_line, is_table_rule, setext_underline
from sovllm.ingest.metadata import yaml_mapping

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


def read_limited(path: Path) -> bytes:
    """The bytes of a regular file of at most `limits.MAX_TEXT_BYTES`; `SkipDocument` otherwise.

    Opened without blocking and checked with `fstat` on the open file, so a FIFO or device put
    in place after discovery is refused instead of read forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise SkipDocument(f"unreadable ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SkipDocument("not a regular file")
        if info.st_size > limits.MAX_TEXT_BYTES:
            raise SkipDocument(f"too large for a text format ({limits.mib(info.st_size)}; "
                               f"the limit is {limits.mib(limits.MAX_TEXT_BYTES)})")
        try:
            data = fh.read(limits.MAX_TEXT_BYTES + 1)
        except OSError as exc:
            raise SkipDocument(f"unreadable ({exc.strerror or exc})") from None
    if len(data) > limits.MAX_TEXT_BYTES:  # grew after fstat
        raise SkipDocument(f"too large for a text format (over {limits.mib(limits.MAX_TEXT_BYTES)})")
    return data


def decode_text(data: bytes, declared: str | None = None) -> str:
    """Decode a text file's bytes: UTF-8 (BOM optional), UTF-16 with BOM, or a charset the file declares."""
    if not data.strip():
        raise SkipDocument("empty file")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise SkipDocument(f"not valid UTF-16 despite its byte order mark (at offset {exc.start})") from None
    if b"\x00" in data[:8192]:
        raise SkipDocument("binary content (NUL bytes) in a text format")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start]
        reason = f"not valid UTF-8 (byte 0x{bad:02x} at offset {exc.start})"
    if declared:
        try:
            return data.decode(declared)
        except (LookupError, UnicodeError, ValueError):
            # an unknown label, a codec that always fails ("undefined") or wrong bytes for it
            reason += f" nor in its declared charset '{declared[:40]}'"
    raise SkipDocument(f"{reason}; re-save it as UTF-8")


def read_text(path: Path, declared: str | None = None) -> str:
    """Read and decode a text file (see `read_limited` and `decode_text`)."""
    return decode_text(read_limited(path), declared)


# --- Markdown and plain text -----------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~)")
_FRONT_MATTER_END = re.compile(r"^(---|\.\.\.)\s*$", flags=re.MULTILINE)


def split_front_matter(text: str) -> tuple[dict, str, list[str]]:
    """Split YAML front matter (`---` … `---`) from a Markdown text (`SkipDocument` for a hostile one)."""
    if not text.startswith("---\n"):
        return {}, text, []
    end = _FRONT_MATTER_END.search(text, 4)
    if not end:
        return {}, text, []
    raw, body = text[4:end.start()], text[end.end():].lstrip("\n")
    meta, warning = yaml_mapping(raw, "front matter")
    return meta, body, [warning] if warning else []


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

    for line in lines:
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
        heading = atx_heading(line)
        if heading:
            flush()
            builder.heading(heading[0], clean_line(heading[1]))
            continue
        underline = setext_underline(line)
        if underline and len(paragraph) == 1 and len(line.strip()) >= 3:
            title = paragraph.pop()  # setext heading: a single line underlined with === or ---
            builder.heading(1 if underline == "=" else 2, clean_line(title))
            continue
        if not line.strip():
            flush()
            continue
        if paragraph and "|" in paragraph[-1] and is_table_rule(line):
            continue  # the |---|---| rule under a table header carries no text
        paragraph.append(clean_line(line.rstrip()))
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
