"""Language detection (py3langid, BSD) restricted to the languages a project expects.

Short texts (headings, tables of codes) are unreliable to classify, so a chunk with fewer than
`MIN_WORDS` words inherits its document's language.
"""

from __future__ import annotations

import re
from functools import lru_cache

MIN_WORDS = 25
_WORD = re.compile(r"[^\W\d_]{2,}")


@lru_cache(maxsize=4)
def _identifier(languages: tuple[str, ...]):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if languages:
        identifier.set_languages(list(languages))
    return identifier


def detect_language(text: str, languages: tuple[str, ...] = (), fallback: str = "und") -> str:
    """ISO 639-1 code of `text` among `languages` (all when empty); `fallback` for too little text."""
    if len(_WORD.findall(text[:20000])) < MIN_WORDS:
        return fallback
    return _identifier(tuple(languages)).classify(text[:20000])[0]


def classify_short(text: str, languages: tuple[str, ...] = ()) -> tuple[str, float]:
    """(language, probability) for a short text such as a question and its answer; no fallback."""
    return _identifier(tuple(languages)).classify(text[:20000])
