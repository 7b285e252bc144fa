"""Lexical support: how much of a question's wording occurs in the context it is asked about.

A small model separates answerable from unanswerable questions only partly by its own refusal
margin (docs/eval.md, "Lexical support"). A question asked about a context that never mentions its
key words ("What is a Tenant Admin?" about an incident runbook) is the typical unanswerable case,
and that is cheap to measure: the share of the question's words that occur in the context, each word
weighted by its inverse document frequency in the training contexts (a word in every chunk -
"the", "Acme" - carries no evidence; a rare name or number carries much). The refusal calibration
(`sovllm.models.adapter.RefusalCalibration`) combines this support with the adapter's own margin.

The user turn has the format training used (`sovllm.curate.records.user_message`):
"Context:\\n\\n<chunks>\\n\\nQuestion: <question>". `split_user_message` reads it back; any other
text is not in that format and gets no support value.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

CONTEXT_HEAD = "Context:\n\n"
QUESTION_HEAD = "\n\nQuestion: "
_WORD = re.compile(r"\w+")


def split_user_message(content: str | None) -> tuple[str, str] | None:
    """(context, question) of a user turn in the training format, else None."""
    if not isinstance(content, str) or not content.startswith(CONTEXT_HEAD) or QUESTION_HEAD not in content:
        return None
    context, question = content[len(CONTEXT_HEAD):].rsplit(QUESTION_HEAD, 1)
    return context, question.strip()


def record_turn(record: dict) -> tuple[str, str] | None:
    """(context, question) of a train/val/eval record's last user turn, else None."""
    turns = [m.get("content") for m in record.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    return split_user_message(turns[-1] if turns else None)


def words(text: str) -> set[str]:
    """Lower-cased word forms of two or more characters (letters, digits; any script)."""
    return {w for w in _WORD.findall(text.lower()) if len(w) > 1}


@dataclass
class Vocabulary:
    """Document frequencies of words over a set of contexts (the training contexts)."""

    documents: int
    df: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_contexts(cls, contexts: Iterable[str]) -> Vocabulary:
        unique = set(contexts)
        counts = Counter(w for text in unique for w in words(text))
        return cls(len(unique), dict(sorted(counts.items())))

    def idf(self, word: str) -> float:
        """log((N + 1) / (df + 1)): 0 for a word in every context, largest for an unseen one."""
        return math.log((self.documents + 1) / (self.df.get(word, 0) + 1))

    def support(self, context: str, question: str) -> float:
        """IDF-weighted share of the question's words found in the context, in [0, 1].

        1.0 when the question has no informative word (nothing to check: no evidence either way)."""
        weights = {w: self.idf(w) for w in words(question)}
        total = sum(weights.values())
        if total <= 0:
            return 1.0
        present = words(context)
        return sum(v for w, v in weights.items() if w in present) / total
