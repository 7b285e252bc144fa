"""The chunker: size bound, separator order, overlap, no loss, small-section merging."""

from __future__ import annotations

import re

import pytest

from sovllm.ingest.chunk import chunk_document, chunk_section
from sovllm.ingest.document import Section

SENTENCE = "The rotation of key {i} happens every {i} days for the Tunnelwerk gateway."


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def paragraphs(tokenizer, target_tokens, count, start=0):
    """`count` paragraphs of roughly `target_tokens` tokens each, all different."""
    out = []
    for p in range(count):
        sentences, i = [], 0
        while n_tokens(tokenizer, " ".join(sentences)) < target_tokens:
            sentences.append(SENTENCE.format(i=start + p * 1000 + i))
            i += 1
        out.append(" ".join(sentences[:-1] or sentences))
    return out


def words(text):
    return re.findall(r"\S+", text)


def test_chunks_respect_size_and_are_never_empty(tokenizer):
    text = "\n\n".join(paragraphs(tokenizer, 150, 12))
    chunks = chunk_document([Section(text, ["A"])], tokenizer, size=128, overlap=16)
    assert len(chunks) > 12
    for chunk in chunks:
        assert chunk.text.strip() and chunk.n_tokens == n_tokens(tokenizer, chunk.text) <= 128
        assert chunk.heading_path == ["A"]


def test_paragraph_boundaries_win_over_finer_ones(tokenizer):
    paras = paragraphs(tokenizer, 50, 6)
    chunks = chunk_section(Section("\n\n".join(paras), []), tokenizer, size=128, overlap=0)
    # Every chunk is a run of whole paragraphs: no paragraph is cut when whole ones fit.
    for chunk in chunks:
        assert all(p in paras for p in chunk.text.split("\n\n"))
    assert "\n\n".join(c.text for c in chunks) == "\n\n".join(paras)


def test_falls_back_to_sentences_words_and_tokens(tokenizer):
    long_paragraph = paragraphs(tokenizer, 400, 1)[0]
    chunks = chunk_section(Section(long_paragraph, []), tokenizer, size=64, overlap=0)
    assert all(c.text.endswith(".") for c in chunks[:-1])  # cut at sentence ends
    assert " ".join(c.text for c in chunks) == long_paragraph
    one_word = "x" * 3000  # no separator at all: raw token windows
    chunks = chunk_document([Section(one_word, [])], tokenizer, size=64, overlap=0)
    assert "".join(c.text for c in chunks) == one_word and all(c.n_tokens <= 64 for c in chunks)


def test_overlap_repeats_the_end_of_the_previous_chunk(tokenizer):
    text = "\n\n".join(paragraphs(tokenizer, 90, 6))
    chunks = chunk_section(Section(text, []), tokenizer, size=128, overlap=24)
    assert len(chunks) >= 4
    for previous, current in zip(chunks, chunks[1:]):
        shared = 0
        prev_words, cur_words = words(previous.text), words(current.text)
        for k in range(1, min(len(prev_words), len(cur_words)) + 1):
            if prev_words[-k:] == cur_words[:k]:
                shared = k
        assert shared > 0, "no overlap"
        overlap_text = " ".join(cur_words[:shared])
        assert n_tokens(tokenizer, overlap_text) <= 24 + 2


def test_no_text_is_lost_with_overlap(tokenizer):
    text = "\n\n".join(paragraphs(tokenizer, 120, 5))
    chunks = chunk_section(Section(text, []), tokenizer, size=100, overlap=20)
    remaining = words(text)
    for chunk in chunks:  # each chunk continues where the text left off (after its overlap)
        cw = words(chunk.text)
        start = next(i for i in range(len(cw)) if cw[i:] == remaining[: len(cw) - i])
        remaining = remaining[len(cw) - start:]
    assert remaining == []


def test_small_sections_merge_under_their_common_heading(tokenizer):
    sections = [
        Section("Keys are blue and grey.", ["Security", "Keys"]),
        Section("VPN disconnects after 9 hours.", ["Security", "VPN"]),
        Section("\n\n".join(paragraphs(tokenizer, 100, 3)), ["Travel"]),
    ]
    chunks = chunk_document(sections, tokenizer, size=128, overlap=0)
    assert chunks[0].heading_path == ["Security"]
    assert chunks[0].text == "Keys\nKeys are blue and grey.\n\nVPN\nVPN disconnects after 9 hours."
    assert all(c.heading_path == ["Travel"] for c in chunks[1:])


def test_pages_follow_the_chunk_start(tokenizer):
    paras = paragraphs(tokenizer, 100, 4)
    text = "\n\n".join(paras)
    pages = [(0, 1), (text.index(paras[2]), 2)]
    chunks = chunk_section(Section(text, ["P"], pages), tokenizer, size=128, overlap=0)
    assert [c.page for c in chunks] == [1, 1, 2, 2]


def test_invalid_overlap_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="smaller than size"):
        chunk_document([Section("x", [])], tokenizer, size=64, overlap=64)


class CountingTokenizer:
    """The tokenizer, counting its calls: work measured without a clock."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


def test_merging_many_tiny_sections_is_linear(tokenizer):
    sections = [Section(f"word{i}", ["Guide", f"Part {i}"]) for i in range(2000)]
    counting = CountingTokenizer(tokenizer)
    chunks = chunk_document(sections, counting, size=512, overlap=16)
    # Once per section, once per distinct heading line, once per chunk. Re-estimating every merged
    # part at every merge cost ~45,000 calls here (quadratic in the sections per chunk).
    assert counting.calls <= 2 * len(sections) + 2 * len(chunks)
    text = "\n".join(chunk.text for chunk in chunks)
    assert all(f"Part {i}\nword{i}" in text for i in range(2000)) and len(chunks) < 100
