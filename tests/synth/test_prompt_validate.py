"""Prompt rendering and language choice; schema, grounding and question checks."""

from __future__ import annotations

import json

import jsonschema
import pytest

from sovllm.synth.prompt import PromptSet
from sovllm.synth.answers import candidates, rank_answers
from sovllm.synth.validate import (check_output, check_question, grounding_ratio, max_tokens_for, question_schema,
                                   schema_for)
from sovllm.text import content_words
from tests.synth.conftest import CHUNKS


def test_language_choice_and_heading_path_in_prompts():
    prompts = PromptSet()
    english, german = CHUNKS[0], CHUNKS[3]
    system, user = prompts.render(english, ["factual", "comparison"])
    assert system["role"] == "system" and "only facts" in system["content"]
    assert "Section: Policy > Part 0" in user["content"] and english["text"] in user["content"]
    assert "factual:" in user["content"] and "comparison:" in user["content"] and "conceptual:" not in user["content"]
    _, user_de = prompts.render(german, ["factual"])
    assert "Abschnitt: Policy > Part 3" in user_de["content"] and "auf Deutsch" in user_de["content"]
    question = prompts.render_question(german, "factual", "Die Sitzung endet nach 11 Stunden.")
    assert question == [{"role": "user", "content": "Formuliere diese Aussage als Frage, die sie beantwortet.\n"
                                                    "Aussage: „Die Sitzung endet nach 11 Stunden.“"}]
    french = {**english, "lang": "fr"}
    assert prompts.render(french, ["factual"])[1]["content"].startswith("Here is a section")


def test_project_override_changes_prompt_and_hash(tmp_path):
    (tmp_path / "question.en.j2").write_text("Ask about: {{ answer }}")
    default, custom = PromptSet(), PromptSet(tmp_path)
    assert custom.render_question(CHUNKS[0], "factual", "X y z.")[0]["content"] == "Ask about: X y z."
    assert custom.template_hash("en") != default.template_hash("en")
    assert custom.template_hash("de") == default.template_hash("de")


def test_content_words_and_grounding():
    assert content_words("The VPN drops after 9 hours, and the user must reconnect.") == \
        ["vpn", "drops", "9", "hours", "user", "reconnect"]
    context = CHUNKS[0]["text"]
    assert grounding_ratio("The Tunnelwerk session ends after 8 hours.", context) == 1.0
    assert grounding_ratio("Paris is the capital of France.", context) == 0.0
    assert grounding_ratio("the and of", context) == 0.0


def test_check_output_reasons():
    types = ["factual", "conceptual"]
    schema = schema_for(types, 120, 240)
    context = CHUNKS[0]["text"]
    good = {"question": "How long does a Tunnelwerk session last?", "answer": "A Tunnelwerk session ends after 8 hours."}
    ungrounded = {"question": "What is the capital of France now?", "answer": "Paris is the capital of France."}
    text = json.dumps({"factual": good, "conceptual": ungrounded})
    valid, failed = check_output(text, "stop", context, types, schema, 0.6, set())
    assert valid == {"factual": good} and failed == {"conceptual": "grounding"}
    twice = json.dumps({"factual": good, "conceptual": good})
    assert check_output(twice, "stop", context, types, schema, 0.6, set())[1] == {"conceptual": "duplicate"}
    assert check_output(text, "length", context, types, schema, 0.6, set())[1] == {t: "truncated" for t in types}
    assert check_output("not json", "stop", context, types, schema, 0.6, set())[1] == {t: "schema" for t in types}
    no_mark = json.dumps({"factual": {**good, "question": "Tell me about sessions"}, "conceptual": good})
    assert check_output(no_mark, "stop", context, types, schema, 0.6, set())[1] == {t: "schema" for t in types}


def test_question_schema_shapes():
    jsonschema.validate("How long does a session last?", question_schema(120, "en"))
    jsonschema.validate("Wie lange dauert eine Sitzung?", question_schema(120, "de"))
    for bad in ("Sessions last long.", "Tell me how long a session lasts?", "How long?\nWhy?", "x" * 200 + "?"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, question_schema(120, "en"))


def test_answer_candidates_and_ranking():
    text = ("Engineering\n| a | b | c |\n- Backups run at 01:30 CET every night in FRA-2.\napproved by: nobody\n"
            "Restores take longer than forty minutes while backups are fast. Staff must reconnect because the gateway drops. "
            "Is this a question here at all?")
    singles, pairs = candidates(text, 240)
    found = [c.text for c in singles + pairs]
    assert "Backups run at 01:30 CET every night in FRA-2." in found
    assert not any("|" in c for c in found) and "Engineering" not in found
    ranked = rank_answers(text, ["factual", "conceptual", "comparison"], 240)
    assert ranked["factual"][0] == "Backups run at 01:30 CET every night in FRA-2."
    assert ranked["conceptual"][0] == "Staff must reconnect because the gateway drops."
    assert ranked["comparison"][0] == "Restores take longer than forty minutes while backups are fast."
    assert all("?" not in c for values in ranked.values() for c in values)


@pytest.mark.parametrize("question,reason", [
    ("How long do backups run in FRA-2?", None),
    ("What is the answer to this question?", "generic"),
    ("How do I bake bread at home?", "off_topic"),
    ("When do backups run at 01:30 CET every night in FRA-2?", "copy"),
    ("When do backups run in FRA-2 every night, backups run in FRA-2 every night?", "rambling"),
])
def test_check_question(question, reason):
    assert check_question(question, "Backups run at 01:30 CET every night in FRA-2.", set()) == reason


def test_max_tokens_covers_the_schema():
    assert max_tokens_for(["factual"], 120, 240) >= 120 + 240
    assert max_tokens_for(["factual", "comparison"], 120, 240, ["short answer."]) < max_tokens_for(
        ["factual", "comparison"], 120, 240)


def test_sentences_are_not_split_after_abbreviations_or_german_day_numbers():
    from sovllm.synth.validate import split_sentences
    assert split_sentences("Die Liste erscheint bis zum 1. Dezember. Danach gilt sie z. B. für Leipzig.") == \
        ["Die Liste erscheint bis zum 1. Dezember.", "Danach gilt sie z. B. für Leipzig."]
    assert split_sentences("Escalate to the CEO's office (Dr. Anna Weber). Then stop. Plan A. Version 2. Done.") == \
        ["Escalate to the CEO's office (Dr. Anna Weber).", "Then stop.", "Plan A.", "Version 2.", "Done."]
