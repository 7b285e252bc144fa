"""The in-memory form of a loaded document: sections of text under a heading path.

Loaders turn a file into `Section`s; the chunker never sees file formats. A section's `pages`
maps character offsets to page numbers for paginated formats (PDF), so each chunk can name the
page it starts on.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class Section:
    """A run of body text under one heading path (`[]` for text before the first heading)."""

    text: str
    heading_path: list[str] = field(default_factory=list)
    # (character offset, page number) pairs in increasing offset order; empty when not paginated
    pages: list[tuple[int, int]] = field(default_factory=list)

    def page_at(self, offset: int) -> int | None:
        if not self.pages:
            return None
        i = bisect.bisect_right(self.pages, offset, key=lambda pair: pair[0]) - 1  # no list per call
        return self.pages[max(i, 0)][1]


@dataclass
class LoadedDocument:
    """What a loader returns: sections plus metadata (front matter or loader-specific)."""

    sections: list[Section]
    metadata: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class SkipDocument(Exception):
    """A loader cannot use this file; the reason is shown to the user and kept in the manifest."""


class HeadingStack:
    """Tracks the current heading path while a loader walks a document top to bottom."""

    def __init__(self):
        self._stack: list[tuple[int, str]] = []

    def push(self, level: int, title: str) -> None:
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, title))

    @property
    def path(self) -> list[str]:
        return [title for _, title in self._stack]


class SectionBuilder:
    """Collects text blocks and starts a new section at every heading."""

    def __init__(self):
        self.sections: list[Section] = []
        self.headings = HeadingStack()
        self._blocks: list[str] = []
        self._pages: list[tuple[int, int]] = []
        self._length = 0
        self._page: int | None = None

    def heading(self, level: int, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            return
        self.flush()
        self.headings.push(level, title)

    def page(self, number: int) -> None:
        self._page = number

    def block(self, text: str) -> None:
        text = text.strip("\n")
        if not text.strip():
            return
        offset = self._length + (2 if self._blocks else 0)
        if self._page is not None and (not self._pages or self._pages[-1][1] != self._page):
            self._pages.append((offset, self._page))
        self._blocks.append(text)
        self._length = offset + len(text)

    def flush(self) -> None:
        if self._blocks:
            self.sections.append(Section("\n\n".join(self._blocks), self.headings.path, self._pages))
        self._blocks, self._pages, self._length = [], [], 0

    def build(self) -> list[Section]:
        self.flush()
        return self.sections
