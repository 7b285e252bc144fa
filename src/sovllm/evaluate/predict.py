"""Run each model on the eval items through one endpoint and score every answer.

Items come from `eval.jsonl` unchanged (the system prompt and user turn the model was trained on).
`gold` mode sends them as they are; `retrieved` mode rebuilds the user turn from the top-k chunks a
BM25 index over the eval split's chunks returns for the question — only for answerable items,
because an unanswerable item's question was written from another chunk of the same split, which
retrieval would rightly find. Generation is greedy with one `max_tokens` for every model.
Unanswerable items keep their kind (`meta.negative`): `on_topic` (the item's own question about
its own chunk with the answer-bearing sentences removed) or `foreign` (a question of another
document; records written before the distinction existed count as foreign).

Answers are cached in `out/eval/cache.jsonl` (`endpoint.CompletionCache`) by (model weights
fingerprint, messages, parameters): an interrupted evaluation resumes where it stopped, and
re-evaluating an unchanged model is free.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from sovllm.endpoint import ChatClient, CompletionCache, Endpoint
from sovllm.errors import BackendError
from sovllm.evaluate.metrics import NEGATIVE_KINDS, score
from sovllm.models.prompt import user_message
from sovllm.retrieval import BM25


@dataclass(frozen=True)
class Model:
    """A model to evaluate: its label in reports, the name the endpoint serves it under, a fingerprint."""

    label: str
    served: str
    fingerprint: str


@dataclass
class Item:
    id: str
    messages: list[dict]  # system + user (the reference answer is not sent)
    reference: str
    answerable: bool
    type: str
    lang: str | None
    question: str
    gold_ids: list[str]
    chunk_id: str
    context_ids: list[str]
    mode: str = "gold"
    negative: str | None = None  # unanswerable items: "on_topic" or "foreign"

    @classmethod
    def from_record(cls, record: dict) -> "Item":
        meta = record["meta"]
        answerable = meta["type"] != "unanswerable"
        negative = None if answerable else meta.get("negative") or "foreign"
        if negative not in (None, *NEGATIVE_KINDS):
            raise ValueError(f"meta.negative is {negative!r}, expected one of {', '.join(NEGATIVE_KINDS)}")
        return cls(record["id"], record["messages"][:2], record["messages"][2]["content"],
                   answerable, meta["type"], meta.get("lang"), meta["question"],
                   [meta["chunk_id"]], meta["chunk_id"], list(meta.get("context_ids") or []), negative=negative)


def retrieved_items(items: list[Item], chunks: list[dict], k: int) -> list[Item]:
    """Answerable items with their user turn rebuilt from the top-k BM25 chunks of `chunks`."""
    index = BM25([c["text"] for c in chunks])
    out = []
    for item in items:
        if not item.answerable:
            continue
        top = [chunks[i] for i in index.top(item.question, k)]
        messages = [item.messages[0], {"role": "user", "content": user_message(top, item.question)}]
        out.append(Item(item.id, messages, item.reference, True, item.type, item.lang, item.question,
                        item.gold_ids, item.chunk_id, [c["id"] for c in top], "retrieved"))
    return out


async def _answers(endpoint: Endpoint, jobs: list[tuple[Model, Item]], max_tokens: int, concurrency: int,
                   cache: CompletionCache, on_done: Callable[[], None] | None, timeout: float) -> dict[tuple, dict]:
    clients = {m.label: ChatClient(Endpoint(endpoint.base_url, m.served, endpoint.api_key, endpoint.embedded),
                                   timeout=timeout) for m, _ in jobs}
    gate = asyncio.Semaphore(concurrency)  # at most `concurrency` requests in flight, whatever the job count
    results: dict[tuple, dict] = {}

    async def one(model: Model, item: Item) -> None:
        async with gate:
            done = await cache.complete(clients[model.label], model.fingerprint, item.messages, max_tokens=max_tokens,
                                        temperature=0.0)
        answer = {"answer": done.text, "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
                  "completion_tokens": done.completion_tokens, "ttft_s": round(done.ttft_s, 4),
                  "seconds": round(done.seconds, 4)}
        results[(model.label, item.mode, item.id)] = answer
        if on_done:
            on_done()

    try:
        await asyncio.gather(*(one(m, i) for m, i in jobs))
    finally:
        for client in clients.values():
            await client.close()
    return results


def predict(endpoint: Endpoint, models: list[Model], items: list[Item], *, max_tokens: int, refusal: str,
            cache: CompletionCache, concurrency: int = 16, languages: tuple[str, ...] = (),
            on_done: Callable[[], None] | None = None, timeout: float = 600) -> list[dict]:
    """One scored prediction row per (model, item), items in order, models interleaved."""
    jobs = [(m, i) for i in items for m in models]
    # asked model by model, prompts sorted so that those sharing a context are in flight together:
    # the server's prefix cache then computes each shared context once per model
    order = sorted(jobs, key=lambda job: (models.index(job[0]), job[1].messages[-1]["content"]))
    try:
        answers = asyncio.run(_answers(endpoint, order, max_tokens, concurrency, cache, on_done, timeout))
    except BackendError as exc:
        raise BackendError(f"evaluation request failed: {exc}",
                           hint="check that the endpoint serves every model in eval.models") from None
    rows = []
    for model, item in jobs:
        answer = answers[(model.label, item.mode, item.id)]
        metrics = score(answer["answer"], answer["finish_reason"], reference=item.reference,
                        answerable=item.answerable, refusal=refusal, lang=item.lang, languages=languages)
        row = {"id": item.id, "model": model.label, "served_as": model.served, "context": item.mode,
               "type": item.type, "answerable": item.answerable, "negative": item.negative, "lang": item.lang, "question": item.question,
               "reference": item.reference, "context_ids": item.context_ids, **{k: v for k, v in answer.items()},
               **metrics}
        if item.mode == "retrieved":
            row["hit"] = item.chunk_id in item.context_ids
        rows.append(row)
    return rows
