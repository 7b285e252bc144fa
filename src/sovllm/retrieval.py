"""BM25 over chunks: hard negatives in curate, retrieved contexts in evaluation.

Okapi BM25 (k1 = 1.5, b = 0.75) with the same tokenisation as the rest of sovllm's text checks
(`sovllm.text.content_words`: case-folded, English and German stopwords removed). Small corpora
only: scores are computed exactly over every document for each query.
"""

from __future__ import annotations

import math
from collections import Counter

from sovllm.text import content_words


class BM25:
    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(content_words(t)) for t in texts]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg = sum(self.lengths) / max(len(self.docs), 1) or 1.0
        df: Counter = Counter()
        for d in self.docs:
            df.update(d.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def scores(self, query: str) -> list[float]:
        terms = set(content_words(query))
        out = []
        for doc, length in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg)
            out.append(sum(self.idf[t] * doc[t] * (self.k1 + 1) / (doc[t] + norm) for t in terms if t in doc))
        return out

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the k best-scoring documents (ties: lower index first)."""
        scores = self.scores(query)
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
