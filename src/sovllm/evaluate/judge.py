"""LLM-as-judge for evaluation: rubric grades with a reference, pairwise A-vs-B, and the judge's own checks.

Built on the shared judge module (`sovllm.curate.judge`): the rubric `answer-abc` grades one
answer against the reference answer and the context; the pairwise prompt asks which of two answers
is better (or a tie) with JSON-schema output. Every pairwise comparison is asked in both orders and
counts as a win only when both orders agree; otherwise it is a tie, and the share of agreeing
orders is the judge's position consistency. Repeat consistency re-asks the same rubric questions;
the verbosity probe pits a reference answer against the same answer padded with restated content
(the padded one must not win). Agreement with hand labels (`judge-gold.jsonl`) is measured as
percent agreement and Cohen's kappa, with ties and without them; below `kappa_min` the judge is
marked unreliable. None of this feeds the headline table or the promotion gate.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from sovllm.artifacts import read_jsonl
from sovllm.curate.judge import (
    Judge,
    JudgeStats,
    Rubric,
    reasoning_limit,
    register_rubric,
)
from sovllm.endpoint import ChatClient, CompletionCache, Endpoint
from sovllm.errors import BackendError, InputError
from sovllm.stats import cohen_kappa, percent_agreement

ANSWER_ABC = register_rubric(Rubric(
    name="answer-abc",
    instructions=(
        "You grade a model's ANSWER to a QUESTION about the CHUNK, using the REFERENCE ANSWER as the expected "
        "content. If the reference is a refusal sentence, the only correct answer is that refusal. Rate A, B or C. "
        "Set hallucination to true only for rating C caused by facts that are neither in the chunk nor in the "
        "reference. Give the reason in one short sentence."),
    ratings={
        "A": "correct: states what the reference states (other wording is fine), nothing false, nothing invented.",
        "B": "partly correct: the main fact is there but something is missing, vague or slightly off.",
        "C": "wrong: a different or false fact, invented details, no answer, or a refusal where the reference "
             "answers (or an answer where the reference refuses).",
    },
))

PAIRWISE_INSTRUCTIONS = (
    "You compare two answers to the same QUESTION about the CHUNK. The REFERENCE ANSWER shows the expected "
    "content; if it is a refusal sentence, the answer that refuses is the correct one. Decide which answer is "
    "better: more correct and more faithful to the chunk first, then more complete. Length is not quality: "
    "repetition or restated content does not make an answer better. Reply with winner 1, 2 or tie, and the "
    "reason in one short sentence.")
REASONING_CHARS = 240


def pairwise_schema(max_tokens: int | None = None) -> dict:
    """JSON schema of a pairwise verdict whose reasoning fits in `max_tokens` (see `reasoning_limit`)."""
    chars = reasoning_limit(REASONING_CHARS, max_tokens, {"winner": "tie", "reasoning": ""})
    return {"type": "object", "additionalProperties": False, "required": ["winner", "reasoning"],
            "properties": {"winner": {"enum": ["1", "2", "tie"]},
                           "reasoning": {"type": "string", "minLength": 1, "maxLength": chars}}}


LABELS = ("1", "2", "tie")


def pairwise_messages(context: str, question: str, reference: str, first: str, second: str) -> list[dict]:
    user = "\n\n".join([f"CHUNK:\n{context.strip()}", f"QUESTION: {question.strip()}",
                        f"REFERENCE ANSWER: {reference.strip()}", f"ANSWER 1: {first.strip()}",
                        f"ANSWER 2: {second.strip()}"]) + "\n\nRespond with the JSON verdict only."
    return [{"role": "system", "content": PAIRWISE_INSTRUCTIONS}, {"role": "user", "content": user}]


@dataclass
class PairOutcome:
    """One A-vs-B comparison asked in both orders; `winner` is 'a', 'b' or 'tie' (None: a verdict failed)."""

    first: str | None  # verdict with a as answer 1
    second: str | None  # verdict with b as answer 1 (already mapped back to a/b)
    winner: str | None
    consistent: bool | None
    reasoning: str = ""


def _to_ab(winner: str | None, swapped: bool) -> str | None:
    if winner is None or winner == "tie":
        return winner
    first_is_a = not swapped
    return "a" if (winner == "1") == first_is_a else "b"


class PairJudge:
    """Pairwise verdicts through JSON-schema output, both orders, with bounded concurrency."""

    def __init__(self, endpoint: Endpoint, *, max_tokens: int = 160, concurrency: int = 8, timeout: float = 600,
                 cache: CompletionCache | None = None, fingerprint: str = ""):
        self.endpoint, self.max_tokens, self.concurrency, self.timeout = endpoint, max_tokens, concurrency, timeout
        self.counts = JudgeStats()
        self.cache = cache or CompletionCache(None)
        self.fingerprint = fingerprint
        self.schema = pairwise_schema(max_tokens)

    def _fail(self, kind: str) -> None:
        self.counts.failures[kind] = self.counts.failures.get(kind, 0) + 1

    async def _verdict(self, client: ChatClient, messages: list[dict]) -> tuple[str | None, str]:
        response_format = {"type": "json_schema", "json_schema": {"name": "pairwise", "schema": self.schema}}
        self.counts.graded += 1
        try:
            done = await self.cache.complete(client, self.fingerprint, messages, max_tokens=self.max_tokens,
                                             temperature=0.0, response_format=response_format)
        except BackendError:
            self._fail("endpoint")
            return None, ""
        self.counts.prompt_tokens += done.prompt_tokens
        self.counts.completion_tokens += done.completion_tokens
        if done.finish_reason == "length":
            self._fail("truncated")
            return None, ""
        try:
            data = json.loads(done.text)
            jsonschema.validate(data, self.schema)
        except (ValueError, jsonschema.ValidationError):
            self._fail("schema")
            return None, ""
        return data["winner"], data["reasoning"].strip()

    async def compare_many(self, items: list[dict], on_done=None) -> list[PairOutcome]:
        """items: {context, question, reference, a, b} → one PairOutcome each (both orders asked)."""
        client = ChatClient(self.endpoint, timeout=self.timeout, max_in_flight=self.concurrency)

        async def one(item: dict) -> PairOutcome:
            args = (item["context"], item["question"], item["reference"])
            (v1, why1), (v2, _) = await asyncio.gather(
                self._verdict(client, pairwise_messages(*args, item["a"], item["b"])),
                self._verdict(client, pairwise_messages(*args, item["b"], item["a"])))
            first, second = _to_ab(v1, False), _to_ab(v2, True)
            if on_done:
                on_done()
            if first is None or second is None:
                return PairOutcome(first, second, None, None, why1)
            return PairOutcome(first, second, first if first == second else "tie", first == second, why1)

        try:
            return list(await asyncio.gather(*(one(item) for item in items)))
        finally:
            await client.close()


def padded(answer: str, question: str) -> str:
    """The verbosity probe's answer: the same content, restated and padded."""
    return (f"{answer.strip()} In other words, to answer the question \"{question.strip()}\": {answer.strip()} "
            f"To summarise once more, {answer.strip()[0].lower() + answer.strip()[1:]}")


