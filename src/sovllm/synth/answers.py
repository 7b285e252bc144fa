"""Answer candidates for extractive mode, and the plan of which ones a chunk's questions are asked for.

A candidate states a fact of the chunk in its own words: a sentence (a complete statement of six
or more words), two consecutive sentences of one section (for comparisons), or a list with the
line that introduces it rendered as one statement ("Bitte halten Sie beim Anruf bereit: Station
oder Bereich; eine Rückrufnummer."), which is the complete answer where each item alone would be
a partial one. Table rows and "Label: value" lines are not candidates: they get templated
questions (`synth/fields.py`).

`plan` picks up to `pairs_per_chunk` candidates that share no sentence, the question types taking
turns, each type choosing its best-ranked candidate in the section with the fewest picks so far,
so the questions cover every section of the chunk and not only its first paragraph. Then each pick
gets up to `max_attempts - 1` fallbacks (its type's next candidates, disjoint from every other
pick's) for when the model's question is rejected. Candidates that repeat an answer a structure
pair of the chunk already has (`avoid`) are left out: a request for them would be wasted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from sovllm.synth.headings import is_heading
from sovllm.synth.validate import LABEL, LIST_MARK, split_sentences

_CONTRAST = re.compile(r"\b(than|while|whereas|unlike|instead|but|however|compared|both|either|rather|"
                       r"als|während|dagegen|statt|anstatt|aber|jedoch|sowohl|entweder|hingegen)\b", re.IGNORECASE)
_RULE = re.compile(r"\b(because|so that|to ensure|in order|must|should|if|when|unless|only|never|always|after|"
                   r"before|weil|damit|muss|müssen|soll|sollen|wenn|falls|nur|nie|immer|nach|bevor|sobald)\b",
                   re.IGNORECASE)
# a sentence about the text itself ("This page explains who may enter it, …") answers no question a
# reader would ask; the model turned such sentences into questions the sentence does not answer
_ABOUT_THE_TEXT = re.compile(r"^(this|the following) (page|document|section|text|chapter)\b|"
                             r"^(diese[rs]?|die folgende) (seite|dokument|abschnitt|text|kapitel)\b", re.IGNORECASE)
MAX_ITEM_WORDS = 12
# part of the cache key in extractive mode: raise it when a change here changes which answers a
# chunk's questions are asked for, so cached chunks are asked again
PLAN_VERSION = 2


@dataclass(frozen=True)
class Candidate:
    text: str
    section: int  # how many heading lines of the chunk stand above it
    parts: tuple[str, ...]  # the sentences (or lead-in and items) it is made of


@dataclass
class Slot:
    """One question to ask: its type and the answers to try in turn (the pick, then its fallbacks)."""

    type: str
    answers: list[str] = field(default_factory=list)


def _statement(sentence: str, max_chars: int) -> bool:
    """A complete statement usable as an answer: capitalised, ends with a full stop, 6+ words."""
    return (len(sentence.split()) >= 6 and len(sentence) <= max_chars and sentence[:1].isupper()
            and sentence.endswith(".") and "?" not in sentence and '"' not in sentence and "\\" not in sentence
            and not LABEL.match(sentence) and not _ABOUT_THE_TEXT.match(sentence))


def _list_statement(lead: str, items: list[str], max_chars: int) -> Candidate | None:
    """A list and its lead-in line ("… bereit:") as one statement, or None where that would not read."""
    lead = (split_sentences(lead) or [""])[-1]
    if not lead[:1].isupper() or not lead.endswith(":") or len(items) < 2:
        return None
    if any(len(item.split()) > MAX_ITEM_WORDS or LABEL.match(item) or re.search(r"[.!?]\s", item) for item in items):
        return None  # items that are sentences or labelled fields are asked about on their own
    items = [item.rstrip(";,.") for item in items]
    text = f"{lead} {'; '.join(items)}."
    if len(text) > max_chars or '"' in text or "\\" in text:
        return None
    return Candidate(text, 0, (lead, *items))


def candidates(text: str, max_chars: int) -> tuple[list[Candidate], list[Candidate]]:
    """(singles, pairs): the chunk's single statements and list statements, and consecutive sentence pairs.

    Table lines are left out and list markers stripped; the order is the chunk's.
    """
    singles: list[Candidate] = []
    sentences: list[Candidate] = []
    section, previous, items = 0, "", []

    def close_list():
        if items and (listed := _list_statement(previous, items, max_chars)) is not None:
            singles.append(Candidate(listed.text, section, listed.parts))

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if LIST_MARK.match(line):
            items.append(LIST_MARK.sub("", line).strip())
        else:
            close_list()
            items = []
        if is_heading(line):
            section += 1
        elif line.count("|") < 2:
            for sentence in split_sentences(LIST_MARK.sub("", line).strip()):
                if _statement(sentence, max_chars):
                    sentences.append(Candidate(sentence, section, (sentence,)))
        if not LIST_MARK.match(line):
            previous = line
    close_list()
    pairs = [Candidate(f"{a.text} {b.text}", a.section, (a.text, b.text)) for a, b in zip(sentences, sentences[1:])
             if a.section == b.section and len(a.text) + len(b.text) + 1 <= max_chars]
    seen, unique = set(), []
    for candidate in sentences + singles:
        if candidate.text not in seen:
            seen.add(candidate.text)
            unique.append(candidate)
    return unique, pairs


def _facts(sentence: str) -> int:
    return 2 * bool(re.search(r"\d", sentence)) + len(re.findall(r"(?<!^)\b[A-ZÄÖÜ][\w-]+", sentence))


def ranked(text: str, types: list[str], max_chars: int, avoid: list[str] | tuple[str, ...] = ()) -> dict[str, list[Candidate]]:
    """Candidates for each question type, best first, without those a text in `avoid` contains.

    factual: statements with numbers and names first; conceptual: statements of a rule, reason or
    condition first; comparison: statements with a contrast, then pairs of consecutive sentences.
    """
    singles, pairs = candidates(text, max_chars)

    def fresh(items: list[Candidate]) -> list[Candidate]:
        return [c for c in items if not any(part in used for part in c.parts for used in avoid)]

    singles, pairs = fresh(singles), fresh(pairs)
    order = {
        "factual": sorted(singles, key=lambda c: (-_facts(c.text), len(c.text))),
        "conceptual": [c for c in singles if _RULE.search(c.text)] + [c for c in singles if not _RULE.search(c.text)],
        "comparison": [c for c in singles if _CONTRAST.search(c.text)] + pairs,
    }
    return {t: order[t] for t in types}


def rank_answers(text: str, types: list[str], max_chars: int) -> dict[str, list[str]]:
    """The candidate texts for each question type, best first."""
    return {t: [c.text for c in found] for t, found in ranked(text, types, max_chars).items()}


def plan(text: str, types: list[str], n: int, attempts: int, max_chars: int,
         avoid: list[str] | tuple[str, ...] = ()) -> tuple[list[Slot], list[str]]:
    """Up to `n` slots with disjoint answers, and the types that found no candidate when their turn came."""
    order = ranked(text, types, max_chars, avoid)
    taken: set[str] = set()
    per_section: Counter = Counter()
    picks: list[tuple[Slot, Candidate]] = []
    starved: list[str] = []
    active = list(types)

    def free(type_: str) -> list[Candidate]:
        return [c for c in order[type_] if not taken.intersection(c.parts)]

    while len(picks) < n and active:
        for type_ in list(active):
            if len(picks) == n:
                break
            options = free(type_)
            if not options:
                active.remove(type_)
                if not any(slot.type == type_ for slot, _ in picks):
                    starved.append(type_)
                continue
            pick = min(options, key=lambda c: per_section[c.section])  # min keeps the best-ranked of a tie
            picks.append((Slot(type_, [pick.text]), pick))
            taken.update(pick.parts)
            per_section[pick.section] += 1
    for _ in range(attempts - 1):
        for slot, _pick in picks:
            if options := free(slot.type):
                slot.answers.append(options[0].text)
                taken.update(options[0].parts)
    return [slot for slot, _ in picks], starved
