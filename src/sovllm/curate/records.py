"""Training/evaluation records: the chat messages every later stage uses unchanged.

system = the project's system prompt, which names the fixed refusal sentence; user = each context
chunk under its heading path, then the question; assistant = the answer (or the refusal
sentence). The turns are written in the training prompt format of `sovllm.models.prompt`, the one
module that also reads them back, so the model is always asked the way it was taught.
"""

from __future__ import annotations

from sovllm.config import PromptSection
from sovllm.models.prompt import system_prompt, user_message


def make_record(record_id: str, *, prompt: PromptSection, contexts: list[dict], question: str, answer: str,
                chunk: dict, type_: str, pair_id: str | None = None, lang: str | None = None,
                negative: str | None = None) -> dict:
    """One line of train/val/eval.jsonl; an unanswerable one names its `negative` kind (on_topic, foreign)."""
    record = {
        "id": record_id,
        "messages": [{"role": "system", "content": system_prompt(prompt)},
                     {"role": "user", "content": user_message(contexts, question)},
                     {"role": "assistant", "content": answer.strip()}],
        "meta": {"chunk_id": chunk["id"], "doc_id": chunk["doc_id"], "type": type_, "question": question.strip(),
                 "context_ids": [c["id"] for c in contexts], "lang": lang or chunk.get("lang"), "pair_id": pair_id},
    }
    if negative:
        record["meta"]["negative"] = negative
    return record
