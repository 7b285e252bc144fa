"""Unanswerable items and distractor contexts, built inside one split without any LLM call.

Two kinds of unanswerable item (`meta.negative` in the records):

- `on_topic`: a pair's own question asked about its own chunk with the answer-bearing sentence(s)
  removed (`remove_answer`), kept only when the answer's own words and numbers are then really
  absent. Same document, same entities, the asked fact is simply not there: the hard case a user
  meets ("Which coffee brand?" next to the canteen's opening hours), and one no word-overlap rule
  can separate, since the question's words are all still in the context.
- `foreign`: a chunk of the split paired with a kept question that was generated for a chunk of a
*different* document of the same split, answered with the refusal sentence. Among the chunks a
question could be paired with, the most BM25-similar one is preferred (a hard negative: same
vocabulary, different facts), but a candidate whose question shares more than `max_overlap` of its
content words with the chunk is discarded, because it might be answerable after all. Contexts in
the question's language are preferred.

With `curate.negatives_per_context` the training split's unanswerable items are instead put onto
the answerable items' own contexts (`foreign_questions`): each context then holds its questions and
as many foreign ones, and the model learns to tell them apart on the same text.

Distractors: a share of the training examples get one or two extra chunks from other documents of
the same split, in random order, so the model learns to find the passage that answers — as it
must behind real retrieval.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import re

from sovllm.retrieval import BM25
from sovllm.synth.headings import is_heading
from sovllm.synth.structure import is_question
from sovllm.synth.validate import LIST_MARK, split_sentences
from sovllm.text import content_words, coverage

CANDIDATES = 8  # best-scoring contexts tried per question before giving up on it


@dataclass
class Negative:
    pair: dict          # the kept pair whose question is reused
    context: dict       # the chunk it is paired with
    score: float


@dataclass
class NegativeStats:
    wanted: int = 0
    built: int = 0
    discarded_overlap: int = 0
    no_context: int = 0


def overlap(question: str, context: str) -> float:
    """Share of the question's distinct content words that occur in the context."""
    return coverage(question, context, empty=1.0)


def wanted(answerable: int, share: float) -> int:
    """Unanswerable items so that they make up `share` of the split."""
    return round(answerable * share / (1 - share)) if answerable and share > 0 else 0


def build_negatives(pairs: list[dict], chunks: list[dict], chunk_by_id: dict[str, dict], n: int, *,
                    max_overlap: float, rng: random.Random) -> tuple[list[Negative], NegativeStats]:
    """Up to `n` negatives from the kept `pairs` and the `chunks` of one split."""
    stats = NegativeStats(wanted=n)
    if n <= 0 or not chunks:
        return [], stats
    index = BM25([c["text"] for c in chunks])
    order = pairs[:]
    rng.shuffle(order)
    used_contexts: set[str] = set()
    out: list[Negative] = []
    for pair in order:
        if len(out) >= n:
            break
        source = chunk_by_id[pair["chunk_id"]]
        scores = index.scores(pair["question"])
        candidates = [i for i in range(len(chunks)) if chunks[i]["doc_id"] != source["doc_id"]]
        if not candidates:
            stats.no_context += 1
            continue
        lang = source.get("lang")
        # same language first, then the most similar; an unused context before a used one
        candidates.sort(key=lambda i: (chunks[i].get("lang") != lang, chunks[i]["id"] in used_contexts,
                                       -scores[i], chunks[i]["id"]))
        for i in candidates[:CANDIDATES]:
            if overlap(pair["question"], chunks[i]["text"]) > max_overlap:
                stats.discarded_overlap += 1
                continue
            out.append(Negative(pair, chunks[i], scores[i]))
            used_contexts.add(chunks[i]["id"])
            break
    stats.built = len(out)
    return out, stats


