"""Training/evaluation records: the chat messages every later stage uses unchanged.

system = the project's system prompt, which names the fixed refusal sentence; user = each context
chunk under its heading path, then the question; assistant = the answer (or the refusal
sentence). Training, serving and evaluation build their prompts with these functions, so the
model is always asked the way it was taught.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from sovllm.config import PromptSection
from sovllm.models.grounding import CONTEXT_HEAD, QUESTION_HEAD


def system_prompt(prompt: PromptSection) -> str:
    """The system prompt with the exact refusal sentence spelled out."""
    return f'{prompt.system.strip()}\nRefusal sentence: "{prompt.refusal.strip()}"'


def heading(chunk: dict) -> str:
    """A chunk's heading path, or its document's file name when it has none."""
    path = [h for h in chunk.get("heading_path") or [] if h.strip()]
    if path:
        return " > ".join(path)
    return PurePosixPath((chunk.get("source") or {}).get("path") or "document").name


def user_message(contexts: list[dict], question: str) -> str:
    """The user turn: every context chunk with its heading path, then the question
    (`sovllm.models.grounding.split_user_message` reads it back)."""
    blocks = [f"[{i}] {heading(c)}\n{c['text'].strip()}" for i, c in enumerate(contexts, 1)]
    return CONTEXT_HEAD + "\n\n".join(blocks) + QUESTION_HEAD + question.strip()


def make_record(record_id: str, *, prompt: PromptSection, contexts: list[dict], question: str, answer: str,
                chunk: dict, type_: str, pair_id: str | None = None, lang: str | None = None) -> dict:
    """One line of train/val/eval.jsonl."""
    return {
        "id": record_id,
        "messages": [{"role": "system", "content": system_prompt(prompt)},
                     {"role": "user", "content": user_message(contexts, question)},
                     {"role": "assistant", "content": answer.strip()}],
        "meta": {"chunk_id": chunk["id"], "doc_id": chunk["doc_id"], "type": type_, "question": question.strip(),
                 "context_ids": [c["id"] for c in contexts], "lang": lang or chunk.get("lang"), "pair_id": pair_id},
    }
