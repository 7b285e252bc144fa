"""LLM-as-judge: a rubric (data, registered by name) and a client that grades through JSON-schema output.

Shared by curate (grading synthetic pairs against their chunk) and, later, evaluation (grading a
model's answer with a reference). A rubric is plain data: instructions, one description per rating
and worked examples; `register_rubric` adds one. The judge asks for `{rating, hallucination,
reasoning}` with `response_format: json_schema`, greedy, and validates what comes back; every
failure (unparseable or truncated output, an endpoint error) is counted, never guessed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Callable

import jsonschema

from sovllm.endpoint import ChatClient, CompletionCache, Endpoint
from sovllm.errors import BackendError, ConfigError


def reasoning_limit(chars: int, max_tokens: int | None, skeleton: dict) -> int:
    """The longest reasoning a verdict may have so that it always closes within `max_tokens`.

    A token holds at least one character, so a verdict of N characters (the compact JSON `skeleton`
    with an empty reasoning, plus the reasoning) ends within N tokens, whatever the tokenizer. A small
    judge stuck in a loop ("1.1.1.1…") then still returns a complete verdict instead of one cut off by
    max_tokens (counted as a failure, its tokens wasted)."""
    if max_tokens is None:
        return chars
    fixed = len(json.dumps(skeleton, ensure_ascii=False)) + 2  # + end of turn and a spare token
    return max(1, min(chars, max_tokens - fixed))


@dataclass(frozen=True)
class Rubric:
    name: str
    instructions: str
    ratings: dict[str, str]
    examples: tuple[dict, ...] = ()
    reasoning_chars: int = 240

    def schema(self, max_tokens: int | None = None) -> dict:
        skeleton = {"rating": max(self.ratings, key=len), "hallucination": False, "reasoning": ""}
        chars = reasoning_limit(self.reasoning_chars, max_tokens, skeleton)
        return {"type": "object", "additionalProperties": False, "required": ["rating", "hallucination", "reasoning"],
                "properties": {"rating": {"enum": list(self.ratings)}, "hallucination": {"type": "boolean"},
                               "reasoning": {"type": "string", "minLength": 1, "maxLength": chars}}}

    def system_prompt(self, few_shot: bool = True) -> str:
        lines = [self.instructions, "", "Ratings:"]
        lines += [f"{rating}: {text}" for rating, text in self.ratings.items()]
        for example in self.examples if few_shot else ():
            lines += ["", "Example:", _user_text(example["context"], example["question"], example["answer"],
                                                 example.get("reference")),
                      "Verdict: " + json.dumps(example["verdict"], ensure_ascii=False)]
        return "\n".join(lines)

    def messages(self, context: str, question: str, answer: str, reference: str | None = None,
                 few_shot: bool = True) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt(few_shot)},
                {"role": "user", "content": _user_text(context, question, answer, reference)
                 + "\n\nRespond with the JSON verdict only."}]


def _user_text(context: str, question: str, answer: str, reference: str | None) -> str:
    parts = [f"CHUNK:\n{context.strip()}", f"QUESTION: {question.strip()}"]
    if reference is not None:
        parts.append(f"REFERENCE ANSWER: {reference.strip()}")
    parts.append(f"ANSWER: {answer.strip()}")
    return "\n\n".join(parts)


RUBRICS: dict[str, Rubric] = {}


def register_rubric(rubric: Rubric) -> Rubric:
    """Make a rubric available by name (`curate.judge.rubric`)."""
    RUBRICS[rubric.name] = rubric
    return rubric


def get_rubric(name: str) -> Rubric:

    if name not in RUBRICS:
        raise ConfigError(f"curate.judge.rubric: unknown rubric '{name}'", hint=f"known: {', '.join(sorted(RUBRICS))}")
    return RUBRICS[name]


QA_ABC = register_rubric(Rubric(
    name="qa-abc",
    instructions=(
        "You grade question-answer pairs written for a fine-tuning dataset. The answer must come strictly "
        "from the CHUNK. Rate the pair A, B or C. Set hallucination to true only for rating C caused by "
        "facts that are not in the chunk (names, numbers, dates, technical details). Give the reason in "
        "one short sentence."),
    ratings={
        "A": "fit for training: a natural question a user would ask, answerable from the chunk, and an answer "
             "that is correct, complete and strictly from the chunk, without speculation.",
        "B": "minor issues: awkward wording, a small gap, or a little wording or implication that the chunk "
             "does not state.",
        "C": "unfit: a factual error, a contradiction of the chunk, invented facts, or a misleading or badly "
             "incomplete answer.",
    },
    examples=(
        {"context": "Backups of customer databases are kept for 35 days in the Frankfurt region.",
         "question": "How long are customer database backups kept?",
         "answer": "Customer database backups are kept for 35 days.",
         "verdict": {"rating": "A", "hallucination": False, "reasoning": "Correct and complete, taken from the chunk."}},
        {"context": "Backups of customer databases are kept for 35 days in the Frankfurt region.",
         "question": "Where are customer database backups stored?",
         "answer": "They are stored in Frankfurt and replicated to Dublin every night.",
         "verdict": {"rating": "C", "hallucination": True, "reasoning": "The chunk never mentions Dublin or a "
                                                                         "nightly replication."}},
    ),
))


@dataclass
class Verdict:
    rating: str | None
    hallucination: bool | None = None
    reasoning: str = ""
    error: str | None = None  # "schema", "truncated", "endpoint", "inconsistent" (hallucination without C)

    def as_dict(self) -> dict:
        out = {"rating": self.rating, "hallucination": self.hallucination, "reasoning": self.reasoning}
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class JudgeStats:
    graded: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def parse_verdict(text: str, finish_reason: str | None, rubric: Rubric) -> Verdict:
    """A Verdict from the judge's raw output; `error` says what was wrong with it."""
    if finish_reason == "length":
        return Verdict(None, error="truncated")
    try:
        data = json.loads(text)
        jsonschema.validate(data, rubric.schema())
    except (ValueError, jsonschema.ValidationError):
        return Verdict(None, error="schema")
    verdict = Verdict(data["rating"], data["hallucination"], data["reasoning"].strip())
    if verdict.hallucination and verdict.rating != max(rubric.ratings):  # only the worst rating may hallucinate
        verdict.error = "inconsistent"
    return verdict


