"""Word tokenising: one pattern, and each lexical check's words exactly as it counted them before."""

from __future__ import annotations

import re

import pytest

from sovllm.text import STOPWORDS, content_words, coverage, norm_question, shingles, support_words, tokens

# underscores, digits, umlauts, letters whose case-folding differs from lower-casing (ß, ﬁ, final sigma),
# the dotted capital I, and punctuation between words
SAMPLES = [
    "The VPN drops after 9 hours, and the user must reconnect.",
    "Straße, STRASSE und Maß: die ﬁnale Größe ΟΔΟΣ.",
    "snake_case_name __init__ a_1 _x_ İstanbul x2 2x",
    "Wer genehmigt Urlaub? Die Teamleitung (z. B. in Porto) – bis 31.12.",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_each_check_gets_the_words_it_counted_before(text):
    # the tokenisers the checks had, each with its own pattern, as references
    assert tokens(text) == re.findall(r"\w+", text.casefold())  # metrics
    assert support_words(text) == {w for w in re.findall(r"\w+", text.lower()) if len(w) > 1}  # lexical support
    letters_digits = re.findall(r"[^\W_]+", text.casefold())  # synth validation, dedup, BM25
    assert tokens(text, underscores=False) == letters_digits
    assert norm_question(text) == " ".join(letters_digits)
    assert content_words(text) == [w for w in letters_digits if w.isdigit() or (len(w) >= 3 and w not in STOPWORDS)]


def test_the_differences_between_the_checks_are_kept():
    assert tokens("Maß_band") == ["mass_band"]
    assert tokens("Maß_band", casefold=False, underscores=False) == ["maß", "band"]
    assert support_words("I saw a Straße") == {"saw", "straße"}
    assert content_words("The VPN drops after 9 hours, and the user must reconnect.") == \
        ["vpn", "drops", "9", "hours", "user", "reconnect"]


def test_coverage_is_the_share_of_distinct_content_words_found():
    context = "The Tunnelwerk session ends after 8 hours."
    # "sessions" and "end" are not in the context ("after" is a stop word)
    assert coverage("Tunnelwerk sessions end after 8 hours", context, empty=0.0) == pytest.approx(3 / 5)
    assert coverage("the and of", context, empty=0.0) == 0.0
    assert coverage("the and of", context, empty=1.0) == 1.0


def test_shingles_fold_plurals_and_add_bigrams():
    assert shingles("What is the retention period of backups?") == {
        "retention", "period", "backup", "retention period", "period backup"}
    assert shingles("Which class is reimbursed?") == {"class", "reimbursed", "class reimbursed"}
