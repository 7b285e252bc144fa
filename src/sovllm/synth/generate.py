"""The generation loop: bounded concurrency, bounded retries, and a crash-safe cache.

Each chunk's result is keyed by (chunk text hash, prompt template hash, generator model, sampling
and validation settings), not by its position, and appended to `cache.jsonl` (flushed and synced)
as soon as the chunk is done. A re-run, after an edit, Ctrl-C or `kill -9`, reuses every cached
key and only asks the endpoint for the rest; `qa.jsonl` is rebuilt from the cache in chunk order,
so a pair is never duplicated or lost. A cut-off last line (the write `kill -9` interrupted) is
cut off the file before the re-run appends to it; an unreadable line elsewhere is corruption and
an error naming the file and line.

Concurrency: at most `concurrency` requests are in flight at the endpoint (a semaphore in the
client); as many workers take chunks from a queue fed by one producer, so at most
`2 × concurrency` chunks wait in memory beyond those being worked on, whatever the corpus size.
A chunk's questions are requested concurrently, which keeps the endpoint's batch full.

In extractive mode a chunk's result also depends on the answers its structure pairs already use
(they are not asked for again) and on how its answers are chosen (`answers.PLAN_VERSION`), so
both are part of its key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jsonschema

from sovllm.artifacts import append_jsonl, read_jsonl, truncate_partial_line
from sovllm.config import SynthSection
from sovllm.endpoint import ChatClient, Endpoint
from sovllm.errors import BackendError
from sovllm.synth.answers import PLAN_VERSION, plan
from sovllm.synth.prompt import PromptSet
from sovllm.synth.structure import structure_pairs
from sovllm.synth.validate import (
    check_output,
    check_question,
    max_tokens_for,
    question_schema,
    schema_for,
)
from sovllm.text import norm_question


@dataclass
class Settings:
    """Everything that decides what a chunk's pairs look like (all of it goes into the cache key)."""

    types: list[str]
    temperature: float
    top_p: float
    seed: int
    max_attempts: int
    grounding: float
    question_max: int
    answer_max: int
    extractive: bool
    pairs_per_chunk: int = 4  # extractive mode: questions asked per chunk
    # left out of the cache key: `fill` chooses which chunks are asked, not their result; what
    # `structure` changes about a result (the answers not asked for again) goes in as `avoided_answers`
    fill: bool = False
    structure: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, synth: SynthSection, *, embedded: bool) -> Settings:
        extractive = synth.answer_mode == "extractive" or (synth.answer_mode == "auto" and embedded)
        return cls(list(synth.types), synth.temperature, synth.top_p, synth.seed, synth.max_attempts,
                   synth.grounding, synth.question_max_chars, synth.answer_max_chars, extractive,
                   synth.pairs_per_chunk, synth.model_pairs == "fill", tuple(synth.structure))


_NOT_IN_KEY = ("fill", "structure")


def avoided_answers(chunk: dict, settings: Settings) -> list[str]:
    """Extractive mode: the answers of the chunk's structure pairs, which the model is not asked about."""
    if not settings.extractive or not settings.structure:
        return []
    return [pair["answer"] for pair in structure_pairs(chunk, settings.structure, settings.answer_max)]


def chunk_key(chunk: dict, prompts: PromptSet, model: str, settings: Settings) -> str:
    text_hash = hashlib.sha256(chunk["text"].encode("utf-8")).hexdigest()
    values = {k: v for k, v in settings.__dict__.items() if k not in _NOT_IN_KEY}
    parts = [text_hash, chunk.get("heading_path"), prompts.language(chunk.get("lang")),
             prompts.template_hash(prompts.language(chunk.get("lang"))), model, values]
    if settings.extractive:
        parts.append([PLAN_VERSION, avoided_answers(chunk, settings)])
    else:  # free mode asks one pair per type whatever `pairs_per_chunk` says
        values.pop("pairs_per_chunk")
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


CACHE_LINE_HINT = "a cache line only saves requests: delete that line (or the whole file) and run again"


def load_cache(path: Path) -> dict[str, dict]:
    """Cached chunk results by key (later lines win; a cut-off last line is ignored)."""
    if not path.is_file():
        return {}
    return {record["key"]: record for record in read_jsonl(path, skip_partial_last_line=True,
                                                           bad_line_hint=CACHE_LINE_HINT) if "key" in record}


@dataclass
class RunStats:
    chunks: int = 0
    reused: int = 0
    generated: int = 0
    pairs: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    request_s: float = 0.0
    requests: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def _usage() -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "ttft_s": 0.0, "request_s": 0.0, "requests": 0}


