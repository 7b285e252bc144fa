"""HTML loader: keeps the heading hierarchy, lists and tables; drops navigation and boilerplate.

Wiki and intranet exports wrap a little content in a lot of chrome. The loader removes scripts,
styles, forms, `<nav>`, `<aside>`, `<footer>`, page-level `<header>`s, ARIA navigation/banner
regions and elements whose id or class says breadcrumb, cookie banner, menu, sidebar and the like.
It then reads `<main>` (or `<article>`, or `<body>`) in document order: headings start sections,
list items become `- item` / `1. item` lines, table rows become `cell | cell` lines.

Hostile input stays linear: lxml parses (not html.parser, which is quadratic on some malformed
input), every walk uses an explicit stack (no RecursionError at any nesting depth), a cell's or
list item's text is emitted once however deeply tables and lists nest, and list indentation is
capped.
"""

from __future__ import annotations

import re
from pathlib import Path

from sovllm.ingest.document import LoadedDocument, SectionBuilder
from sovllm.ingest.registry import register_loader
from sovllm.ingest.textfile import decode_text, read_limited

_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_LEAF_BLOCKS = {"p", "dt", "dd", "blockquote", "figcaption", "caption", "address", "summary", "legend"}
_DROP = {"script", "style", "noscript", "iframe", "svg", "template", "form", "button", "nav", "aside",
         "select", "input", "canvas", "object", "embed", "footer", "link", "meta"}
_CHROME_ROLES = ["navigation", "banner", "contentinfo", "search", "complementary"]
_CHROME = re.compile(r"breadcrumb|cookie|consent|navbar|^nav$|^menu|sidebar|skip-?link|site-?footer|"
                     r"site-?header|pagination|^toc$|table-of-contents", re.IGNORECASE)
_INLINE = {"a", "span", "strong", "em", "b", "i", "u", "code", "small", "sub", "sup", "abbr", "mark", "time",
           "label", "kbd", "q", "cite", "var", "samp", "s", "del", "ins", "bdi", "bdo", "data", "wbr", "img"}
# Searched in the first 4 KiB only, which bounds its backtracking.
_CHARSET = re.compile(rb"<meta[^>]+charset=[\"']?([A-Za-z0-9_-]+)", re.IGNORECASE)
_SHORT_INT = re.compile(r"-?\d{1,9}")
_MAX_INDENT = 8


def _norm(text: str) -> str:
    return " ".join(text.split())


def _is_chrome(tag) -> bool:
    if tag.get("role") in _CHROME_ROLES or tag.get("aria-hidden") == "true" or tag.has_attr("hidden"):
        return True
    names = [tag.get("id") or "", *(tag.get("class") or [])]
    return any(_CHROME.search(n) for n in names if n)


def _remove_chrome(soup) -> None:
    """Decompose dropped tags, chrome and page-level headers, in one pass that never recurses."""
    from bs4 import Tag

    doomed = []
    stack = [(soup, False)]
    while stack:
        node, in_content = stack.pop()
        for child in node.children:
            if not isinstance(child, Tag):
                continue
            if child.name in _DROP or _is_chrome(child) or (child.name == "header" and not in_content):
                doomed.append(child)  # its subtree goes with it; no need to look inside
            else:
                stack.append((child, in_content or child.name in ("main", "article")))
    for tag in doomed:
        tag.decompose()


def _drive(first) -> list[str]:
    """Run nested generators without recursion: each yields lines (str) or a generator to run next."""
    lines: list[str] = []
    stack = [first]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, str):
            lines.append(item)
        else:
            stack.append(item)
    return lines


def _is_text(node) -> bool:
    from bs4 import CData, NavigableString

    return type(node) in (NavigableString, CData)  # what get_text() returns: no comments, no scripts


def _list_start(node) -> int:
    value = str(node.get("start", "1")).strip()
    return int(value) if _SHORT_INT.fullmatch(value) else 1


def _list_items(node, depth: int):
    """Lines of one <ul>/<ol>, then (as generators) the lists nested in each item."""
    from bs4 import Tag

    ordered = node.name == "ol"
    number = _list_start(node)
    for item in node.find_all("li", recursive=False):
        nested = [c for c in item.children if getattr(c, "name", None) in ("ul", "ol")]
        skip = {id(c) for c in nested}
        text = _norm(" ".join(c.get_text(" ") if isinstance(c, Tag) else str(c)
                              for c in item.children if id(c) not in skip and (isinstance(c, Tag) or _is_text(c))))
        if text:
            # indentation is capped: 100,000 nested lists must not make 100,000 × 100,000 spaces
            yield "  " * min(depth, _MAX_INDENT) + (f"{number}. " if ordered else "- ") + text
            number += 1
        for sub in nested:
            yield _list_items(sub, depth + 1)


