"""Chat rendering shared by generation, training, serving and evaluation.

There is one chat template per model, the base model's own, and one system prompt per project.
For templates without a system role the system prompt is merged into the first user turn by
`with_system`, the only place that decides this; training renders records with `render` and
serving renders a client's messages with `render_chat`, so the two can never disagree.
"""

from __future__ import annotations

from sovllm.errors import ModelError

_PROBE_SYSTEM = "sovllm-probe-system-7f3a"
_PROBE_USER = "sovllm-probe-user-9c1e"


def supports_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message as its own turn."""
    cached = getattr(tokenizer, "_sovllm_system_role", None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    result = _probe_system_role(tokenizer)
    try:
        tokenizer._sovllm_system_role = (tokenizer.chat_template, result)
    except AttributeError:
        pass
    return result


def _probe_system_role(tokenizer) -> bool:
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}],
            tokenize=False,
        )
    except Exception:  # noqa: BLE001 - templates signal "no system role" by raising
        return False
    return isinstance(text, str) and _PROBE_SYSTEM in text


def with_system(messages: list[dict], system: str | None, *, system_role: bool) -> list[dict]:
    """Messages (copies) with the system prompt in place; without one, the messages as they are.

    With a system role the prompt becomes the first message (replacing a leading system message).
    Without, it is prepended to the first user turn, separated by a blank line.
    """
    rest = [dict(m) for m in messages]
    if not system:
        return rest
    if rest and rest[0].get("role") == "system":
        rest = rest[1:]
    if system_role:
        return [{"role": "system", "content": system}, *rest]
    for message in rest:
        if message.get("role") == "user":
            message["content"] = f"{system}\n\n{message['content']}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def render(tokenizer, messages: list[dict], system: str | None, *, add_generation_prompt: bool = True) -> str:
    """Render messages with the model's template and the project's system prompt."""
    merged = with_system(messages, system, system_role=supports_system_role(tokenizer))
    return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """Render a client's chat (serving) as `render` renders a training record: its leading system
    message is the system prompt, so a template without a system role gets it merged the same way.
    Exceptions of the template (e.g. a role it rejects) propagate."""
    first = messages[0] if messages else {}
    system = first.get("content") if first.get("role") == "system" else None
    return render(tokenizer, messages, system, add_generation_prompt=add_generation_prompt)


_PROBE_ANSWER = "sovllm-probe-answer-5d2b"


def end_of_turn_id(tokenizer) -> int:
    """The token id the chat template writes right after an assistant message (`<|im_end|>` for ChatML).

    This is the token the model must learn to emit: training puts it in the loss, the stop check
    counts it. ModelError when the template closes assistant turns with plain text.
    """
    text = tokenizer.apply_chat_template(
        with_system([{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}],
                    None, system_role=False), tokenize=False)
    tail = text.split(_PROBE_ANSWER, 1)[1] if _PROBE_ANSWER in text else ""
    for token_id in tokenizer.all_special_ids:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token and tail.startswith(token):
            return token_id
    raise ModelError("the chat template does not close assistant turns with a special token",
                     hint="sovllm needs an end-of-turn token to train stopping; use a chat model with one")
