"""Chat rendering shared by generation, training, serving and evaluation.

There is one chat template per model, the base model's own, and one system prompt per project.
For templates without a system role the system prompt is merged into the first user turn by
`with_system`, the only place that decides this, so training and serving can never disagree.
"""

from __future__ import annotations

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
    """Messages with the project's system prompt in place.

    With a system role the prompt becomes the first message (replacing any given one). Without,
    it is prepended to the first user turn, separated by a blank line.
    """
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if not system:
        return rest
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
