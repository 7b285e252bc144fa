"""The judge module: rubric data, verdict parsing, and grading against the real embedded server."""

from __future__ import annotations

import asyncio
import json

import pytest

from sovllm.curate.judge import QA_ABC, RUBRICS, Judge, Rubric, parse_verdict, register_rubric
from sovllm.endpoint import Endpoint


def test_rubric_is_data_and_registered():
    assert RUBRICS["qa-abc"] is QA_ABC and list(QA_ABC.ratings) == ["A", "B", "C"]
    system = QA_ABC.system_prompt()
    assert all(f"{r}: " in system for r in "ABC") and "Example:" in system
    messages = QA_ABC.messages("Backups run at 01:30.", "When do backups run?", "At 01:30.", reference="01:30")
    assert messages[0]["role"] == "system"
    assert "CHUNK:\nBackups run at 01:30." in messages[1]["content"] and "REFERENCE ANSWER: 01:30" in messages[1]["content"]
    custom = register_rubric(Rubric("pass-fail", "Grade it.", {"PASS": "good", "FAIL": "bad"}))
    assert RUBRICS["pass-fail"] is custom and custom.schema()["properties"]["rating"]["enum"] == ["PASS", "FAIL"]
    del RUBRICS["pass-fail"]


@pytest.mark.parametrize("text, finish, rating, error", [
    ('{"rating": "A", "hallucination": false, "reasoning": "Fine."}', "stop", "A", None),
    ('{"rating": "C", "hallucination": true, "reasoning": "Made up."}', "stop", "C", None),
    ('{"rating": "A", "hallucination": true, "reasoning": "Odd."}', "stop", "A", "inconsistent"),
    ('{"rating": "D", "hallucination": false, "reasoning": "x"}', "stop", None, "schema"),
    ('{"rating": "A", "hallucination": false}', "stop", None, "schema"),
    ('{"rating": "A", "hallu', "length", None, "truncated"),
    ("The answer is good.", "stop", None, "schema"),
])
def test_parse_verdict(text, finish, rating, error):
    verdict = parse_verdict(text, finish, QA_ABC)
    assert (verdict.rating, verdict.error) == (rating, error)


@pytest.mark.integration
def test_judge_grades_through_the_real_server(bundled_server):
    """Every verdict of the real bundled model is valid JSON of the rubric's schema (grammar-constrained)."""
    endpoint = Endpoint(bundled_server.base_url, bundled_server.served_name, None, True)
    chunk = ("Acme keeps customer database backups for 35 days in the Frankfurt region. A restore needs the "
             "written approval of the data owner.")
    items = [{"context": chunk, "question": "How long are customer database backups kept?",
              "answer": "They are kept for 35 days."},
             {"context": chunk, "question": "Who approves a restore?",
              "answer": "The CEO approves restores after a board vote in Dublin."}]
    verdicts, stats = asyncio.run(Judge(endpoint, QA_ABC, max_tokens=160, concurrency=2).grade_many(items))
    assert stats.graded == 2 and stats.failures.get("schema", 0) == 0 and stats.failures.get("truncated", 0) == 0
    assert all(v.rating in "ABC" and isinstance(v.hallucination, bool) and v.reasoning for v in verdicts)
    assert stats.prompt_tokens > 200 and stats.completion_tokens > 0
    json.dumps([v.as_dict() for v in verdicts])
