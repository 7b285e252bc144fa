"""One function decides where the system prompt goes, for every template."""

from __future__ import annotations

from sovllm.models.chat import render, supports_system_role, with_system
from sovllm.models.tiny import build_tiny_tokenizer

USER = [{"role": "user", "content": "Wie lange gilt das Rückgaberecht?"}]


def test_template_with_system_role_gets_a_system_turn():
    tok = build_tiny_tokenizer()
    assert supports_system_role(tok)
    text = render(tok, USER, "Answer only from the context.")
    assert text.startswith("<|im_start|>system\nAnswer only from the context.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_template_without_system_role_gets_the_prompt_merged_into_the_first_user_turn():
    tok = build_tiny_tokenizer(system_role=False)
    assert not supports_system_role(tok)
    text = render(tok, USER + [{"role": "assistant", "content": "30 Tage."}, *USER], "SYS")
    assert text.startswith("<|im_start|>user\nSYS\n\nWie lange gilt das Rückgaberecht?<|im_end|>")
    assert text.count("SYS") == 1


def test_with_system_replaces_a_given_system_message_and_does_not_mutate_input():
    messages = [{"role": "system", "content": "old"}, *USER]
    assert with_system(messages, "new", system_role=True)[0] == {"role": "system", "content": "new"}
    merged = with_system(messages, "new", system_role=False)
    assert merged == [{"role": "user", "content": "new\n\n" + USER[0]["content"]}]
    assert messages[1]["content"] == USER[0]["content"]
    assert with_system(USER, None, system_role=True) == USER
