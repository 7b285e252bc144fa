"""QA pairs read off a document's structure, without any model call.

Two kinds, both exact quotes of the chunk (so they are grounded by construction):

- `faq`: a line of the chunk that is a question (an FAQ entry, "How do I request vacation?")
  with the statements right below it as the answer. These questions were written by the
  document's authors, which makes them the best questions a corpus has.
- `overview`: for the first heading line of a chunk that is followed by a statement, "What does
  the <document> say about “<heading>”?" (German: „Was steht in „<Dokument>“ zum Thema
  „<Überschrift>“?“) answered with the one to three statements that open that section.

A small generator model writes few usable questions, and almost none in German (measured in
`docs/synth.md`); these pairs give every structured section at least one correct pair in the
document's own language. `synth.structure` chooses the kinds; `[]` turns them off.
"""

from __future__ import annotations

import re

from sovllm.synth.validate import LABEL as _LABEL
from sovllm.synth.validate import LIST_MARK as _LIST_MARK
from sovllm.synth.validate import split_sentences

_NUMBERING = re.compile(r"^(?:\d+(?:\.\d+)*\.?|[A-Z]\.)\s+")
# a paragraph that introduces what follows ("all of these", "die folgenden") is no answer on its own
_POINTS_ON = re.compile(r"\b(all of these|the following|as follows|the list|listed below|folgende[nrs]?|wie folgt|"
                        r"unten aufgeführt)\b", re.IGNORECASE)
MAX_HEADING_WORDS = 8
MAX_STATEMENTS = 3


def _is_heading(line: str) -> bool:
    """A short line without closing punctuation: a section title, not a sentence or table row."""
    return (len(line.split()) <= MAX_HEADING_WORDS and line[:1].isalnum() and line.count("|") < 2
            and not line.endswith((".", ":", "?", "!", ";", ",", ")")) and not _LABEL.match(line))


def _is_question(line: str) -> bool:
    return line.endswith("?") and len(line.split()) >= 3 and line[:1].isupper() and line.count("|") < 2 \
        and '"' not in line


def _statement(sentence: str) -> bool:
    """A complete sentence of six or more words that states something (not a label or list intro)."""
    return (len(sentence.split()) >= 6 and sentence[:1].isupper() and sentence.endswith(".") and "?" not in sentence
            and not _LABEL.match(sentence))


def _following_statements(lines: list[str], start: int, max_chars: int, *, short_first: bool = False) -> str | None:
    """The statements from `lines[start]` on, up to the next heading or question, within `max_chars`.

    The first sentence must be a statement (else the section opens with a list or a table and
    has no quotable answer), and the paragraph must not point on to a list ("all of these");
    `short_first` accepts a short first sentence ("Yes, up to 32 hours
    per week.") as FAQ answers often start.
    """
    if start < len(lines) and _LIST_MARK.match(lines[start]):
        return None  # a list: its first item alone would be a partial answer
    out: list[str] = []
    for line in lines[start:]:
        if _is_heading(line) or _is_question(line) or line.count("|") >= 2:
            break
        for sentence in split_sentences(_LIST_MARK.sub("", line)):
            ok = _statement(sentence) or (short_first and not out and sentence.endswith(".")
                                          and sentence[:1].isupper() and len(sentence.split()) >= 3)
            if not ok or len(" ".join(out + [sentence])) > max_chars or len(out) == MAX_STATEMENTS:
                return " ".join(out) or None
            out.append(sentence)
        if out:  # an answer is one paragraph
            break
    answer = " ".join(out)
    return None if not answer or _POINTS_ON.search(answer) else answer


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _title(chunk: dict) -> str:
    """The document's title: its top heading (a web page's <title> often carries the site's name)."""
    title = (chunk.get("heading_path") or [""])[0] or (chunk.get("meta") or {}).get("title") or ""
    return re.sub(r"\s+", " ", title).strip()


def _topic(heading: str, above: str | None, chunk: dict) -> str:
    """The heading without its numbering, with its parent where the heading alone says little.

    `above` is a heading line right above it in the chunk. A one-word numbered sub-heading gets
    the parent its numbering nests it in (3.4 inside "3. Urlaub": „Urlaub: Anspruch“), taken from
    `above` or the chunk's heading path; an unnumbered heading under an unnumbered heading line
    gets that line ("Ledgerline 7.2: New features").
    """
    own = _NUMBERING.match(heading)
    topic = heading[own.end():].strip() if own else heading
    if own is None:
        if above is not None and _NUMBERING.match(above) is None:
            return f"{above}: {topic}"
        return topic
    if len(topic.split()) > 1:
        return topic
    path = (chunk.get("heading_path") or [])[1:]
    for parent in ([above] if above else []) + path[-1:]:
        number = _NUMBERING.match(parent)
        if number and own.group(0).strip().rstrip(".").startswith(number.group(0).strip().rstrip(".") + "."):
            return f"{parent[number.end():].strip()}: {topic}"
    return topic


def overview_question(title: str, topic: str, lang: str | None) -> str:
    if lang == "de":
        return f"Was steht in „{title}“ zum Thema „{topic}“?"
    article = "" if title.lower().startswith("the ") else "the "
    return f"What does {article}{title} say about “{topic}”?"


def faq_pairs(chunk: dict, answer_max: int) -> list[dict]:
    """Every question line of the chunk that is followed by a quotable answer."""
    lines, pairs = _lines(chunk["text"]), []
    for i, line in enumerate(lines):
        if _is_question(line):
            answer = _following_statements(lines, i + 1, answer_max, short_first=True)
            if answer:
                pairs.append({"question": line, "answer": answer})
    return pairs


def overview_pair(chunk: dict, answer_max: int) -> dict | None:
    """The overview pair of the chunk's first heading that opens with a statement (None if none does)."""
    title = _title(chunk)
    if not title:
        return None
    lines = _lines(chunk["text"])
    for i, line in enumerate(lines[:-1]):
        if _is_heading(line) and line != title:
            answer = _following_statements(lines, i + 1, answer_max)
            if answer:
                above = lines[i - 1] if i and _is_heading(lines[i - 1]) and lines[i - 1] != title else None
                return {"question": overview_question(title, _topic(line, above, chunk), chunk.get("lang")),
                        "answer": answer}
    return None


def structure_pairs(chunk: dict, kinds: list[str], answer_max: int) -> list[dict]:
    """The `faq` and `overview` pairs of one chunk, as {type, name, question, answer}."""
    out: list[dict] = []
    if "faq" in kinds:
        out += [{"type": "faq", "name": f"faq-{n}", **p} for n, p in enumerate(faq_pairs(chunk, answer_max), 1)]
    if "overview" in kinds and (pair := overview_pair(chunk, answer_max)) is not None:
        out.append({"type": "overview", "name": "overview", **pair})
    return out
