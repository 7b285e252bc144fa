"""The OpenAI-compatible endpoint a stage talks to, and a retrying async chat client for it.

`open_endpoint(cfg)` yields the configured endpoint (`endpoint.base_url` + `endpoint.model`, API
key from the environment variable `endpoint.api_key_env`) or, when none is configured, starts the
embedded server with the project's base model on a free loopback port and stops it afterwards.

`ChatClient.complete` streams one chat completion (so the time to the first token, mostly prompt
processing, can be told apart from generation), retries rate limits, server errors, timeouts and
dropped connections with jittered exponential backoff (honouring `Retry-After`), and never
retries a refused egress: that error is raised at once with its message.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from sovllm import egress
from sovllm.artifacts import append_jsonl, read_jsonl, truncate_partial_line
from sovllm.config import Config
from sovllm.errors import BackendError, ConfigError
from sovllm.serve.launch import EmbeddedServer

_sleep = asyncio.sleep  # the backoff wait (tests observe it)


def embedded_max_model_len(cfg: Config) -> int:
    """The embedded server's context window: room for two chunks plus instructions and the answer.

    The longest prompts are the judge's (chunk + reference + two answers, about 1,300 tokens with 512-token
    chunks) and retrieved context (two chunks). With the default chunk size this is 2,048, which keeps the
    preallocated KV cache of 16 slots of the bundled model at 1.5 GB (3,072 would take 2.3 GB).
    """
    return max(2048, 2 * cfg.ingest.chunk_size + 1024)


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = None
    embedded: bool = False

    def describe(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "embedded": self.embedded}


@contextmanager
def open_endpoint(cfg: Config, *, log: Callable[[str], None] = lambda _: None,
                  adapters: dict[str, str] | None = None) -> Iterator[Endpoint]:
    """The configured endpoint, or the embedded server for the project's base model, with `adapters`
    (name → folder) loaded: the embedded server starts with them, a configured endpoint gets them as
    `endpoint.adapter_loading` says (`sovllm.serve.publish`)."""
    section = cfg.endpoint
    if section.base_url:
        if not section.model:
            raise ConfigError("endpoint.model is required when endpoint.base_url is set",
                              hint="set it to the model name your server serves")
        api_key = None
        if section.api_key_env:
            api_key = os.environ.get(section.api_key_env)
            if not api_key:
                raise ConfigError(f"endpoint.api_key_env names {section.api_key_env}, which is not set")
        if adapters:
            from sovllm.serve.publish import publish

            publish(section, adapters, api_key=api_key, log=log)
        yield Endpoint(section.base_url.rstrip("/"), section.model, api_key)
        return

    log(f"starting the embedded server with {cfg.model.base} …")
    started = time.perf_counter()
    slots = str(max(16, cfg.synth.concurrency, cfg.eval.concurrency))
    with EmbeddedServer(cfg.model.base, adapters=adapters,
                        extra_args=["--max-num-seqs", slots, "--max-model-len", str(embedded_max_model_len(cfg))]) as server:
        log(f"embedded server ready at {server.base_url} ({time.perf_counter() - started:.1f} s)")
        yield Endpoint(server.base_url, server.served_name, None, True)


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    seconds: float


class ChatClient:
    """Async chat completions against one endpoint, with bounded, jittered retries."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 300, max_retries: int = 4, backoff: float = 1.0,
                 max_in_flight: int | None = None):
        import openai

        self.endpoint = endpoint
        self.max_retries = max_retries
        self.backoff = backoff
        self._openai = openai
        # Proxy variables are ignored; a proxy configured for sovllm is used, and every request's real
        # destination (redirects included) is checked against egress.allow and recorded.
        http_client = openai.DefaultAsyncHttpxClient(**egress.http_client_options(asynchronous=True))
        self._client = openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "sovllm",
                                          max_retries=0, timeout=timeout, http_client=http_client)
        self.retries = 0
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None

    async def close(self) -> None:
        await self._client.close()

    def _retry_after(self, exc) -> float | None:
        response = getattr(exc, "response", None)
        value = response.headers.get("retry-after") if response is not None else None
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    async def complete(self, messages: list[dict], **params) -> Completion:
        """One streamed chat completion; BackendError after the last retry, EgressBlockedError at once."""
        openai = self._openai
        retryable = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                     openai.APITimeoutError)
        for attempt in range(self.max_retries + 1):
            try:
                if self._slots is None:
                    return await self._once(messages, params)
                async with self._slots:  # at most max_in_flight requests at the endpoint
                    return await self._once(messages, params)
            except retryable as exc:
                blocked = egress.explain(exc)
                if blocked is not None:
                    raise blocked from None
                if attempt == self.max_retries:
                    raise BackendError(f"{self.endpoint.base_url}: {type(exc).__name__} after "
                                       f"{self.max_retries + 1} attempts: {exc}") from None
                delay = self._retry_after(exc) or self.backoff * 2 ** attempt
                self.retries += 1
                await _sleep(delay * random.uniform(0.5, 1.5))
            except openai.APIStatusError as exc:
                raise BackendError(f"{self.endpoint.base_url}: HTTP {exc.status_code}: {exc.message}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, messages: list[dict], params: dict) -> Completion:
        started = time.perf_counter()
        first = None
        parts: list[str] = []
        finish = None
        usage = None
        stream = await self._client.chat.completions.create(model=self.endpoint.model, messages=messages, stream=True,
                                                            stream_options={"include_usage": True}, **params)
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    if first is None:
                        first = time.perf_counter() - started
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
        seconds = time.perf_counter() - started
        return Completion("".join(parts), finish, usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0, first if first is not None else seconds, seconds)


class CompletionCache:
    """Finished completions in an append-only JSONL file, keyed by (model fingerprint, messages, params).

    Only a model with a fingerprint of its weights may be cached (an empty fingerprint is never
    cached): a remote name can point at different weights tomorrow. A torn last line (kill -9) is
    cut off the file on load, so the next entry starts on a line of its own; an unreadable line
    before it is corruption, an InputError naming file and line.
    """

    def __init__(self, path):
        from pathlib import Path


        self.path = Path(path) if path is not None else None  # None: in memory only
        self.entries: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            truncate_partial_line(self.path)
            hint = "a cache line only saves a request: delete that line (or the whole file) and run again"
            for entry in read_jsonl(self.path, bad_line_hint=hint):
                if isinstance(entry.get("key"), str):
                    self.entries[entry["key"]] = entry

    @staticmethod
    def key(fingerprint: str, messages: list[dict], params: dict) -> str:
        import hashlib
        import json

        blob = json.dumps([fingerprint, messages, params], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def put(self, key: str, completion: Completion) -> None:
        from dataclasses import asdict


        entry = {"key": key, **asdict(completion)}
        self.entries[key] = entry
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, [entry])  # synced: a finished answer survives a crash

    async def complete(self, client: ChatClient, fingerprint: str, messages: list[dict], **params) -> Completion:
        """The cached completion, or a new one from `client` (stored when `fingerprint` is set)."""
        key = self.key(fingerprint, messages, params) if fingerprint else None
        if key and key in self.entries:
            entry = {k: v for k, v in self.entries[key].items() if k != "key"}
            return Completion(**entry)
        completion = await client.complete(messages, **params)
        if key:
            self.put(key, completion)
        return completion
