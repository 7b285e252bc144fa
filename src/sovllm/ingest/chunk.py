"""Structure-aware, token-based recursive chunking in linear time.

Each section is tokenised once with character offsets. Token counts of any character span then
come from a binary search over token start offsets, so the chunker never re-tokenises a growing
text (the tutorial's chunker did, and was quadratic in the length of a document). A section that
is too long is split on paragraphs, then lines, sentences, words and finally raw tokens; pieces
are merged greedily up to the budget; each chunk after the first in a section starts with about
`overlap` tokens of the previous one, cut at a word boundary. Small neighbouring sections are
merged into one chunk under their common heading path, with the inner headings kept as lines.
Finally every chunk is re-tokenised (bounded work per chunk) for its exact `n_tokens`, and a
chunk that boundary effects pushed over the size is split on tokens.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from sovllm.ingest.document import Section

# Separators from coarse to fine; each is a regex whose matches are the places to cut.
_LEVELS = [
    re.compile(r"\n\s*\n"),  # paragraphs
    re.compile(r"\n"),  # lines
    re.compile(r"(?<=[.!?;:])\s+(?=\S)"),  # sentences
    re.compile(r"\s+"),  # words
]


@dataclass
class Chunk:
    text: str
    heading_path: list[str]
    page: int | None
    n_tokens: int
    whole_section: bool = False
    # (heading path, body, tokens) of each whole section merged into this chunk
    parts: list[tuple[list[str], str, int]] = field(default_factory=list)


class _Counter:
    """Token counts of character spans of one text, from a single tokenisation."""

    def __init__(self, tokenizer, text: str):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.starts = [start for start, _ in encoding["offset_mapping"]]
        self.ends = [end for _, end in encoding["offset_mapping"]]

    def count(self, a: int, b: int) -> int:
        return bisect.bisect_left(self.starts, b) - bisect.bisect_left(self.starts, a)

    def offset_back(self, end: int, n_tokens: int) -> int:
        """Character offset where the last `n_tokens` tokens before `end` begin."""
        i = bisect.bisect_left(self.starts, end) - n_tokens
        return self.starts[max(i, 0)] if self.starts else 0

    def token_spans(self, a: int, b: int, size: int) -> list[tuple[int, int]]:
        lo, hi = bisect.bisect_left(self.starts, a), bisect.bisect_left(self.starts, b)
        spans = []
        for i in range(lo, hi, size):
            j = min(i + size, hi)
            spans.append((max(self.starts[i], a), b if j == hi else self.starts[j]))
        return spans


def _split(text: str, counter: _Counter, a: int, b: int, budget: int, level: int = 0) -> list[tuple[int, int]]:
    """Character spans covering [a, b), each within `budget` tokens, cut at the coarsest separators."""
    if counter.count(a, b) <= budget:
        return [(a, b)]
    if level >= len(_LEVELS):
        return counter.token_spans(a, b, budget)
    cuts = [m.end() for m in _LEVELS[level].finditer(text, a, b)]
    pieces, start = [], a
    for cut in cuts:
        if cut > start:
            pieces.append((start, cut))
            start = cut
    if start < b:
        pieces.append((start, b))
    if len(pieces) <= 1:
        return _split(text, counter, a, b, budget, level + 1)
    spans: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for piece in pieces:
        if not text[piece[0]:piece[1]].strip():
            if current:  # separators stay with the text before them; never a chunk of their own
                current = (current[0], piece[1])
            continue
        if counter.count(*piece) > budget:
            if current:
                spans.append(current)
                current = None
            spans.extend(_split(text, counter, piece[0], piece[1], budget, level + 1))
        elif current and counter.count(current[0], piece[1]) <= budget:
            current = (current[0], piece[1])
        else:
            if current:
                spans.append(current)
            current = piece
    if current:
        spans.append(current)
    return spans


def _word_start(text: str, offset: int, limit: int) -> int:
    """Move `offset` forward to the start of a word (never past `limit`)."""
    if offset <= 0 or text[offset - 1].isspace():
        return offset
    match = re.compile(r"\s+").search(text, offset, limit)
    return match.end() if match else offset


def chunk_section(section: Section, tokenizer, size: int, overlap: int) -> list[Chunk]:
    """Chunks of one section: each ≤ `size` tokens, with ~`overlap` tokens carried over."""
    text = section.text
    counter = _Counter(tokenizer, text)
    total = counter.count(0, len(text))
    if total <= size:
        body = text.strip()
        return [Chunk(body, section.heading_path, section.page_at(0), total, True,
                      [(section.heading_path, body, total)])] if body else []
    spans = _split(text, counter, 0, len(text), size - overlap)
    chunks = []
    spans = [(a, b) for a, b in spans if text[a:b].strip()]
    for index, (a, b) in enumerate(spans):
        start = a
        if index and overlap:
            start = _word_start(text, counter.offset_back(a, overlap), a)
        body = text[start:b].strip()
        if body:
            chunks.append(Chunk(body, section.heading_path, section.page_at(a), counter.count(start, b)))
    return chunks


def _shared(prefix: list[str], path: list[str]) -> int:
    """Length of the common prefix of two heading paths."""
    n = 0
    while n < min(len(prefix), len(path)) and prefix[n] == path[n]:
        n += 1
    return n


def _merged_text(parts: list[tuple[list[str], str, int]], prefix: list[str]) -> str:
    blocks = []
    for path, body, _ in parts:
        inner = path[len(prefix):]
        blocks.append(("\n".join(inner) + "\n" + body) if inner else body)
    return "\n\n".join(blocks)


class _Run:
    """A run of whole sections being merged into one chunk, with its size estimate kept current.

    Adding a section costs O(1) tokeniser calls: heading lines are tokenised once each (cached),
    and the inner-heading total is recomputed only when the common prefix shrinks, which happens
    at most once per heading level. (Recomputing everything per added section was quadratic in
    the number of sections per chunk: slow for documents made of many tiny sections.)
    """

    def __init__(self, chunk: Chunk, heading_tokens):
        self.first = chunk
        self.parts = list(chunk.parts)
        self.prefix = list(chunk.heading_path)
        for path, _, _ in self.parts:
            self.prefix = self.prefix[:_shared(self.prefix, path)]
        self.base = sum(n for _, _, n in self.parts) + 2 * len(self.parts)
        self.heading_tokens = heading_tokens
        self.headings = sum(heading_tokens(path, len(self.prefix)) for path, _, _ in self.parts)

    def try_add(self, chunk: Chunk, size: int) -> bool:
        prefix = self.prefix
        for path, _, _ in chunk.parts:
            prefix = prefix[:_shared(prefix, path)]
        base = self.base + sum(n for _, _, n in chunk.parts) + 2 * len(chunk.parts)
        if len(prefix) == len(self.prefix):
            headings = self.headings + sum(self.heading_tokens(p, len(prefix)) for p, _, _ in chunk.parts)
        else:
            headings = sum(self.heading_tokens(p, len(prefix)) for p, _, _ in self.parts + chunk.parts)
        if base + headings > size:
            return False
        self.parts.extend(chunk.parts)
        self.prefix, self.base, self.headings = prefix, base, headings
        return True

    def chunk(self) -> Chunk:
        if len(self.parts) == 1:
            return self.first
        return Chunk(_merged_text(self.parts, self.prefix), self.prefix, self.first.page,
                     self.base + self.headings, True, self.parts)


def merge_small_sections(chunks: list[Chunk], tokenizer, size: int) -> list[Chunk]:
    """Merge runs of whole, small sections into one chunk under their common heading path.

    The merged size is estimated from the parts' token counts plus their inner heading lines
    (no re-tokenising of the growing text); `chunk_document` measures the result exactly.
    """
    cache: dict[str, int] = {}

    def heading_tokens(path: list[str], prefix_len: int) -> int:
        inner = path[prefix_len:]
        if not inner:
            return 0
        key = "\n".join(inner)
        if key not in cache:
            cache[key] = len(tokenizer(key, add_special_tokens=False)["input_ids"]) + 1
        return cache[key]

    merged: list[Chunk] = []
    run: _Run | None = None
    for chunk in chunks:
        if run is not None and chunk.whole_section and run.try_add(chunk, size):
            continue
        if run is not None:
            merged.append(run.chunk())
            run = None
        if chunk.whole_section:
            run = _Run(chunk, heading_tokens)
        else:
            merged.append(chunk)
    if run is not None:
        merged.append(run.chunk())
    return merged


def chunk_document(sections: list[Section], tokenizer, size: int = 512, overlap: int = 64) -> list[Chunk]:
    """All chunks of a document, in order, each with its exact token count (never empty)."""
    if not 0 <= overlap < size:
        raise ValueError(f"overlap ({overlap}) must be >= 0 and smaller than size ({size})")
    chunks: list[Chunk] = []
    for section in sections:
        chunks.extend(chunk_section(section, tokenizer, size, overlap))
    chunks = merge_small_sections(chunks, tokenizer, size)
    exact: list[Chunk] = []
    for chunk in chunks:
        n = len(tokenizer(chunk.text, add_special_tokens=False)["input_ids"])
        if n <= size:
            chunk.n_tokens = n
            exact.append(chunk)
            continue
        # Token boundaries at a cut can differ from the whole-text tokenisation; split on tokens.
        counter = _Counter(tokenizer, chunk.text)
        for a, b in counter.token_spans(0, len(chunk.text), size):
            body = chunk.text[a:b].strip()
            if body:
                n = len(tokenizer(body, add_special_tokens=False)["input_ids"])
                exact.append(Chunk(body, chunk.heading_path, chunk.page, n))
    return exact