def load_gold(path: Path) -> list[dict]:
    """Hand-labelled pairwise items: {id, context, question, reference, answer_1, answer_2, label, reason}."""
    if not path.is_file():
        return []
    items = []
    for n, record in enumerate(read_jsonl(path), 1):
        missing = [k for k in ("id", "context", "question", "reference", "answer_1", "answer_2", "label", "reason")
                   if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            raise InputError(f"{path}:{n}: record lacks {', '.join(missing)}",
                             hint="every gold item needs the two answers, a label 1|2|tie and a one-line reason")
        if record["label"] not in LABELS:
            raise InputError(f"{path}:{n}: label {record['label']!r} is not one of 1, 2, tie")
        items.append(record)
    return items


def agreement(gold: list[str], judged: list[str | None], kappa_min: float) -> dict:
    """Percent agreement and Cohen's kappa (all labels, and only items neither rater called a tie)."""
    pairs = [(g, j) for g, j in zip(gold, judged) if j is not None]
    g_all, j_all = [g for g, _ in pairs], [j for _, j in pairs]
    decided = [(g, j) for g, j in pairs if g != "tie" and j != "tie"]
    kappa = cohen_kappa(g_all, j_all)
    kappa_decided = cohen_kappa([g for g, _ in decided], [j for _, j in decided])
    return {
        "items": len(gold), "judged": len(pairs), "failed": len(gold) - len(pairs),
        "percent_agreement": round(percent_agreement(g_all, j_all), 4) if pairs else None,
        "kappa": None if kappa is None else round(kappa, 4),
        "items_without_ties": len(decided),
        "percent_agreement_without_ties": round(percent_agreement(*zip(*decided)), 4) if decided else None,
        "kappa_without_ties": None if kappa_decided is None else round(kappa_decided, 4),
        "kappa_min": kappa_min,
        "reliable": kappa is not None and kappa >= kappa_min,
    }


def gold_label(outcome: PairOutcome) -> str | None:
    """A both-orders outcome as a gold-file label: a → '1', b → '2'."""
    return {"a": "1", "b": "2", "tie": "tie"}.get(outcome.winner) if outcome.winner else None


__all__ = ["ANSWER_ABC", "Judge", "PairJudge", "PairOutcome", "agreement", "gold_label", "load_gold", "padded"]
