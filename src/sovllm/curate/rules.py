"""Rule flags: cheap, explainable checks on one QA pair against its chunk.

Each flag is a name from `config.RULE_FLAGS`; `curate.rules` chooses which of them drop a pair (the
others are still recorded, so the review page shows them). The checks are deliberately literal:
a flag must be explainable in one line to whoever reviews the dropped pairs.
"""

from __future__ import annotations

import re

from sovllm.config import CurateSection
from sovllm.ingest.language import classify_short
from sovllm.text import content_words, norm_question

# questions that could be asked of any document
_GENERIC_QUESTION = re.compile(
    r"\b(this|the|given|above|following) (text|passage|document|section|paragraph|context|excerpt|statement|chunk)\b|"
    r"\b(summari[sz]e|mentioned above|the author)\b|"
    r"\b(dieser|diesem|der|den|dem|obigen?) (text|abschnitt|absatz|kontext|auszug)\b|\b(dieses|das) dokument\b|"
    r"\bzusammenfass", re.IGNORECASE)
# answers that point at the prompt instead of stating the fact
_MENTIONS_CONTEXT = re.compile(
    r"\b(the|this|given|provided) (context|text|passage|excerpt|chunk|document)\b|\baccording to the (text|context|"
    r"passage|document)\b|\b(im|dem|laut|der|dieser) (kontext|text|abschnitt|auszug)\b|\b(im|laut) dokument\b",
    re.IGNORECASE)
_ASSISTANT_SPEAK = re.compile(
    r"\bas an ai\b|\blanguage model\b|\bi('| a)?m (sorry|unable|not able)\b|\bi cannot\b|\bi can't\b|"
    r"^(sure|certainly|of course|great question)\b|\bhere (is|are) (the|your|an?) (answer|question)|"
    r"\bals (ki|sprachmodell)\b|\bich kann (nicht|leider)\b|^(gerne|natürlich|sicher)\b", re.IGNORECASE)

MIN_LANGUAGE_WORDS = 6  # below this, language identification is a guess
MIN_LANGUAGE_PROB = 0.9


def flags_for(pair: dict, chunk: dict | None, section: CurateSection, languages: tuple[str, ...] = ()) -> list[str]:
    """Every rule flag that applies to `pair` (question/answer) given its `chunk`, in RULE_FLAGS order."""
    question, answer = (pair.get("question") or "").strip(), (pair.get("answer") or "").strip()
    if not question or not answer:
        return ["empty"]
    flags = []
    (q_min, q_max), (a_min, a_max) = section.question_chars, section.answer_chars
    if len(question) < q_min or len(answer) < a_min:
        flags.append("too_short")
    if len(question) > q_max or len(answer) > a_max:
        flags.append("too_long")
    if _GENERIC_QUESTION.search(question) or len(set(content_words(question))) < 2:
        flags.append("generic_question")
    if _MENTIONS_CONTEXT.search(answer):
        flags.append("mentions_context")
    if _ASSISTANT_SPEAK.search(question) or _ASSISTANT_SPEAK.search(answer):
        flags.append("assistant_speak")
    if chunk is not None and wrong_language(f"{question} {answer}", chunk.get("lang"), languages):
        flags.append("wrong_language")
    mined = (pair.get("generator") or {}).get("method") == "faq"  # an FAQ question is quoted on purpose
    if chunk is not None and not mined and copied_question(question, chunk["text"]):
        flags.append("copied_question")
    return flags


def wrong_language(text: str, expected: str | None, languages: tuple[str, ...] = ()) -> bool:
    """True when `text` is confidently in a language other than `expected` (the chunk's)."""
    if not expected or expected == "und" or len(text.split()) < MIN_LANGUAGE_WORDS:
        return False
    candidates = tuple(sorted({*languages, expected})) if languages else ()
    lang, prob = classify_short(text, candidates)
    return lang != expected and prob >= MIN_LANGUAGE_PROB


def copied_question(question: str, chunk_text: str) -> bool:
    """True when the question occurs verbatim (after normalising case and punctuation) in the chunk."""
    key = norm_question(question)
    return len(key.split()) >= 4 and f" {key} " in f" {norm_question(chunk_text)} "
