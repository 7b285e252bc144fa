"""Lexical support: how much of a question's wording occurs in the context it is asked about.

A small model separates answerable from unanswerable questions only partly by its own refusal
margin (docs/experiments/2026-12-05-refusal-calibration.md). A question asked about a context that never mentions its
key words ("What is a Tenant Admin?" about an incident runbook) is the typical unanswerable case,
and that is cheap to measure: the share of the question's words that occur in the context, each word
weighted by its inverse document frequency in the training contexts (a word in every chunk -
"the", "Acme" - carries no evidence; a rare name or number carries much). The refusal calibration
(`sovllm.models.adapter.RefusalCalibration`) combines this support, and the same share within the
context's best single line (`line_support`), with the adapter's own margin.

Questions and contexts come from user turns in the training prompt format (`sovllm.models.prompt`);
words are `sovllm.text.support_words`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from sovllm.text import support_words


@dataclass
class Vocabulary:
    """Document frequencies of words over a set of contexts (the training contexts)."""

    documents: int
    df: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_contexts(cls, contexts: Iterable[str]) -> Vocabulary:
        unique = set(contexts)
        counts = Counter(w for text in unique for w in support_words(text))
        return cls(len(unique), dict(sorted(counts.items())))

    def idf(self, word: str) -> float:
        """log((N + 1) / (df + 1)): 0 for a word in every context, largest for an unseen one."""
        return math.log((self.documents + 1) / (self.df.get(word, 0) + 1))

    def support(self, context: str, question: str) -> float:
        """IDF-weighted share of the question's words found in the context, in [0, 1].

        1.0 when the question has no informative word (nothing to check: no evidence either way)."""
        return self.supports(context, question)[0]

    def line_support(self, context: str, question: str) -> float:
        """The same share within the context's best single line, in [0, 1].

        An answerable question's words tend to meet in the line that answers it; an on-topic
        unanswerable one ("Which coffee brand?" next to the canteen's opening hours) finds its words
        spread over the section, with no line holding most of them. 1.0 when the question has no
        informative word, 0.0 for an empty context."""
        return self.supports(context, question)[1]

    def supports(self, context: str, question: str) -> tuple[float, float]:
        """(support, line support) of the question in the context, the question's words weighed once."""
        weights = {w: self.idf(w) for w in support_words(question)}
        total = sum(weights.values())
        if total <= 0:
            return 1.0, 1.0

        def share(text: str) -> float:
            present = support_words(text)
            return sum(v for w, v in weights.items() if w in present) / total

        return share(context), max((share(line) for line in context.splitlines() if line.strip()), default=0.0)
