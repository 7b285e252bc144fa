"""A chat request's prompt is rendered by the function training uses, for templates with and without a system role."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sovllm.models.chat import render
from sovllm.models.tiny import build_tiny_tokenizer
from sovllm.serve.protocol import APIError, ChatCompletionRequest
from sovllm.serve.service import Service

QUESTION = {"role": "user", "content": "Context:\n\n[1] IT\nPasswords rotate every 90 days.\n\nQuestion: How often?"}


def _service(system_role: bool) -> Service:
    tokenizer = build_tiny_tokenizer(system_role=system_role)
    engine = SimpleNamespace(vocab_size=len(tokenizer), stop_ids={tokenizer.eos_token_id})  # never called here
    return Service(engine, tokenizer, served_name="tiny", base_path="", base_id="", adapter_roots=[], max_lora_rank=8)


def _prompt(service: Service, messages: list[dict]) -> list[int]:
    return service._chat_prompt(ChatCompletionRequest(model="tiny", messages=messages))


@pytest.mark.parametrize("system_role", [True, False])
@pytest.mark.parametrize("role", ["system", "developer"])
def test_the_system_prompt_lands_where_training_put_it(system_role, role):
    service = _service(system_role)
    text = render(service.tokenizer, [QUESTION], "Answer only from the context.")
    expected = service.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _prompt(service, [{"role": role, "content": "Answer only from the context."}, QUESTION]) == expected


def test_a_message_the_template_rejects_is_a_400():
    with pytest.raises(APIError) as caught:
        _prompt(_service(False), [QUESTION, {"role": "system", "content": "Be brief."}])
    assert caught.value.status == 400 and caught.value.param == "messages"
    assert "System role not supported" in caught.value.message
