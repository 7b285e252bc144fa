"""Markdown line syntax in linear time: ATX headings, setext underlines, table rules, links, emphasis.

These used to be regular expressions whose backtracking made one long line quadratic or worse
(`# a` plus 5,000 spaces took minutes; 40 KB of `**a ` or `[` took tens of seconds). Each
function below gives the same result as the expression it replaced (kept in its docstring) with
one left-to-right pass; tests compare the two on random lines.
"""

from __future__ import annotations

import bisect
import re

_RULE_CELL = re.compile(r":?-{3,}:?")


def atx_heading(line: str) -> tuple[int, str] | None:
    """(level, title) of an ATX heading line, as `^(#{1,6})\\s+(.+?)\\s*#*\\s*$` matched it."""
    level = len(line) - len(line.lstrip("#"))
    rest = line[level:]
    if not 1 <= level <= 6 or len(rest) < 2 or not rest[0].isspace():
        return None
    body = rest.strip()
    title = body.rstrip("#").rstrip()  # drop the optional closing sequence of #s
    return level, title or body[:1]


def setext_underline(line: str) -> str | None:
    """'=' or '-' when the line is only that character (at least once) between whitespace."""
    body = line.strip()
    if body and body[0] in "=-" and body == body[0] * len(body):
        return body[0]
    return None


def is_table_rule(line: str) -> bool:
    """True for a table's `|---|:--:|` line (`^\\s*\\|?\\s*:?-{3,}:?\\s*(\\|\\s*:?-{3,}:?\\s*)*\\|?\\s*$`)."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|"):
        body = body[:-1]
    return all(_RULE_CELL.fullmatch(cell.strip()) for cell in body.split("|"))


def strip_links(line: str) -> str:
    """Links and images reduced to their text: `re.sub(r"!?\\[([^\\]]*)\\]\\([^)]*\\)", r"\\1", line)`."""
    if "[" not in line:
        return line
    out: list[str] = []
    pos = 0  # everything before pos is already in out
    close = paren = -2  # cached next "]" / ")" positions; -1 when there is none further on
    i = line.find("[")
    while i != -1:
        if close < i and close != -1:
            close = line.find("]", i + 1)
        if close == -1:
            break  # no "]" after this "[", so no link further on either
        if close + 1 < len(line) and line[close + 1] == "(":
            if paren < close + 2 and paren != -1:
                paren = line.find(")", close + 2)
            if paren == -1:
                break
            start = i - 1 if i > pos and line[i - 1] == "!" else i
            out.append(line[pos:start])
            out.append(line[i + 1:close])
            pos = paren + 1
            i = line.find("[", pos)
            continue
        i = line.find("[", i + 1)
    out.append(line[pos:])
    return "".join(out)


def _positions(line: str, mark: str) -> list[int]:
    found, i = [], line.find(mark)
    while i != -1:
        found.append(i)
        i = line.find(mark, i + 1)  # overlapping: "***" holds "**" at 0 and 1
    return found


def strip_emphasis(line: str) -> str:
    """`**strong**` and `__strong__` reduced to their text.

    Same as `re.sub(r"(\\*\\*|__)(?=\\S)(.+?)(?<=\\S)\\1", r"\\2", line)`:
    an opener at i needs a non-space at i+2; its closer is the first same mark at j ≥ i+3 with a
    non-space at j-1 (and no newline between, as `.` does not cross one). Closers are found by
    binary search in each mark's sorted positions, so a line without closers costs O(n log n),
    not O(n²).
    """
    if "**" not in line and "__" not in line:
        return line
    openers = sorted(_positions(line, "**") + _positions(line, "__"))
    closers = {mark: [j for j in _positions(line, mark) if j and not line[j - 1].isspace()] for mark in ("**", "__")}
    newlines = _positions(line, "\n")
    out: list[str] = []
    pos = 0
    for i in openers:
        if i < pos or i + 2 >= len(line) or line[i + 2].isspace():
            continue
        mark = line[i:i + 2]
        candidates = closers[mark]
        k = bisect.bisect_left(candidates, i + 3)
        if k == len(candidates):
            continue
        j = candidates[k]
        n = bisect.bisect_left(newlines, i + 2)
        if n < len(newlines) and newlines[n] < j:
            continue
        out.append(line[pos:i])
        out.append(line[i + 2:j])
        pos = j + 2
    out.append(line[pos:])
    return "".join(out)


def clean_line(line: str) -> str:
    """A Markdown line as text: links reduced to their text, then strong emphasis removed."""
    return strip_emphasis(strip_links(line))