def _list_lines(node) -> list[str]:
    return _drive(_list_items(node, 0))


def _rows(table):
    """The <tr>s of this table, not of tables nested in it."""
    from bs4 import Tag

    stack = [iter(table.children)]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
        elif isinstance(child, Tag):
            if child.name == "tr":
                yield child
            elif child.name != "table":
                stack.append(iter(child.children))


def _text_outside_tables(cell) -> tuple[str, list]:
    """A cell's text without the tables nested in it, and those tables."""
    from bs4 import Tag

    parts, tables = [], []
    stack = [iter(cell.children)]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
        elif isinstance(child, Tag):
            if child.name == "table":
                tables.append(child)
            else:
                stack.append(iter(child.children))
        elif _is_text(child):
            parts.append(str(child))
    return " ".join(parts), tables


def _table_items(table):
    """Lines of one table (caption, `cell | cell` rows); a nested table follows the row it is in.

    Each cell's text leaves out its nested tables, so text is emitted once however deep tables
    nest (reading a cell's whole text at every level made nested tables quadratic in size).
    """
    caption = table.find("caption", recursive=False)
    if caption and _norm(caption.get_text(" ")):
        yield _norm(caption.get_text(" "))
    for row in _rows(table):
        cells, inner = [], []
        for cell in row.find_all(["th", "td"], recursive=False):
            text, tables = _text_outside_tables(cell)
            cells.append(_norm(text))
            inner.extend(tables)
        if any(cells):
            yield " | ".join(cells)
        for nested in inner:
            yield _table_items(nested)


def _table_lines(table) -> list[str]:
    return _drive(_table_items(table))


class _Walker:
    def __init__(self):
        self.builder = SectionBuilder()
        self.inline: list[str] = []

    def flush(self) -> None:
        text = "\n".join(_norm(part) for part in "".join(self.inline).split("\n"))
        self.builder.block(text.strip())
        self.inline.clear()

    def walk(self, root) -> None:
        """Read `root`'s content in document order; containers are entered with an explicit stack."""
        from bs4 import NavigableString
        from bs4.element import Comment, Declaration, Doctype, ProcessingInstruction

        stack = [iter(root.children)]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                if stack:
                    self.flush()  # the end of a container is a block boundary
                continue
            if isinstance(child, (Comment, Doctype, Declaration, ProcessingInstruction)):
                continue
            if isinstance(child, NavigableString):
                self.inline.append(str(child))
                continue
            name = child.name
            if name in _HEADINGS:
                self.flush()
                self.builder.heading(_HEADINGS[name], child.get_text(" "))
            elif name in ("ul", "ol"):
                self.flush()
                self.builder.block("\n".join(_list_lines(child)))
            elif name == "table":
                self.flush()
                self.builder.block("\n".join(_table_lines(child)))
            elif name == "pre":
                self.flush()
                self.builder.block(child.get_text())
            elif name in _LEAF_BLOCKS:
                self.flush()
                self.builder.block(_norm(child.get_text(" ")))
            elif name == "br":
                self.inline.append("\n")
            elif name in _INLINE:
                self.inline.append(child.get_text(" "))
            else:  # div, section, article, li outside lists, …: a block boundary around its content
                self.flush()
                stack.append(iter(child.children))


@register_loader(".html", ".htm", ".xhtml")
def load_html(path: Path) -> LoadedDocument:
    from bs4 import BeautifulSoup

    data = read_limited(path)
    declared = _CHARSET.search(data[:4096])
    text = decode_text(data, declared.group(1).decode("ascii") if declared else None)
    # lxml's parser (libxml2) is linear-time; the standard library's html.parser is quadratic on
    # inputs such as 40 KB of "<a" or "</" (CPython gh-135462) and bs4 then recurses on depth.
    soup = BeautifulSoup(text.replace("\x00", ""), "lxml")
    metadata = {}
    if soup.title and _norm(soup.title.get_text()):
        metadata["title"] = _norm(soup.title.get_text())
    _remove_chrome(soup)
    root = soup.find("main") or soup.find("article") or soup.body or soup
    walker = _Walker()
    walker.walk(root)
    walker.flush()
    return LoadedDocument(walker.builder.build(), metadata)
