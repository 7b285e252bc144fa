"""Rule flags and deduplication on hand-written pairs, including ones that must be kept."""

from __future__ import annotations

import pytest

from sovllm.config import CurateSection, DedupSection
from sovllm.curate.dedup import find_duplicates
from sovllm.curate.rules import flags_for

CHUNK_EN = {"id": "d1-00000", "doc_id": "d1", "lang": "en", "heading_path": ["Backups"],
            "text": "Customer database backups are kept for 35 days in the Frankfurt region. Restores need the "
                    "approval of the data owner and take about forty minutes for a standard tenant."}
CHUNK_DE = {"id": "d2-00000", "doc_id": "d2", "lang": "de", "heading_path": ["Reisekosten"],
            "text": "Bahnfahrten werden in der zweiten Klasse erstattet. Ab einer Fahrzeit von vier Stunden "
                    "darf die erste Klasse gebucht werden, wenn die Führungskraft vorher zustimmt."}
SECTION = CurateSection()


def flags(question: str, answer: str, chunk=CHUNK_EN) -> list[str]:
    return flags_for({"question": question, "answer": answer}, chunk, SECTION, ("en", "de"))


@pytest.mark.parametrize("question, answer", [
    ("How long are customer database backups kept?", "Customer database backups are kept for 35 days."),
    ("Who has to approve a restore?", "Restores need the approval of the data owner."),
    # mentions "text" as a word inside a compound noun and names the region: still fine
    ("Where are the backups of customer databases stored?", "They are kept in the Frankfurt region."),
])
def test_good_english_pairs_have_no_flags(question, answer):
    assert flags(question, answer) == []


def test_good_german_pair_has_no_flags():
    assert flags("Wann darf man erste Klasse fahren?",
                 "Ab einer Fahrzeit von vier Stunden darf die erste Klasse gebucht werden, wenn die Führungskraft "
                 "vorher zustimmt.", CHUNK_DE) == []


@pytest.mark.parametrize("question, answer, flag", [
    ("", "Customer database backups are kept for 35 days.", "empty"),
    ("How long are backups kept?", "   ", "empty"),
    ("Backups?", "Customer database backups are kept for 35 days.", "too_short"),
    ("How long are customer database backups kept?", "35.", "too_short"),
    ("How long are customer database backups kept?", "Kept for 35 days. " * 40, "too_long"),
    ("What does the text say?", "Customer database backups are kept for 35 days.", "generic_question"),
    ("Can you summarise this section about backups?", "Backups are kept for 35 days in Frankfurt.", "generic_question"),
    ("What is it?", "Customer database backups are kept for 35 days.", "generic_question"),
    ("How long are customer database backups kept?", "According to the context, backups are kept for 35 days.",
     "mentions_context"),
    ("How long are customer database backups kept?", "The text says that backups are kept for 35 days.",
     "mentions_context"),
    ("How long are customer database backups kept?", "As an AI, I think backups are kept for 35 days.",
     "assistant_speak"),
    ("How long are customer database backups kept?", "Sure! Backups are kept for 35 days in Frankfurt.",
     "assistant_speak"),
    ("Wie lange werden die Sicherungen der Kundendatenbanken aufbewahrt?",
     "Die Sicherungen der Kundendatenbanken werden 35 Tage lang in Frankfurt aufbewahrt.", "wrong_language"),
    ("Restores need the approval of the data owner and take about forty minutes?",
     "About forty minutes for a standard tenant.", "copied_question"),
])
def test_each_rule_flags_its_case(question, answer, flag):
    assert flag in flags(question, answer)


def test_short_text_is_not_judged_for_language():
    # too few words to identify a language reliably: never flagged
    assert "wrong_language" not in flags("Wie lange?", "35 Tage.")


def test_chunk_language_und_is_never_wrong():
    assert "wrong_language" not in flags("Wie lange werden die Sicherungen der Kundendatenbanken aufbewahrt?",
                                         "Die Sicherungen werden 35 Tage lang in Frankfurt aufbewahrt.",
                                         {**CHUNK_EN, "lang": "und"})


def _pairs(*questions):
    return [{"id": f"p{i}", "chunk_id": f"c{i % 2}", "question": q, "answer": "x"} for i, q in enumerate(questions)]


def test_exact_duplicates_across_chunks_keep_the_best():
    pairs = _pairs("How long are backups kept?", "how long are backups kept", "Who approves restores?")
    rank = {"p0": 1, "p1": 0, "p2": 0}
    dropped = find_duplicates(pairs, DedupSection(), rank=lambda p: (rank[p["id"]],))
    assert set(dropped) == {"p0"}
    assert dropped["p0"].kind == "duplicate" and dropped["p0"].keeper == "p1"


def test_near_duplicates_form_one_cluster_and_distinct_questions_survive():
    pairs = _pairs(
        "What is the backup retention period for customer data?",
        "What is the retention period for customer data backups?",
        "What is the retention period of backups for customer data?",
        "Who approves a restore of customer data?",
        "What is the retention period for invoices?",
    )
    by_length = lambda p: (len(p["question"]),)  # noqa: E731
    dropped = find_duplicates(pairs, DedupSection(), rank=by_length)
    # p0/p1 share 8 of 10 shingles (0.8); p2 shares 7 of 11 with each (0.64), under the default 0.7
    assert {i: (d.kind, d.keeper) for i, d in dropped.items()} == {"p1": ("near_duplicate", "p0")}
    looser = find_duplicates(pairs, DedupSection(threshold=0.6), rank=by_length)
    assert {i: d.keeper for i, d in looser.items()} == {"p1": "p0", "p2": "p0"}  # one cluster, the shortest kept


def test_dedup_switches_off():
    pairs = _pairs("How long are backups kept?", "how long are backups kept")
    assert find_duplicates(pairs, DedupSection(exact=False, near=False), rank=lambda p: (0,)) == {}


def test_template_questions_are_not_near_duplicates():
    pairs = _pairs("What is the purpose of the Hafen ticket system?", "What is the purpose of the Tourbook module?")
    assert find_duplicates(pairs, DedupSection(), rank=lambda p: (0,)) == {}


def test_faq_question_quoted_from_the_chunk_is_not_a_copy():
    chunk = {**CHUNK_EN, "text": "How long are customer database backups kept?\n" + CHUNK_EN["text"]}
    pair = {"question": "How long are customer database backups kept?",
            "answer": "Customer database backups are kept for 35 days in the Frankfurt region."}
    assert "copied_question" in flags_for(pair, chunk, SECTION)
    mined = {**pair, "generator": {"model": None, "endpoint": None, "method": "faq"}}
    assert flags_for(mined, chunk, SECTION) == []
