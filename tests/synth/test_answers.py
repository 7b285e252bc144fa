"""Extractive answer planning: which statements of a chunk the model is asked about, and in what order."""

from __future__ import annotations

from sovllm.synth.answers import candidates, plan, ranked

TYPES = ["factual", "conceptual", "comparison"]

# three sections; the first has the best candidates of every type, the later ones few
CHUNK = """Gateway facts
The Tunnelwerk gateway in FRA-2 serves 400 engineers from Leipzig and Porto. The Hafen queue SRE-7 takes 12 tickets a day.
Backups of ll-db-01 run at 01:30 CET and take 40 minutes. Restores in AMS-1 start at 02:00 CET for 9 tenants.
Engineers must reconnect after 8 hours because the gateway drops the tunnel.
Badge access
Badges must be renewed every year because the chip wears out.
Visitors
Visitors sign in at the reception desk while staff use the side door.
"""


def sections_of(slots, chunk=CHUNK):
    singles, pairs = candidates(chunk, 240)
    where = {c.text: c.section for c in singles + pairs}
    return [where[slot.answers[0]] for slot in slots]


def test_plan_takes_turns_over_types_and_spreads_over_sections():
    slots, starved = plan(CHUNK, TYPES, 4, 1, 240)
    assert [s.type for s in slots] == ["factual", "conceptual", "comparison", "factual"]
    # the first section's candidates rank best for every type; still each section gets a pick first
    assert sorted(sections_of(slots)[:3]) == [1, 2, 3] and starved == []
    assert slots[1].answers == ["Badges must be renewed every year because the chip wears out."]
    assert slots[2].answers == ["Visitors sign in at the reception desk while staff use the side door."]
    picked = [s.answers[0] for s in slots]
    assert len(set(picked)) == 4


def test_plan_is_bounded_and_its_fallbacks_are_disjoint():
    slots, _ = plan(CHUNK, TYPES, 2, 3, 240)
    assert len(slots) == 2 and all(1 <= len(s.answers) <= 3 for s in slots)
    answers = [a for s in slots for a in s.answers]
    assert len(answers) == len(set(answers))
    sentences = [part for s in slots for a in s.answers for part in a.split(". ")]
    assert len(sentences) == len(set(sentences))  # no sentence is tried twice, alone or in a pair
    assert plan(CHUNK, TYPES, 16, 1, 240)[0].__len__() <= 16


def test_a_type_without_candidates_is_reported_once():
    text = "The Tunnelwerk session ends after eight hours of use on every laptop."
    slots, starved = plan(text, TYPES, 4, 2, 240)
    assert [s.type for s in slots] == ["factual"] and starved == ["conceptual", "comparison"]
    assert plan("Short line\n| a | b |", TYPES, 4, 2, 240) == ([], TYPES)


def test_answers_a_structure_pair_already_has_are_not_planned():
    avoid = ["The Tunnelwerk gateway in FRA-2 serves 400 engineers from Leipzig and Porto. Other text."]
    found = [c.text for cs in ranked(CHUNK, TYPES, 240, avoid).values() for c in cs]
    assert not any("Tunnelwerk gateway" in text for text in found)
    assert any("Hafen queue" in text for text in found)


def test_a_list_with_its_lead_in_is_one_statement():
    text = ("Störungen melden\nBitte halten Sie beim Anruf bereit:\n\n- Station oder Bereich\n"
            "- Inventarnummer des Geräts\n- eine Rückrufnummer\n\nDanach ruft die Hotline innerhalb von 30 Minuten zurück.")
    singles, _ = candidates(text, 240)
    assert "Bitte halten Sie beim Anruf bereit: Station oder Bereich; Inventarnummer des Geräts; eine Rückrufnummer." \
        in [c.text for c in singles]
    # too long for one answer, items that are sentences or labelled fields, no lead-in: no list statement
    assert not [c for c in candidates(text, 80)[0] if "bereit:" in c.text]
    labelled = "The key rules:\n- Removal: two qualified staff members\n- Signatures: both sign the register"
    sentences = "Rules:\n- Staff must sign the register. Then they leave.\n- Nobody else signs it."
    no_lead = "The key is kept in the safe by the nurse.\n- red folder\n- green folder"
    for other in (labelled, sentences, no_lead):
        assert not [c for c in candidates(other, 240)[0] if ";" in c.text], other


def test_sentences_about_the_text_itself_are_no_answers():
    text = ("This page explains who may enter the medication room and what to do when a badge is lost. "
            "Diese Seite fasst zusammen, was für die Cafeteria und das Parkhaus gilt. "
            "The door logs of every medication room are kept for 24 months.")
    assert [c.text for c in candidates(text, 240)[0]] == ["The door logs of every medication room are kept for 24 months."]
