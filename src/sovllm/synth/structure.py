"""QA pairs read off a document's structure, without any model call.

Four kinds, all quotes of the chunk (so they are grounded by construction):

- `faq`: a line of the chunk that is a question (an FAQ entry, "How do I request vacation?")
  with the statements right below it as the answer. These questions were written by the
  document's authors, which makes them the best questions a corpus has.
- `overview`: for every section of the chunk that opens with a statement, "What does the
  <document> say about “<heading>”?" (German: „Was steht in „<Dokument>“ zum Thema
  „<Überschrift>“?“) answered with the one to three statements that open that section. The
  sections are the heading lines inside the chunk and, for a chunk that starts its own section
  (`opens_section`, see `headings.mark_section_openings`), the last entry of its heading path.
- `field` and `table`: "Label: value" lines and table rows, with a templated question
  (`synth/fields.py`).

A small generator model writes few usable questions, and almost none in German (measured in
`docs/synth.md`); these pairs give every structured section correct pairs in the document's own
language. `synth.structure` chooses the kinds; `[]` turns them off. A question that two pairs of
one chunk would share is dropped from both: it would be ambiguous.
"""

from __future__ import annotations

import re
from collections import Counter

from sovllm.synth.fields import field_pairs, table_pairs
from sovllm.synth.headings import (
    heading_above,
    is_heading,
    lines,
    own_topic,
    title,
    topic,
)
from sovllm.synth.validate import LABEL as _LABEL
from sovllm.synth.validate import LIST_MARK as _LIST_MARK
from sovllm.synth.validate import split_sentences
from sovllm.text import norm_question

# a paragraph that introduces what follows ("all of these", "die folgenden") is no answer on its own
_POINTS_ON = re.compile(r"\b(all of these|the following|as follows|the list|listed below|folgende[nrs]?|wie folgt|"
                        r"unten aufgeführt)\b", re.IGNORECASE)
MAX_STATEMENTS = 3
KINDS = ("faq", "overview", "field", "table")
TYPE = {"faq": "faq", "overview": "overview", "field": "factual", "table": "factual"}


def is_question(line: str) -> bool:
    """A line that asks a question: capitalised, ends with "?", three or more words, not a table row or quote."""
    return line.endswith("?") and len(line.split()) >= 3 and line[:1].isupper() and line.count("|") < 2 \
        and '"' not in line


def _statement(sentence: str) -> bool:
    """A complete sentence of six or more words that states something (not a label or list intro)."""
    return (len(sentence.split()) >= 6 and sentence[:1].isupper() and sentence.endswith(".") and "?" not in sentence
            and not _LABEL.match(sentence))


def _following_statements(found: list[str], start: int, max_chars: int, *, short_first: bool = False) -> str | None:
    """The statements from `found[start]` on, up to the next heading or question, within `max_chars`.

    The first sentence must be a statement (else the section opens with a list or a table and
    has no quotable answer), and the paragraph must not point on to a list ("all of these");
    `short_first` accepts a short first sentence ("Yes, up to 32 hours
    per week.") as FAQ answers often start.
    """
    if start < len(found) and _LIST_MARK.match(found[start]):
        return None  # a list: its first item alone would be a partial answer
    out: list[str] = []
    for line in found[start:]:
        if is_heading(line) or is_question(line) or line.count("|") >= 2:
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


def overview_question(doc_title: str, section: str, lang: str | None) -> str:
    if lang == "de":
        return f"Was steht in „{doc_title}“ zum Thema „{section}“?"
    article = "" if doc_title.lower().startswith("the ") else "the "
    return f"What does {article}{doc_title} say about “{section}”?"


def faq_pairs(chunk: dict, answer_max: int) -> list[dict]:
    """Every question line of the chunk that is followed by a quotable answer."""
    found, pairs = lines(chunk["text"]), []
    for i, line in enumerate(found):
        if is_question(line):
            answer = _following_statements(found, i + 1, answer_max, short_first=True)
            if answer:
                pairs.append({"question": line, "answer": answer})
    return pairs


def overview_pairs(chunk: dict, answer_max: int) -> list[dict]:
    """The overview pair of every section of the chunk that opens with a statement, in order."""
    doc_title, lang = title(chunk), chunk.get("lang")
    if not doc_title:
        return []
    found, pairs = lines(chunk["text"]), []
    section = own_topic(chunk) if chunk.get("opens_section") else None
    if section and found and not is_heading(found[0]):
        answer = _following_statements(found, 0, answer_max)
        if answer:
            pairs.append({"question": overview_question(doc_title, section, lang), "answer": answer})
    for i, line in enumerate(found[:-1]):
        if is_heading(line) and line != doc_title:
            answer = _following_statements(found, i + 1, answer_max)
            if answer:
                name = topic(line, heading_above(found, i, doc_title), chunk)
                pairs.append({"question": overview_question(doc_title, name, lang), "answer": answer})
    return pairs


def structure_pairs(chunk: dict, kinds: list[str] | tuple[str, ...], answer_max: int) -> list[dict]:
    """The structure pairs of one chunk, as {type, method, name, question, answer}, in `KINDS` order.

    Names (unique within the chunk, the suffix of the pair id): `faq-<n>`, `overview` then
    `overview-<n>`, `field-<n>`, `table-<n>`; `type` is `faq`, `overview` or (fields and table
    rows) `factual`; `method` is the kind.
    """
    makers = {"faq": faq_pairs, "overview": overview_pairs, "field": field_pairs, "table": table_pairs}
    found = [(kind, pair) for kind in KINDS if kind in kinds for pair in makers[kind](chunk, answer_max)]
    counts = Counter(norm_question(pair["question"]) for _, pair in found)
    out, numbers = [], Counter()
    for kind, pair in found:
        if counts[norm_question(pair["question"])] > 1:
            continue
        numbers[kind] += 1
        name = "overview" if kind == "overview" and numbers[kind] == 1 else f"{kind}-{numbers[kind]}"
        out.append({"type": TYPE[kind], "method": kind, "name": name, **pair})
    return out
