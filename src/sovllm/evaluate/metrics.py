"""Reference metrics for one answer: token F1, ROUGE-L, refusal, stop, and broken-answer checks.

Text is compared as case-folded word tokens (`sovllm.text.tokens`: `\\w+`, so German umlauts
and digits count as words) without stop-word removal, the way SQuAD-style token F1 is usually
computed. A refusal is an answer that contains the project's refusal sentence or overlaps it with
token F1 ≥ 0.7 (a model that drops the final full stop or adds "Sorry," still refuses). Broken
answers are counted by kind: empty, whitespace only, hit max_tokens, runs into a new turn
(`<|im_start|>` or a line starting with "Question:"), a repetition loop (one 4-gram three or more
times) and wrong language (confident language identification on six or more words).
"""

from __future__ import annotations

import re
from collections import Counter

from sovllm.curate.rules import wrong_language
from sovllm.text import tokens

_NEW_TURN = re.compile(r"<\|im_start\|>|<\|im_end\|>|(^|\n)\s*(question|frage|user|assistant)\s*:", re.IGNORECASE)
BROKEN_KINDS = ("empty", "whitespace_only", "hit_max_tokens", "new_turn", "repetition_loop", "wrong_language")
REFUSAL_F1 = 0.7
# the kinds of unanswerable item curate builds (meta.negative): the pair's own question on its chunk with
# the answer removed, and a question of another document
NEGATIVE_KINDS = ("on_topic", "foreign")


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of words); 1.0 when both are empty."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (β = 1) over word tokens: longest common subsequence."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_refusal(answer: str, refusal: str) -> bool:
    norm = " ".join(tokens(answer))
    target = " ".join(tokens(refusal))
    return bool(target) and (target in norm or token_f1(answer, refusal) >= REFUSAL_F1)


def repetition_loop(text: str, n: int = 4, times: int = 3) -> bool:
    words = tokens(text)
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def broken_kinds(text: str, finish_reason: str | None, lang: str | None, languages: tuple[str, ...] = ()) -> list[str]:
    """Every broken-answer kind that applies (empty list: a well-formed answer)."""
    if text == "":
        return ["empty"] + (["hit_max_tokens"] if finish_reason == "length" else [])
    kinds = []
    if not text.strip():
        kinds.append("whitespace_only")
    if finish_reason == "length":
        kinds.append("hit_max_tokens")
    if _NEW_TURN.search(text):
        kinds.append("new_turn")
    if repetition_loop(text):
        kinds.append("repetition_loop")
    if text.strip() and wrong_language(text, lang, languages):
        kinds.append("wrong_language")
    return kinds


def score(answer: str, finish_reason: str | None, *, reference: str, answerable: bool, refusal: str,
          lang: str | None, languages: tuple[str, ...] = ()) -> dict:
    """Every per-item reference metric of one answer."""
    refused = is_refusal(answer, refusal)
    return {
        "f1": token_f1(answer, reference),
        "rouge_l": rouge_l(answer, reference),
        "refused": refused,
        # an unanswerable item is right when it is refused; an answerable one when it is not
        "refusal_correct": refused if not answerable else not refused,
        "stopped": finish_reason == "stop",
        "broken": broken_kinds(answer, finish_reason, lang, languages),
    }