class Judge:
    """Grades items `{context, question, answer[, reference]}` against one endpoint with one rubric."""

    def __init__(self, endpoint: Endpoint, rubric: Rubric, *, max_tokens: int = 160, concurrency: int = 8,
                 timeout: float = 300, few_shot: bool = True, cache: CompletionCache | None = None,
                 fingerprint: str = ""):
        self.endpoint, self.rubric, self.few_shot = endpoint, rubric, few_shot
        self.max_tokens, self.concurrency, self.timeout = max_tokens, concurrency, timeout
        # verdicts of a judge whose weights are known (fingerprint) can be reused across runs
        self.cache = cache or CompletionCache(None)
        self.fingerprint = fingerprint

    async def grade_many(self, items: list[dict], on_done: Callable[[Verdict], None] | None = None
                         ) -> tuple[list[Verdict], JudgeStats]:
        stats = JudgeStats()
        client = ChatClient(self.endpoint, timeout=self.timeout, max_in_flight=self.concurrency)
        schema = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": self.rubric.schema(self.max_tokens)}}

        async def one(item: dict) -> Verdict:
            messages = self.rubric.messages(item["context"], item["question"], item["answer"], item.get("reference"),
                                            self.few_shot)
            try:
                completion = await self.cache.complete(client, self.fingerprint, messages, max_tokens=self.max_tokens,
                                                       temperature=0.0, response_format=schema)
            except BackendError as exc:
                verdict = Verdict(None, reasoning=str(exc)[:200], error="endpoint")
            else:
                stats.prompt_tokens += completion.prompt_tokens
                stats.completion_tokens += completion.completion_tokens
                verdict = parse_verdict(completion.text, completion.finish_reason, self.rubric)
            stats.graded += 1
            if verdict.error:
                stats.failures[verdict.error] = stats.failures.get(verdict.error, 0) + 1
            if on_done:
                on_done(verdict)
            return verdict

        try:
            verdicts = await asyncio.gather(*(one(item) for item in items))
        finally:
            await client.close()
        return list(verdicts), stats