def foreign_questions(contexts: list[dict], pairs: list[dict], chunk_by_id: dict[str, dict], n: int, *,
                      max_overlap: float, rng: random.Random, lang: str | None,
                      uses: Mapping[str, int] | None = None) -> list[dict]:
    """Up to `n` kept pairs whose questions the `contexts` cannot answer: from other documents, sharing
    at most `max_overlap` of their content words with the contexts. The hardest candidates first (same
    language, then the fewest earlier `uses` as a foreign question, then the most shared words), drawn
    at random from the best 2 × `n`.

    The uses come before the difficulty because a short question ("What is the IT Security
    Policy?") shares half its few content words with many contexts: ranked by difficulty alone it was
    the foreign question of 5 of the example's 20 training contexts, and the adapter learned to refuse
    that kind of question ("What is a Tenant Admin?") even where the context answers it."""
    if n <= 0:
        return []
    uses = uses or {}
    docs = {c["doc_id"] for c in contexts}
    text = "\n".join(c["text"] for c in contexts)
    scored = []
    for pair in pairs:
        source = chunk_by_id[pair["chunk_id"]]
        if source["doc_id"] in docs:
            continue
        shared = overlap(pair["question"], text)
        if shared <= max_overlap:
            scored.append((source.get("lang") != lang, uses.get(pair["id"], 0), -shared, pair["id"], pair))
    scored.sort(key=lambda s: s[:4])
    best = [s[4] for s in scored[:2 * n]]
    return rng.sample(best, min(n, len(best)))


_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
MIN_LEFT_WORDS = 25  # an ablated context must still be a passage, not a heading and a line


def _answer_spans(text: str, answer: str) -> list[str] | None:
    """The pieces of `text` that state `answer`: its sentences verbatim, else the sentence of the text
    that shares most of an answer sentence's content words (at least 60 %); None if one is not found."""
    sentences = [s for s in split_sentences(" ".join(answer.split())) if s.strip()] or [answer.strip()]
    text_sentences = [s for line in text.splitlines() for s in split_sentences(LIST_MARK.sub("", line.strip()))]
    spans = []
    for sentence in sentences:
        if sentence in text:
            spans.append(sentence)
            continue
        scored = [(coverage(sentence, candidate, empty=0.0), candidate) for candidate in text_sentences]
        best = max(scored, default=(0.0, ""))
        if best[0] < 0.6:
            return None
        spans.append(best[1])
    return spans


def _section_lines(lines: list[str], first: int, last: int, *, questions: bool = False) -> range:
    """The lines of the section holding lines `first`..`last`: from the heading above them (the
    chunk's start when there is none) up to the next heading. With `questions` a question line
    (an FAQ entry's question) bounds a section as a heading does."""
    def heading(i: int) -> bool:
        line = lines[i].strip().lstrip("#").strip()
        return is_heading(line) or (questions and is_question(line))
    start = next((i for i in range(first, -1, -1) if heading(i)), 0)
    end = next((i for i in range(last + 1, len(lines)) if heading(i)), len(lines))
    return range(start, end)


def remove_answer(text: str, answer: str, *, whole_section: bool = False, faq: bool = False) -> str | None:
    """`text` without the sentences that state `answer` (lines left empty or a bare list marker
    dropped); None when they cannot be found or too little text would remain.

    With `whole_section` (an overview pair: "What does <document> say about <heading>?") the whole
    section the answer opens goes, heading and all: with only its first sentences gone the rest of
    the section would still answer the question. With `faq` (an FAQ pair: a question line of the
    document and the statements below it) the whole entry goes, from its question line to the next
    heading or question: the answer is only the entry's first statements, and the rest of the entry
    still answers its question ("Do customers pay for restores?" — "… never billed when Acme caused
    the restore")."""
    spans = _answer_spans(text, answer)
    if not spans:
        return None
    if whole_section or faq:
        lines = text.splitlines()
        hits = [i for i, line in enumerate(lines) for span in spans if span in line]
        if not hits:
            return None
        gone = _section_lines(lines, min(hits), max(hits), questions=faq)
        left = "\n".join(line for i, line in enumerate(lines) if i not in gone)
        left = re.sub(r"\n{3,}", "\n\n", left).strip()
        return left if len(left.split()) >= MIN_LEFT_WORDS else None
    out = text
    for span in spans:
        out = out.replace(span, "", 1)
    lines = []
    for before, after in zip(text.splitlines(), out.splitlines()):
        cleaned = after if after == before else re.sub(r"[ \t]{2,}", " ", after).strip()
        if before.strip() and not re.search(r"\w", LIST_MARK.sub("", cleaned + " ")):
            continue  # the line was the answer
        lines.append(cleaned)
    left = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return left if len(left.split()) >= MIN_LEFT_WORDS else None


