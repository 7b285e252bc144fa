"""The training prompt format: what curate writes is what training, calibration, serving and eval read."""

from __future__ import annotations

import pytest

from sovllm.config import PromptSection
from sovllm.models.chat import render
from sovllm.models.prompt import (heading, last_user_turn, prompt_before_question, record_turn, split_user_message,
                                  system_prompt, user_message, user_turn)
from sovllm.models.tiny import build_tiny_tokenizer

VPN = {"id": "it-0", "text": " The VPN client Tunnelwerk needs a FIDO2 key.\n", "heading_path": ["IT", "VPN"]}
LEAVE = {"id": "hr-0", "text": "Parental leave is requested eight weeks ahead.", "heading_path": [],
         "source": {"path": "hr/leave-policy.md"}}


def test_a_user_turn_reads_back_as_its_context_and_question():
    turn = user_message([VPN, LEAVE], "  Which key does the VPN client need? ")
    assert turn == ("Context:\n\n[1] IT > VPN\nThe VPN client Tunnelwerk needs a FIDO2 key.\n\n"
                    "[2] leave-policy.md\nParental leave is requested eight weeks ahead.\n\n"
                    "Question: Which key does the VPN client need?")
    context, question = split_user_message(turn)
    assert question == "Which key does the VPN client need?"
    assert user_turn(context, question) == turn  # what calibration rebuilds from a parsed turn


@pytest.mark.parametrize("content", [None, 42, "", "Hello", "Question: only a question",
                                     "Context:\n\nno question follows", "context:\n\nx\n\nQuestion: y?"])
def test_text_outside_the_format_has_no_context_or_question(content):
    assert split_user_message(content) is None


def test_a_question_inside_the_context_does_not_confuse_the_parse():
    chunk = {"text": "FAQ\n\nQuestion: How long?\nThirty days.", "heading_path": ["FAQ"]}
    context = "[1] FAQ\nFAQ\n\nQuestion: How long?\nThirty days."
    assert split_user_message(user_message([chunk], "How long?")) == (context, "How long?")


def test_headings_and_the_system_prompt():
    assert heading(VPN) == "IT > VPN"
    assert heading(LEAVE) == "leave-policy.md"
    assert heading({"heading_path": [" "]}) == "document"
    prompt = PromptSection(system=" Answer from the context. ", refusal=" I cannot answer that. ")
    assert system_prompt(prompt) == 'Answer from the context.\nRefusal sentence: "I cannot answer that."'


def _record(question: str, contexts=(VPN,), system: str = "Answer from the context.") -> dict:
    return {"id": question, "meta": {"question": question.strip()},
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user_message(list(contexts), question)},
                         {"role": "assistant", "content": "A FIDO2 key."}]}


def test_record_turn_reads_the_last_user_turn():
    record = _record("Which key?")
    record["messages"].insert(1, {"role": "user", "content": "earlier turn"})
    assert record_turn(record) == (split_user_message(record["messages"][2]["content"]))
    assert last_user_turn(record["messages"]) == record["messages"][2]["content"]
    assert record_turn({"messages": [{"role": "assistant", "content": "x"}]}) is None
    assert record_turn({}) is None


@pytest.mark.parametrize("system_role", [True, False])
def test_the_prefix_before_the_question_is_what_rfind_of_the_question_gave(system_role):
    """train/data.py used prompt[:prompt.rfind(question)] as the share key; the parse gives the same bytes,
    also when the question's text appears in the context too (then the last occurrence is the question)."""
    tok = build_tiny_tokenizer(system_role=system_role)
    echo = {"text": "Which key does the VPN client need? A FIDO2 key.", "heading_path": ["FAQ"]}
    records = [_record("Which key does the VPN client need?", (echo, VPN)), _record(" How early? ", (LEAVE,)),
               _record("Wer genehmigt Urlaub?", (VPN, LEAVE)), _record("key", (VPN,))]
    for record in records:
        messages = record["messages"][1:2]
        prompt = render(tok, messages, record["messages"][0]["content"])
        question = record["meta"]["question"]
        old = prompt[:prompt.rfind(question)]
        assert prompt_before_question(prompt, last_user_turn(messages), question) == old
        assert old.endswith("Question: ") and prompt[len(old):].startswith(question)


def test_no_prefix_without_the_format_or_the_records_own_question():
    tok = build_tiny_tokenizer()
    record = _record("Which key?")
    turn = record["messages"][1]["content"]
    prompt = render(tok, [record["messages"][1]], "SYS")
    assert prompt_before_question(prompt, turn, None) is None  # no question recorded: never shared
    assert prompt_before_question(prompt, turn, "Another question?") is None
    assert prompt_before_question(prompt, "Hello", "Hello") is None
    assert prompt_before_question("unrelated text", turn, "Which key?") is None
    empty = user_turn("[1] x\ny", "")
    assert prompt_before_question(render(tok, [{"role": "user", "content": empty}], None), empty, "") is None
