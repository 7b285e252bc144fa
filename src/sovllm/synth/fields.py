"""QA pairs from "Label: value" lines and table rows, with questions from a template.

- `field`: a line (or list item) "Label: value" whose label is a short name, not the start of a
  sentence ("Security hotline: extension 4400 (24/7)", "Stufe 1: Ein einzelner Arbeitsplatz ist
  gestört; …"). Question: "What is stated for “Security hotline” under “Contacts”?" (German: „Was
  gilt für „Stufe 1“ unter „Eskalationsstufen“?“) with the section it stands in, or "What is
  stated for “<label>” in the <document>?" where it stands in no section. Answer: the line itself (its
  first sentence where the value runs on).
- `table`: a row of a table with a header row, keyed by its first cell. Question: "What is stated
  for class “C4 Restricted” under “Data classes”?" (German: „Was gilt für Bereich „Geburtshilfe
  (Station 5A)“ unter „Besuchszeiten“?“). Answer: the row's other cells with their column
  names ("Besuchszeit: täglich 10:00–20:00 Uhr; Besucher je Patient: höchstens 3."), only when
  the whole row fits `answer_max` (a partial row is worse than none).

The answers are quotes of the chunk (grounded by construction) and the questions name the section
in the chunk's language, so they are neither garbled nor generic. A label or key that occurs twice
under the same section gives no pair: its question would be ambiguous. The section is named
without the document title: questions about one list or table then share few words besides
their label, and curation's near-duplicate check does not merge them.
"""

from __future__ import annotations

import re
from collections import Counter

from sovllm.synth.headings import line_topics, lines, title
from sovllm.synth.validate import LIST_MARK, split_sentences

_FIELD = re.compile(r"^(?P<label>[A-ZÄÖÜ][^:|]{0,49}?):\s+(?P<value>\S.*)$")
# a label is a name ("Approved by", "Stufe 1"); a "label" that opens like a sentence, has a verb or
# a relative pronoun, or puts an article after its first word ("Declare the incident") is a clause,
# and a question about it would not read
_SENTENCE_START = re.compile(
    r"^(the|a|an|this|these|that|those|it|we|you|if|when|please|there|der|die|das|ein|eine|dies|diese|dieser|wir|"
    r"sie|es|bitte|wenn)\b", re.IGNORECASE)
_CLAUSE_WORDS = frozenset("""is are was were be been has have had get gets got must can will shall should may might
that which who whom do does did ist sind war waren hat haben wird werden gibt muss müssen kann können soll sollen
darf dürfen dass welche welcher welches""".split())
_ARTICLES = frozenset("the a an every each all your our its this der die das dem den ein eine einen jede jeden".split())
_EMPHASIS = re.compile(r"^[*_]+|[*_]+$")
MAX_LABEL_WORDS = 6
MAX_KEY_WORDS = 6
MAX_KEY_CHARS = 50


def _article(doc_title: str) -> str:
    return doc_title if doc_title.lower().startswith("the ") else f"the {doc_title}"


def field_question(label: str, section: str | None, doc_title: str, lang: str | None) -> str:
    """The question a "Label: value" line (or a table row, `label` = 'column “key”') answers."""
    # the label stands between content words, so two questions that differ only in it still
    # differ in three of their word shingles (curation's near-duplicate check compares those)
    if lang == "de":
        return f"Was gilt für {label} unter „{section}“?" if section else f"Was gilt für {label} laut „{doc_title}“?"
    return f"What is stated for {label} under “{section}”?" if section else \
        f"What is stated for {label} in {_article(doc_title)}?"


def _quoted(text: str, lang: str | None) -> str:
    return f"„{text}“" if lang == "de" else f"“{text}”"


def _unambiguous(pairs: list[tuple[str, dict]]) -> list[dict]:
    counts = Counter(key for key, _ in pairs)
    return [pair for key, pair in pairs if counts[key] == 1]


def _name(label: str) -> bool:
    """True when a label is a short name, not a clause (see `_CLAUSE_WORDS`)."""
    words = label.casefold().split()
    return (len(words) <= MAX_LABEL_WORDS and not _SENTENCE_START.match(label) and ". " not in label
            and not _CLAUSE_WORDS.intersection(words) and not (len(words) > 1 and words[1] in _ARTICLES))


def field_pairs(chunk: dict, answer_max: int) -> list[dict]:
    """A pair for every "Label: value" line of the chunk."""
    doc_title, lang = title(chunk), chunk.get("lang")
    found, topics = lines(chunk["text"]), line_topics(chunk)
    pairs = []
    for line, section in zip(found, topics):
        if line.count("|") >= 2:
            continue
        match = _FIELD.match(_EMPHASIS.sub("", LIST_MARK.sub("", line)).strip())
        if not match:
            continue
        label, value = match.group("label").strip(), match.group("value").strip()
        if not _name(label):
            continue
        value = (split_sentences(value) or [value])[0]
        if len(value.split()) < 2 and not re.search(r"\d", value):
            continue  # "Status: open" says too little to ask about
        answer = f"{label}: {value}"
        if len(answer) > answer_max or (not section and not doc_title):
            continue
        question = field_question(_quoted(label, lang), section, doc_title, lang)
        pairs.append(((section, label.casefold()), {"question": question, "answer": answer}))
    return _unambiguous(pairs)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _header(cells: list[str]) -> bool:
    """A header row: two or more short column names without digits (a data row has values)."""
    return len(cells) >= 2 and all(cell and len(cell.split()) <= 4 and not re.search(r"\d", cell) for cell in cells)


def _column(name: str, lang: str | None) -> str:
    """A column name as it reads inside an English sentence ("Severity" → "severity"; German keeps nouns)."""
    if lang == "de" or not re.fullmatch(r"[A-Z][a-z]+(?: [a-z]+)*", name):
        return name
    return name[0].lower() + name[1:]


def table_pairs(chunk: dict, answer_max: int) -> list[dict]:
    """A pair for every row of a table with a header row whose cells all fit into one answer."""
    doc_title, lang = title(chunk), chunk.get("lang")
    found, topics = lines(chunk["text"]), line_topics(chunk)
    pairs, header = [], None
    for i, line in enumerate(found):
        if line.count("|") < 2:
            header = None
            continue
        cells = _cells(line)
        if header is None:  # a table's first line: its header, or (a table cut by chunking) no header
            header = cells if _header(cells) else []
            continue
        if not header or len(cells) != len(header):
            continue
        key = cells[0]
        if not key or len(key.split()) > MAX_KEY_WORDS or len(key) > MAX_KEY_CHARS or not any(cells[1:]):
            continue
        answer = "; ".join(f"{name}: {value}" for name, value in zip(header[1:], cells[1:]) if value) + "."
        if len(answer) > answer_max or (not topics[i] and not doc_title):
            continue
        label = f"{_column(header[0], lang)} {_quoted(key, lang)}"
        pairs.append(((topics[i], header[0], key.casefold()),
                      {"question": field_question(label, topics[i], doc_title, lang), "answer": answer}))
    return _unambiguous(pairs)