def answer_absent(context: str, question: str, answer: str, max_overlap: float) -> bool:
    """Whether `context` no longer states `answer`. An answer with numbers the question does not repeat
    (amounts, times, extensions: the facts themselves) is absent when none of them occurs; one without
    is absent when at most `max_overlap` of its content words that the question does not use occur.
    An answer that only restates its question cannot be checked and counts as present."""
    asked = set(content_words(question))
    numbers = {n for n in _NUMBER.findall(answer) if n not in _NUMBER.findall(question)}
    if numbers:
        return not any(re.search(rf"(?<![\d.,:/]){re.escape(n)}(?![\d]|[.,:/]\d)", context) for n in numbers)
    words = {w for w in content_words(answer) if w not in asked and not w.isdigit()}
    if len(words) < 2:
        return False
    return len(words & set(content_words(context))) / len(words) <= max_overlap


def on_topic_context(text: str, question: str, answer: str, max_overlap: float, *,
                     kind: str | None = None) -> str | None:
    """`text` with `answer` removed, if the answer is then really absent (else None). `kind` is the
    pair's type: an overview pair loses its whole section, an FAQ pair its whole entry
    (`remove_answer`)."""
    left = remove_answer(text, answer, whole_section=kind == "overview", faq=kind == "faq")
    if left is None or not answer_absent(left, question, answer, max_overlap):
        return None
    return left


def build_on_topic(pairs: list[dict], chunk_by_id: dict[str, dict], n: int, *, max_overlap: float,
                   rng: random.Random, exclude: set[str] = frozenset()) -> list[tuple[dict, dict]]:
    """Up to `n` (pair, ablated chunk) on-topic negatives, at most one per chunk while others remain,
    pairs in `exclude` (ids) left out. The ablated chunk is the chunk dict with the answer removed."""
    if n <= 0:
        return []
    order = [p for p in pairs if p["id"] not in exclude]
    rng.shuffle(order)
    out, used_chunks = [], set()
    for second_round in (False, True):
        for pair in order:
            if len(out) >= n:
                return out
            if (pair["chunk_id"] in used_chunks) != second_round or any(p is pair for p, _ in out):
                continue
            chunk = chunk_by_id[pair["chunk_id"]]
            left = on_topic_context(chunk["text"], pair["question"], pair["answer"], max_overlap,
                                    kind=pair.get("type"))
            if left is not None:
                out.append((pair, {**chunk, "text": left}))
                used_chunks.add(chunk["id"])
    return out


def pick_distractors(chunks: list[dict], exclude_docs: set[str], k: int, rng: random.Random,
                     question: str | None = None, max_overlap: float = 1.0) -> list[dict]:
    """`k` chunks of the split from documents not in `exclude_docs` (fewer when there are not enough).

    With `question` (an unanswerable item), chunks that might answer it (overlap > `max_overlap`)
    are left out.
    """
    others = [c for c in chunks if c["doc_id"] not in exclude_docs
              and (question is None or overlap(question, c["text"]) <= max_overlap)]
    return rng.sample(others, min(k, len(others)))


def with_distractors(chunk: dict, distractors: list[dict], rng: random.Random, max_tokens: int) -> list[dict]:
    """The gold chunk and the distractors that fit `max_tokens` (chunk `n_tokens` summed), in random order."""
    contexts, total = [chunk], chunk.get("n_tokens", 0)
    for extra in distractors:
        if total + extra.get("n_tokens", 0) <= max_tokens:
            contexts.append(extra)
            total += extra.get("n_tokens", 0)
    rng.shuffle(contexts)
    return contexts
