"""The Markdown and plain-text loaders: headings and paragraphs become sections.

Markdown: ATX and setext headings, fenced code kept whole, table rules dropped, YAML front matter
read as metadata. Plain text: blank lines separate paragraphs; a short ALL-CAPS line is a heading.
"""

from __future__ import annotations

import re
from pathlib import Path

from sovllm.ingest.document import LoadedDocument, SectionBuilder
from sovllm.ingest.markdown import (
    atx_heading,
    clean_line,
    is_table_rule,
    setext_underline,
)
from sovllm.ingest.metadata import yaml_mapping
from sovllm.ingest.registry import register_loader
from sovllm.ingest.textfile import read_text

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
