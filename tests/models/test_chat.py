"""One function decides where the system prompt goes, for every template."""

from __future__ import annotations

import pytest

from sovllm.models.chat import render, render_chat, supports_system_role, with_system
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


def test_a_clients_chat_renders_like_a_training_record():
    """Serving (`render_chat`) and training (`render`) place the system prompt the same way: as its own turn,
    unchanged, where the template has a system role, merged into the first user turn where it has none."""
    chat = [{"role": "system", "content": "SYS"}, *USER, {"role": "assistant", "content": "30 Tage."}, *USER]
    with_role = build_tiny_tokenizer()
    assert render_chat(with_role, chat) == with_role.apply_chat_template(chat, tokenize=False,
                                                                         add_generation_prompt=True)
    assert render_chat(with_role, chat) == render(with_role, chat[1:], "SYS")
    without = build_tiny_tokenizer(system_role=False)
    assert render_chat(without, chat, add_generation_prompt=False) == render(without, chat[1:], "SYS",
                                                                             add_generation_prompt=False)
    assert render_chat(without, chat).startswith("<|im_start|>user\nSYS\n\nWie lange")


def test_a_clients_other_system_messages_reach_the_template_as_sent():
    chat = [{"role": "system", "content": ""}, *USER, {"role": "system", "content": "Be brief."}]
    with_role = build_tiny_tokenizer()
    assert render_chat(with_role, chat) == with_role.apply_chat_template(chat, tokenize=False,
                                                                         add_generation_prompt=True)
    with pytest.raises(Exception, match="System role not supported"):
        render_chat(build_tiny_tokenizer(system_role=False), [*USER, {"role": "system", "content": "Be brief."}])