def _count(usage: dict, completion) -> None:
    usage["prompt_tokens"] += completion.prompt_tokens
    usage["completion_tokens"] += completion.completion_tokens
    usage["ttft_s"] += completion.ttft_s
    usage["request_s"] += completion.seconds
    usage["requests"] += 1


async def _backoff(attempt: int) -> None:
    if attempt:
        await asyncio.sleep(0.2 * 2 ** attempt * random.uniform(0.5, 1.5))


async def _extractive(chunk: dict, client: ChatClient, prompts: PromptSet, settings: Settings, seed: int,
                      usage: dict) -> tuple[list[dict], list[dict]]:
    """Answers are statements of the chunk; the model writes the question each one answers.

    `answers.plan` chooses up to `pairs_per_chunk` answers spread over the types and sections,
    each with its own fallbacks; the slots run concurrently, so a chunk keeps several short
    requests in flight. A slot whose question another slot already asked counts as a duplicate.
    """
    lang = prompts.language(chunk.get("lang"))
    slots, starved = plan(chunk["text"], settings.types, settings.pairs_per_chunk, settings.max_attempts,
                          settings.answer_max, avoided_answers(chunk, settings))
    schema = {"type": "object", "additionalProperties": False, "required": ["question"],
              "properties": {"question": question_schema(settings.question_max, lang)}}

    async def one_slot(index: int, type_: str, answers: list[str]) -> tuple[dict | None, dict | None]:
        failure = None
        for attempt, answer in enumerate(answers):
            await _backoff(attempt)
            try:
                completion = await client.complete(
                    prompts.render_question(chunk, type_, answer), max_tokens=settings.question_max + 16,
                    temperature=settings.temperature, top_p=settings.top_p, seed=seed + 16 * index + attempt,
                    response_format={"type": "json_schema", "json_schema": {"name": "question", "schema": schema}})
            except BackendError as exc:
                return None, {"type": type_, "reason": "endpoint", "raw": str(exc)}
            _count(usage, completion)
            reason, question = None, ""
            if completion.finish_reason == "length":
                reason = "truncated"
            else:
                try:
                    data = json.loads(completion.text)
                    jsonschema.validate(data, schema)
                    question = data["question"].strip()
                except (ValueError, jsonschema.ValidationError):
                    reason = "schema"
            reason = reason or check_question(question, answer, set())
            if reason is None:
                return {"type": type_, "question": question, "answer": answer}, None
            failure = {"type": type_, "reason": reason, "raw": completion.text, "answer": answer}
        return None, failure

    outcomes = await asyncio.gather(*(one_slot(i, s.type, s.answers) for i, s in enumerate(slots)))
    valid, failed, seen = [], [], set()
    for pair, failure in outcomes:
        if pair is not None and norm_question(pair["question"]) in seen:
            pair, failure = None, {"type": pair["type"], "reason": "duplicate",
                                   "raw": json.dumps(pair, ensure_ascii=False)}
        if pair is not None:
            seen.add(norm_question(pair["question"]))
            valid.append(pair)
        else:
            failed.append(failure)
    failed += [{"type": t, "reason": "context", "raw": "no statement of the chunk suits this question type"}
               for t in starved]
    return valid, failed


async def _free(chunk: dict, client: ChatClient, prompts: PromptSet, settings: Settings, seed: int,
                usage: dict) -> tuple[dict, dict]:
    """One request per chunk for all missing types; the model writes questions and answers."""
    valid, failed, seen = {}, {}, set()
    missing = list(settings.types)
    for attempt in range(settings.max_attempts):
        await _backoff(attempt)
        schema = schema_for(missing, settings.question_max, settings.answer_max)
        try:
            completion = await client.complete(
                prompts.render(chunk, missing), max_tokens=max_tokens_for(missing, settings.question_max,
                                                                           settings.answer_max),
                temperature=settings.temperature, top_p=settings.top_p, seed=seed + attempt,
                response_format={"type": "json_schema", "json_schema": {"name": "qa_pairs", "schema": schema}})
        except BackendError as exc:
            for type_ in missing:
                failed[type_] = {"reason": "endpoint", "raw": str(exc)}
            break
        _count(usage, completion)
        pairs, problems = check_output(completion.text, completion.finish_reason, chunk["text"], missing, schema,
                                       settings.grounding, seen)
        valid.update(pairs)
        for type_, reason in problems.items():
            failed[type_] = {"reason": reason, "raw": completion.text}
        for type_ in pairs:
            failed.pop(type_, None)
        missing = [t for t in missing if t not in valid]
        if not missing:
            break
    return valid, failed


