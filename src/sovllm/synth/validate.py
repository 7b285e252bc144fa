"""The output contract of QA generation and the checks every generated pair must pass.

The JSON schema asks for one `{question, answer}` object per requested type, with length limits
chosen so that `max_tokens` always suffices (`max_tokens_for`). Questions are one line ending with
a question mark. In extractive mode (used with small models) the answers are chosen from the
chunk before any request (`synth/answers.py`) and the model writes only the question for one;
`check_question` decides whether that question is usable. In free mode a pair is valid only if the output
matches the schema, the pair is of a requested type, its question is not a duplicate within the
chunk, and at least `grounding` of the answer's content words occur in the chunk.
"""

from __future__ import annotations

import json
import re

import jsonschema

from sovllm.text import content_words, coverage, norm_question


def grounding_ratio(answer: str, context: str) -> float:
    """Share of the answer's distinct content words that occur in the context (0 for none)."""
    return coverage(answer, context, empty=0.0)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'„“(]?[A-ZÄÖÜ0-9])")
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
LIST_MARK = _LIST_MARK  # shared with synth/structure.py
LABEL = re.compile(r"^[^\d:]{1,30}:\s")  # "Owner: …", "Approved by: …": a label, not a statement


# a full stop that does not end a sentence: an abbreviation ("Dr.", "z. B.") or a German ordinal day
# before its month ("bis zum 1. Dezember")
_ABBREVIATION = re.compile(r"(?:^|\s|\()(?:Dr|Prof|Nr|Mr|Mrs|Ms|St|No|ca|bzw|vgl|ggf|inkl|zzgl|Abs|Art|Str|"
                           r"z\. ?B|d\. ?h|u\. ?a|e\.g|i\.e|approx)\.$", re.IGNORECASE)
_LETTER = re.compile(r"(?:^|\s)[a-zäöü]\.$")  # "z." of "z. B.": a lower-case letter never ends a sentence
_ORDINAL = re.compile(r"(?:^|\s)\d{1,2}\.$")
_MONTH = re.compile(r"^(?:Januar|Jänner|Februar|März|April|Mai|Juni|Juli|August|September|Oktober|November|"
                    r"Dezember)\b")


def split_sentences(line: str) -> list[str]:
    """The sentences of one line of text (split after ., ! or ? before a capital or digit).

    A piece ending in an abbreviation, or in a day number before a German month name, is joined
    with the next one.
    """
    out: list[str] = []
    for piece in (p.strip() for p in _SENTENCE_END.split(line)):
        if not piece:
            continue
        if out and (_ABBREVIATION.search(out[-1]) or _LETTER.search(out[-1]) or (_ORDINAL.search(out[-1]) and _MONTH.match(piece))):
            out[-1] = f"{out[-1]} {piece}"
        else:
            out.append(piece)
    return out


QUESTION_WORDS = {
    "en": ["What", "Which", "Who", "Whom", "Whose", "When", "Where", "How", "Why", "Is", "Are", "Does", "Do", "Can",
           "Must", "Should", "Will", "May"],
    "de": ["Was", "Welche", "Welcher", "Welches", "Welchen", "Welchem", "Wer", "Wem", "Wen", "Wann", "Wo", "Wohin",
           "Woher", "Wie", "Warum", "Weshalb", "Wozu", "Womit", "Wofür", "Worauf", "Wodurch", "Ist", "Sind", "Gibt",
           "Muss", "Müssen", "Darf", "Dürfen", "Kann", "Können", "Wird", "Werden", "Hat", "Haben", "Soll", "Sollen"],
}


def question_schema(question_max: int, lang: str | None = None) -> dict:
    """One question: a single line ending with '?'; with `lang`, it starts with a question word."""
    start = f"({'|'.join(QUESTION_WORDS[lang])}) " if lang in QUESTION_WORDS else ""
    return {"type": "string", "pattern": f"^{start}[^?\"\\\\\\n]{{8,{question_max - 10}}}\\?$"}


_GENERIC = re.compile(r"\b(the answer|the question|this question|(the|this|given) statements?|this text|the text|"
                      r"this section|the section|die frage|die antwort|diese aussage|der aussage|dieser text|"
                      r"den text|dieser abschnitt)\b", re.IGNORECASE)
def check_question(question: str, answer: str, seen: set[str]) -> str | None:
    """Why a generated question is unusable for `answer` (None when it is fine).

    `duplicate`: asked before for this chunk; `generic`: talks about "the question", "this
    statement" and the like; `off_topic`: shares fewer than two content words with its answer;
    `rambling`: repeats itself or runs past 110 characters; `copy`: repeats the answer instead of
    asking for it.
    """
    key = norm_question(question)
    if not key or key in seen:
        return "duplicate"
    if _GENERIC.search(question):
        return "generic"
    q_words, a_words = set(content_words(question)), set(content_words(answer))
    if len(q_words & a_words) < min(2, len(a_words)):
        return "off_topic"
    words = question.casefold().split()
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if len(trigrams) != len(set(trigrams)) or len(question) > 110:
        return "rambling"
    if len(a_words) >= 4 and len(q_words & a_words) / len(a_words) > 0.85:
        return "copy"
    return None


def schema_for(types: list[str], question_max: int, answer_max: int, answers: list[str] | None = None) -> dict:
    """The response schema; with `answers`, each answer must be one of them and is written first."""
    if answers is not None:
        pair = {"type": "object", "additionalProperties": False, "required": ["answer", "question"],
                "properties": {"answer": {"enum": answers}, "question": question_schema(question_max)}}
    else:
        pair = {"type": "object", "additionalProperties": False, "required": ["question", "answer"],
                "properties": {"question": question_schema(question_max),
                               "answer": {"type": "string", "minLength": 10, "maxLength": answer_max}}}
    return {"type": "object", "additionalProperties": False, "required": list(types),
            "properties": {t: pair for t in types}}


def max_tokens_for(types: list[str], question_max: int, answer_max: int, answers: list[str] | None = None) -> int:
    """A completion budget the schema can never exceed: one token per character plus the JSON frame."""
    longest = max((len(a) for a in answers), default=0) if answers is not None else answer_max
    return 16 + sum(question_max + longest + 24 for _ in types)


def check_output(text: str, finish_reason: str | None, chunk_text: str, types: list[str], schema: dict,
                 threshold: float, seen_questions: set[str],
                 used_answers: set[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """Valid pairs by type, and the reason each other requested type failed.

    Reasons: `truncated` (cut off by max_tokens), `schema` (not JSON or not matching the schema),
    `duplicate` (question already asked, or answer already used, for this chunk), `grounding` (answer
    not from the chunk).
    """
    if finish_reason == "length":
        return {}, {t: "truncated" for t in types}
    try:
        data = json.loads(text)
        jsonschema.validate(data, schema)
    except (ValueError, jsonschema.ValidationError):
        return {}, {t: "schema" for t in types}
    valid, failed = {}, {}
    for type_ in types:
        question, answer = data[type_]["question"].strip(), data[type_]["answer"].strip()
        key = norm_question(question)
        if not key or key in seen_questions or (used_answers is not None and answer in used_answers):
            failed[type_] = "duplicate"
        elif grounding_ratio(answer, chunk_text) < threshold:
            failed[type_] = "grounding"
        else:
            seen_questions.add(key)
            if used_answers is not None:
                used_answers.add(answer)
            valid[type_] = {"question": question, "answer": answer}
    return valid, failed
