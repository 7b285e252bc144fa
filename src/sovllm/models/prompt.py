"""The training prompt format: how a record's turns are written, and how they are read back.

A train/val/eval record has three turns. The system turn is the project's system prompt with the
fixed refusal sentence spelled out. The user turn is "Context:" and a blank line, each context
chunk as "[i] heading path" over its text (blank lines between chunks), then a blank line and
"Question: " with the question. The assistant turn is the answer or the refusal sentence. Curate
writes records with these functions, and training, calibration, serving (the refusal bias) and
evaluation read user turns back with them, so the format lives here and nowhere else. Text that is
not in this format has no (context, question) and every reader treats it that way.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sovllm.config import PromptSection

CONTEXT_HEAD = "Context:\n\n"
QUESTION_HEAD = "\n\nQuestion: "


def system_prompt(prompt: PromptSection) -> str:
    """The system prompt with the exact refusal sentence spelled out."""
    return f'{prompt.system.strip()}\nRefusal sentence: "{prompt.refusal.strip()}"'


def heading(chunk: dict) -> str:
    """A chunk's heading path, or its document's file name when it has none."""
    path = [h for h in chunk.get("heading_path") or [] if h.strip()]
    if path:
        return " > ".join(path)
    return PurePosixPath((chunk.get("source") or {}).get("path") or "document").name


def user_turn(context: str, question: str) -> str:
    """The user turn for a context already laid out as `split_user_message` returns it."""
    return CONTEXT_HEAD + context + QUESTION_HEAD + question.strip()


def user_message(contexts: list[dict], question: str) -> str:
    """The user turn: every context chunk under its heading path, numbered, then the question."""
    blocks = [f"[{i}] {heading(c)}\n{c['text'].strip()}" for i, c in enumerate(contexts, 1)]
    return user_turn("\n\n".join(blocks), question)


def split_user_message(content: str | None) -> tuple[str, str] | None:
    """(context, question) of a user turn in the training format, else None."""
    if not isinstance(content, str) or not content.startswith(CONTEXT_HEAD) or QUESTION_HEAD not in content:
        return None
    context, question = content[len(CONTEXT_HEAD):].rsplit(QUESTION_HEAD, 1)
    return context, question.strip()


def last_user_turn(messages: list) -> str | None:
    """The content of the last user message of a chat (dicts with role and content), else None."""
    turns = [m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    return turns[-1] if turns else None


def record_turn(record: dict) -> tuple[str, str] | None:
    """(context, question) of a train/val/eval record's last user turn, else None."""
    return split_user_message(last_user_turn(record.get("messages")))


def prompt_before_question(prompt: str, turn: str | None, question: str | None) -> str | None:
    """The rendered `prompt` up to the first character of the question of its user turn `turn`.

    Prompts with the same such prefix differ only in their question, so training and calibration
    compute that prefix once for all of them. None unless `turn` is in the training format, its
    question is `question` (the one the record says it asks) and `turn` occurs in `prompt`."""
    parts = split_user_message(turn)
    if parts is None or not parts[1] or not isinstance(question, str) or parts[1] != question.strip():
        return None
    at = prompt.rfind(turn)
    if at < 0:
        return None
    tail = turn.rindex(QUESTION_HEAD) + len(QUESTION_HEAD)
    start = tail + len(turn[tail:]) - len(turn[tail:].lstrip())  # the parse strips the question
    return prompt[:at + start]
