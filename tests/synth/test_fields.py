"""Templated pairs from "Label: value" lines and table rows, and that curation keeps them."""

from __future__ import annotations

from sovllm.config import CurateSection
from sovllm.curate.dedup import find_duplicates
from sovllm.curate.rules import flags_for
from sovllm.synth.fields import field_pairs, table_pairs
from sovllm.synth.structure import structure_pairs
from tests.synth.test_structure import chunk

DE = chunk("""Pflichtfortbildungen
Pflichtfortbildungen finden während der Arbeitszeit statt und kosten nichts.

- Brandschutzunterweisung: jährlich, 45 Minuten, im Hörsaal Haus A
- Hygieneschulung: jährlich, als Online-Kurs im Lernportal
- Reanimationstraining: alle zwei Jahre, für Pflegekräfte

Besuchszeiten
| Bereich | Besuchszeit | Besucher je Patient |
| Allgemeinstationen (2A bis 4C) | täglich 14:00–19:00 Uhr | höchstens 2 |
| Geburtshilfe (Station 5A) | täglich 10:00–20:00 Uhr | höchstens 3 |
| Palliativstation (Station 6A) | jederzeit | keine Begrenzung |
""", lang="de", path=("Fort- und Weiterbildung",))

EN = chunk("""Maintained by: Site Reliability Engineering (SRE), Porto and Leipzig
Approved by: Tomasz Brzeski (CTO). This line runs on.

Two-person rule for controlled drugs
- Removal: two qualified staff members must be present
- Signatures: both sign the controlled drugs register
- Leftover amounts: discarded in front of the second person
- Declare the incident: run the command in Funkraum
- Disk encryption is mandatory: LUKS on Linux
- There are two profiles: tw-leipzig and tw-porto
- Status: open
""", path=("Incident Runbook",))


def test_label_lines_give_questions_naming_their_section_or_document():
    pairs = field_pairs(EN, 240)
    assert pairs[:3] == [
        {"question": "What is stated for “Maintained by” in the Incident Runbook?",
         "answer": "Maintained by: Site Reliability Engineering (SRE), Porto and Leipzig"},
        {"question": "What is stated for “Approved by” in the Incident Runbook?",
         "answer": "Approved by: Tomasz Brzeski (CTO)."},  # the value's first sentence
        {"question": "What is stated for “Removal” under “Two-person rule for controlled drugs”?",
         "answer": "Removal: two qualified staff members must be present"}]
    # clauses with a colon are not labels, and a bare one-word value says too little
    assert [p["answer"].split(":")[0] for p in pairs] == ["Maintained by", "Approved by", "Removal", "Signatures",
                                                         "Leftover amounts"]
    assert [p["question"] for p in field_pairs(DE, 240)][:2] == [
        "Was gilt für „Brandschutzunterweisung“ unter „Pflichtfortbildungen“?",
        "Was gilt für „Hygieneschulung“ unter „Pflichtfortbildungen“?"]


def test_a_label_twice_in_one_section_is_ambiguous_and_gives_nothing():
    twice = chunk("Contacts\n- Phone: extension 4400 (24/7)\n- Phone: extension 4401 (office hours)\n"
                  "Other\n- Phone: extension 4500 (weekends)", path=("Office Guide",))
    assert [p["answer"] for p in field_pairs(twice, 240)] == ["Phone: extension 4500 (weekends)"]


def test_table_rows_with_a_header_row_give_one_pair_each():
    assert table_pairs(DE, 240) == [
        {"question": "Was gilt für Bereich „Allgemeinstationen (2A bis 4C)“ unter „Besuchszeiten“?",
         "answer": "Besuchszeit: täglich 14:00–19:00 Uhr; Besucher je Patient: höchstens 2."},
        {"question": "Was gilt für Bereich „Geburtshilfe (Station 5A)“ unter „Besuchszeiten“?",
         "answer": "Besuchszeit: täglich 10:00–20:00 Uhr; Besucher je Patient: höchstens 3."},
        {"question": "Was gilt für Bereich „Palliativstation (Station 6A)“ unter „Besuchszeiten“?",
         "answer": "Besuchszeit: jederzeit; Besucher je Patient: keine Begrenzung."}]
    english = chunk("Data classes\n| Class | Storage allowed |\n| C1 Public | Anywhere at all |", path=("Policy",))
    assert table_pairs(english, 240)[0]["question"] == "What is stated for class “C1 Public” under “Data classes”?"


def test_no_table_pair_without_a_header_or_when_a_row_does_not_fit():
    cut = chunk("Fees\n| 2024 | 25 euros | first replacement |\n| 2025 | 40 euros | any further one |")
    assert table_pairs(cut, 240) == []  # a table cut by chunking: its first row is data, not a header
    assert table_pairs(DE, 65) == [table_pairs(DE, 240)[2]]  # only the short row fits


def test_templated_questions_survive_curation_rules_and_dedup():
    """Questions about one list or table differ only in their label: curation must still keep them all."""
    section = CurateSection()
    pairs = []
    for source in (DE, EN):
        for n, pair in enumerate(structure_pairs(source, ["faq", "overview", "field", "table"], 240)):
            pairs.append({**pair, "id": f"{source['lang']}-{n}", "chunk_id": source["id"],
                          "generator": {"method": pair["method"]}})
    assert {p["method"] for p in pairs} == {"overview", "field", "table"}
    for pair in pairs:
        assert flags_for(pair, DE if pair["id"].startswith("de") else EN, section, ("en", "de")) == [], pair
        pair["flags"] = []
    assert find_duplicates(pairs, section.dedup, lambda p: (0,)) == {}
