"""Word tokenising for sovllm's lexical checks: metrics, lexical support, grounding, dedup, BM25.

There is one word pattern, `\\w+` (letters, digits and underscores of any script), and every
check takes its words from `tokens`. The checks still differ where their figures depend on it, and
those differences are parameters or named functions here: reference metrics compare case-folded
runs as they are; the lexical support of the refusal calibration lower-cases (its document
frequencies are stored in adapters under those forms) and ignores one-character words; content
words (grounding, overlap, BM25, duplicate questions) are case-folded, split at underscores and
drop stop words and short words; dedup shingles add bigrams. Nothing here imports from sovllm.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")

STOPWORDS = frozenset("""
a an and are as at be been being but by can could did do does for from had has have how if in into is it its
may might must not of on or our shall should so such than that the their them then there these they this those
to was were what when where which who whom why will with would you your also any all each more most other some
only very just about after before between both during over under again further once same own too here
der die das den dem des ein eine einer eines einem einen und oder aber im in ist sind war waren wird werden
wurde wurden hat haben hatte hatten auf aus bei mit nach von vor zu zum zur für über unter durch gegen ohne um
als auch wie wenn dass ob nicht noch nur schon sehr so sich sie er es wir ihr ihre ihren ihrem ihres sein seine
kann können muss müssen soll sollen darf dürfen diese dieser dieses diesem diesen jede jeder jedes jedem jeden
was wer wo wann warum welche welcher welches welchem welchen man hier dort dann denn doch bis seit beim vom ins
""".split())


def tokens(text: str, *, casefold: bool = True, underscores: bool = True) -> list[str]:
    """Word tokens in order: runs of letters, digits and underscores of the case-folded text.

    `casefold=False` lower-cases instead (they differ for a few letters, e.g. "ß" folds to "ss");
    `underscores=False` splits runs at underscores, so only letters and digits remain."""
    found = _WORD.findall(text.casefold() if casefold else text.lower())
    if underscores:
        return found
    return [part for run in found for part in run.split("_") if part]


def support_words(text: str) -> set[str]:
    """Distinct lower-cased words of two or more characters (the lexical-support vocabulary)."""
    return {w for w in tokens(text, casefold=False) if len(w) > 1}


def content_words(text: str) -> list[str]:
    """Case-folded words that carry content: numbers, and words of 3+ letters that are not stopwords."""
    return [w for w in tokens(text, underscores=False) if w.isdigit() or (len(w) >= 3 and w not in STOPWORDS)]


def coverage(part: str, whole: str, *, empty: float) -> float:
    """Share of `part`'s distinct content words that occur in `whole`; `empty` when it has none."""
    words = set(content_words(part))
    if not words:
        return empty
    return len(words & set(content_words(whole))) / len(words)


def norm_question(question: str) -> str:
    """A question's letters-and-digits words, case-folded, one space apart: the key duplicates share."""
    return " ".join(tokens(question, underscores=False))


def shingles(question: str) -> set[str]:
    """A question's content words (a plural -s folded) and their bigrams, for near-duplicate search."""
    words = [w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w for w in content_words(question)]
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def dns_name(text: str) -> str:
    """`text` as a Kubernetes object name part: lower-case alphanumerics and dashes, at most 40 characters."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return (out or "sovllm")[:40].rstrip("-")
