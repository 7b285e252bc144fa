"""Reference metrics, broken-answer checks and the judge's agreement figures, against hand-worked values
(the statistics helpers themselves are tested in tests/test_stats.py)."""

from __future__ import annotations

import pytest

from sovllm.evaluate.metrics import broken_kinds, is_refusal, repetition_loop, rouge_l, score, token_f1
from sovllm.evaluate.judge import agreement

REFUSAL = "The provided context does not contain enough information to answer this question."


def test_token_f1_hand_worked():
    # prediction tokens: the cat sat on mat (5); reference: the cat lay on the mat (6); common: the cat on mat = 4
    p, r = 4 / 5, 4 / 6
    assert token_f1("The cat sat on mat.", "the cat lay on the mat") == pytest.approx(2 * p * r / (p + r))
    assert token_f1("", "") == 1.0
    assert token_f1("something", "") == 0.0
    assert token_f1("Frist: 14 Tage", "14 Tage Frist") == 1.0  # bag of words, case-folded, digits count


def test_rouge_l_hand_worked():
    # LCS of "a b c d e" and "a x c y e" is "a c e" = 3 → P = R = 3/5
    assert rouge_l("a b c d e", "a x c y e") == pytest.approx(0.6)
    # order matters for ROUGE-L, not for token F1
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    assert token_f1("d c b a", "a b c d") == 1.0


def test_refusal_detection_tolerates_small_changes_but_not_an_answer():
    assert is_refusal(REFUSAL, REFUSAL)
    assert is_refusal("Sorry. " + REFUSAL.rstrip("."), REFUSAL)
    assert is_refusal("The provided context does not contain enough information to answer the question", REFUSAL)
    assert not is_refusal("Backups are kept for 35 days in Frankfurt.", REFUSAL)


def test_score_marks_right_and_wrong_refusals():
    refused = score(REFUSAL, "stop", reference=REFUSAL, answerable=False, refusal=REFUSAL, lang="en")
    assert refused["refused"] and refused["refusal_correct"] and refused["stopped"] and refused["broken"] == []
    false = score(REFUSAL, "stop", reference="Kept for 35 days.", answerable=True, refusal=REFUSAL, lang="en")
    assert false["refused"] and not false["refusal_correct"]


@pytest.mark.parametrize("text,finish,kinds", [
    ("", "stop", ["empty"]),
    ("   \n", "stop", ["whitespace_only"]),
    ("Backups are kept for 35", "length", ["hit_max_tokens"]),
    ("Kept for 35 days.<|im_start|>user", "stop", ["new_turn"]),
    ("Kept for 35 days.\nQuestion: and how long in Porto?", "stop", ["new_turn"]),
    ("the backup is kept the backup is kept the backup is kept", "stop", ["repetition_loop"]),
    ("Die Sicherungen werden fünfunddreißig Tage lang im Rechenzentrum Frankfurt aufbewahrt.", "stop",
     ["wrong_language"]),
    ("Backups are kept for 35 days in the Frankfurt region.", "stop", []),
])
def test_broken_answer_kinds(text, finish, kinds):
    assert broken_kinds(text, finish, "en", ("en", "de")) == kinds


def test_repetition_needs_three_occurrences_of_a_4gram():
    assert not repetition_loop("a b c d a b c d")
    assert repetition_loop("a b c d a b c d a b c d")


def test_agreement_with_and_without_ties_hand_worked():
    gold = ["1", "1", "2", "2", "tie", "tie", "1", "2"]
    judge = ["1", "2", "2", "tie", "tie", "1", "1", None]  # the last verdict failed
    a = agreement(gold, judge, kappa_min=0.4)
    assert a["judged"] == 7 and a["failed"] == 1
    # 7 judged: agreements at 0, 2, 4, 6 → 4/7
    assert a["percent_agreement"] == pytest.approx(4 / 7, abs=1e-4)
    # gold marginals 1:3 2:2 tie:2, judge 1:3 2:2 tie:2 → p_e = (9+4+4)/49 = 17/49
    assert a["kappa"] == pytest.approx((4 / 7 - 17 / 49) / (1 - 17 / 49), abs=1e-4)
    # without ties: items 0, 1, 2, 6 → agreements 0, 2, 6 = 3/4; marginals gold 1:3 2:1, judge 1:2 2:2
    assert a["items_without_ties"] == 4
    assert a["percent_agreement_without_ties"] == pytest.approx(0.75)
    assert a["kappa_without_ties"] == pytest.approx((0.75 - (3 * 2 + 1 * 2) / 16) / (1 - 0.5), abs=1e-4)
    assert a["reliable"] is False  # kappa ≈ 0.34 < 0.4
