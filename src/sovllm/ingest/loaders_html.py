"""HTML loader: keeps the heading hierarchy, lists and tables; drops navigation and boilerplate.

Wiki and intranet exports wrap a little content in a lot of chrome. The loader removes scripts,
styles, forms, `<nav>`, `<aside>`, `<footer>`, page-level `<header>`s, ARIA navigation/banner
regions and elements whose id or class says breadcrumb, cookie banner, menu, sidebar and the like.
It then reads `<main>` (or `<article>`, or `<body>`) in document order: headings start sections,
list items become `- item` / `1. item` lines, table rows become `cell | cell` lines.
"""

from __future__ import annotations

import re
from pathlib import Path

from sovllm.ingest.document import LoadedDocument, SectionBuilder, SkipDocument
from sovllm.ingest.loaders import read_text, register_loader

_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_LEAF_BLOCKS = {"p", "dt", "dd", "blockquote", "figcaption", "caption", "address", "summary", "legend"}
_DROP = ["script", "style", "noscript", "iframe", "svg", "template", "form", "button", "nav", "aside",
         "select", "input", "canvas", "object", "embed", "footer", "link", "meta"]
_CHROME_ROLES = ["navigation", "banner", "contentinfo", "search", "complementary"]
_CHROME = re.compile(r"breadcrumb|cookie|consent|navbar|^nav$|^menu|sidebar|skip-?link|site-?footer|"
                     r"site-?header|pagination|^toc$|table-of-contents", re.IGNORECASE)
_INLINE = {"a", "span", "strong", "em", "b", "i", "u", "code", "small", "sub", "sup", "abbr", "mark", "time",
           "label", "kbd", "q", "cite", "var", "samp", "s", "del", "ins", "bdi", "bdo", "data", "wbr", "img"}
_CHARSET = re.compile(rb"<meta[^>]+charset=[\"']?([A-Za-z0-9_-]+)", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _is_chrome(tag) -> bool:
    if tag.get("role") in _CHROME_ROLES or tag.get("aria-hidden") == "true" or tag.has_attr("hidden"):
        return True
    names = [tag.get("id") or "", *(tag.get("class") or [])]
    return any(_CHROME.search(n) for n in names if n)


def _list_lines(node, depth: int = 0) -> list[str]:
    lines = []
    ordered = node.name == "ol"
    try:
        number = int(node.get("start", 1))
    except ValueError:
        number = 1
    for item in node.find_all("li", recursive=False):
        nested = [c for c in item.children if getattr(c, "name", None) in ("ul", "ol")]
        text = _norm(" ".join(c.get_text(" ") if getattr(c, "name", None) else str(c)
                              for c in item.children if c not in nested))
        if text:
            lines.append("  " * depth + (f"{number}. " if ordered else "- ") + text)
            number += 1
        for sub in nested:
            lines.extend(_list_lines(sub, depth + 1))
    return lines


def _table_lines(table) -> list[str]:
    lines = []
    caption = table.find("caption")
    if caption and _norm(caption.get_text(" ")):
        lines.append(_norm(caption.get_text(" ")))
    for row in table.find_all("tr"):
        cells = [_norm(c.get_text(" ")) for c in row.find_all(["th", "td"], recursive=False)]
        if any(cells):
            lines.append(" | ".join(cells))
    return lines


class _Walker:
    def __init__(self):
        self.builder = SectionBuilder()
        self.inline: list[str] = []

    def flush(self) -> None:
        text = "\n".join(_norm(part) for part in "".join(self.inline).split("\n"))
        self.builder.block(text.strip())
        self.inline.clear()

    def walk(self, node) -> None:
        from bs4 import NavigableString
        from bs4.element import Comment, Declaration, Doctype, ProcessingInstruction

        for child in node.children:
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
                self.walk(child)
                self.flush()


@register_loader(".html", ".htm", ".xhtml")
def load_html(path: Path) -> LoadedDocument:
    from bs4 import BeautifulSoup

    try:
        head = path.read_bytes()[:4096]
    except OSError as exc:
        raise SkipDocument(f"unreadable ({exc.strerror or exc})") from None
    declared = _CHARSET.search(head)
    text = read_text(path, declared.group(1).decode("ascii") if declared else None)
    soup = BeautifulSoup(text, "html.parser")
    metadata = {}
    if soup.title and _norm(soup.title.get_text()):
        metadata["title"] = _norm(soup.title.get_text())
    for tag in soup(_DROP):
        tag.decompose()
    for tag in soup.find_all(True):
        if not tag.decomposed and _is_chrome(tag):
            tag.decompose()
    for header in soup.find_all("header"):
        if not header.decomposed and header.find_parent(["main", "article"]) is None:
            header.decompose()
    root = soup.find("main") or soup.find("article") or soup.body or soup
    walker = _Walker()
    walker.walk(root)
    walker.flush()
    return LoadedDocument(walker.builder.build(), metadata)