async def _one_chunk(chunk: dict, key: str, client: ChatClient, prompts: PromptSet, settings: Settings) -> dict:
    usage = _usage()
    seed = int(key[:8], 16) + settings.seed
    if settings.extractive:
        pairs, failed = await _extractive(chunk, client, prompts, settings, seed, usage)
    else:
        valid, problems = await _free(chunk, client, prompts, settings, seed, usage)
        pairs = [{"type": t, **valid[t]} for t in settings.types if t in valid]
        failed = [{"type": t, **problems[t]} for t in settings.types if t in problems]
    return {"key": key, "chunk_id": chunk["id"], "pairs": pairs, "failed": failed, **usage}


async def generate(chunks: list[dict], *, endpoint: Endpoint, prompts: PromptSet, settings: Settings,
                   cache_path: Path, concurrency: int, timeout: float, reuse: bool = True,
                   on_done: Callable[[dict], None] | None = None) -> tuple[dict[str, dict], RunStats]:
    """Generate pairs for every chunk not in the cache; returns all results by key and run statistics."""
    truncate_partial_line(cache_path)  # new records must not be glued to a line a crash cut off
    cache = load_cache(cache_path) if reuse else {}
    stats = RunStats(chunks=len(chunks))
    keys = {c["id"]: chunk_key(c, prompts, endpoint.model, settings) for c in chunks}
    todo = [c for c in chunks if keys[c["id"]] not in cache]
    stats.reused = len(chunks) - len(todo)
    if not todo:
        return cache, stats
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    client = ChatClient(endpoint, timeout=timeout, max_in_flight=concurrency)
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * concurrency)

    async def producer():
        for chunk in todo:
            await queue.put(chunk)
        for _ in range(concurrency):
            await queue.put(None)

    async def worker():
        while (chunk := await queue.get()) is not None:
            record = await _one_chunk(chunk, keys[chunk["id"]], client, prompts, settings)
            append_jsonl(cache_path, [record])  # durable before it counts as done
            cache[record["key"]] = record
            stats.generated += 1
            stats.prompt_tokens += record["prompt_tokens"]
            stats.completion_tokens += record["completion_tokens"]
            stats.ttft_s += record["ttft_s"]
            stats.request_s += record["request_s"]
            stats.requests += record["requests"]
            if on_done:
                on_done(record)

    tasks = [asyncio.create_task(producer())] + [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    return cache, stats


def assemble(chunks: list[dict], results: dict[str, dict], keys: dict[str, str], endpoint: Endpoint,
             stats: RunStats, *, structure: list[str] | tuple[str, ...] = (),
             answer_max: int = 240) -> tuple[list[dict], list[dict]]:
    """`qa.jsonl` and `errors.jsonl` records for the current chunks, in chunk order.

    After a chunk's model pairs come its `structure` pairs (FAQ entries, section overviews, fields,
    table rows), unless a model pair already asks the same question. Model pair ids are
    `<chunk id>-<type>` for the first pair of a type and `<chunk id>-<type>-<n>` for the n-th, in
    the order of the cached record, so they are the same on every rebuild.
    """
    pairs, errors = [], []
    generator = {"model": endpoint.model, "endpoint": endpoint.base_url, "method": "model"}
    for chunk in chunks:
        # no record: a chunk the model was not asked for (`synth.model_pairs: fill`, `synth.model_languages`)
        record = results.get(keys[chunk["id"]]) or {"pairs": [], "failed": []}
        asked, numbers = set(), Counter()
        for pair in record["pairs"]:
            asked.add(norm_question(pair["question"]))
            numbers[pair["type"]] += 1
            suffix = pair["type"] if numbers[pair["type"]] == 1 else f"{pair['type']}-{numbers[pair['type']]}"
            pairs.append({"id": f"{chunk['id']}-{suffix}", "chunk_id": chunk["id"], "question": pair["question"],
                          "answer": pair["answer"], "type": pair["type"], "generator": generator})
        for pair in structure_pairs(chunk, list(structure), answer_max) if structure else []:
            if (key := norm_question(pair["question"])) not in asked:
                asked.add(key)
                pairs.append({"id": f"{chunk['id']}-{pair['name']}", "chunk_id": chunk["id"],
                              "question": pair["question"], "answer": pair["answer"], "type": pair["type"],
                              "generator": {"model": None, "endpoint": None, "method": pair["method"]}})
        for failure in record["failed"]:
            errors.append({"chunk_id": chunk["id"], "type": failure["type"], "reason": failure["reason"],
                           "raw": failure["raw"]})
            stats.by_reason[failure["reason"]] = stats.by_reason.get(failure["reason"], 0) + 1
    stats.pairs, stats.failures = len(pairs), len(errors)
    return pairs, errors
