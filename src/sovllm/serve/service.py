"""The server's logic, free of FastAPI: models, adapters, chat and text completions, streaming.

Requests become engine requests; engine events (from the engine thread) are handed to the asyncio
loop through a queue per request. Responses follow the OpenAI schema as vLLM produces it,
including `usage` on every response and, with `stream_options.include_usage`, a last chunk with
the usage and no choices. A request whose client goes away is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from sovllm.errors import AdapterError, InputError
from sovllm.models.adapter import (
    NAME_RE,
    check_servable,
    inspect_adapter,
    validate_name,
)
from sovllm.models.chat import render_chat
from sovllm.models.tokenizer import token_bytes
from sovllm.serve.engine import Engine, EngineDeadError, Request, next_request_id
from sovllm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from sovllm.serve.sampling import SamplingParams
from sovllm.serve.structured import GrammarCache

log = logging.getLogger("sovllm.serve")


class Service:
    """Everything the HTTP routes call."""

    def __init__(self, engine: Engine, tokenizer, *, served_name: str, base_path: str, base_id: str,
                 adapter_roots: list[Path], max_lora_rank: int, max_queue: int = 0, metrics=None,
                 refusal_calibration: bool = True):
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.base_path = base_path
        self.base_id = base_id
        self.adapter_roots = [Path(r).resolve() for r in adapter_roots]
        self.max_lora_rank = max_lora_rank
        self.adapters: dict[str, dict] = {}
        self.healthy = False
        self.created = int(time.time())
        self.grammars = GrammarCache(tokenizer, engine.vocab_size, sorted(engine.stop_ids))
        self._locks: dict[str, list] = {}  # adapter name → [lock, users], while held or awaited
        self.max_queue = max_queue  # waiting requests beyond this get 503 + Retry-After (0: unbounded)
        self.metrics = metrics
        self.refusal_calibration = refusal_calibration  # apply adapters' calibrated refusal bias

    # --- models and adapters -------------------------------------------------------------------

    def models(self) -> dict:
        base = {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "sovllm",
                "root": self.base_path, "parent": None, "max_model_len": self.engine.max_model_len,
                "permission": []}
        cards = [base] + [{"id": name, "object": "model", "created": a["created"], "owned_by": "sovllm",
                           "root": a["path"], "parent": self.served_name,
                           "max_model_len": self.engine.max_model_len, "permission": []}
                          for name, a in self.adapters.items()]
        return {"object": "list", "data": cards}

    def _adapter_for(self, model: str) -> str | None:
        if model == self.served_name:
            return None
        if model in self.adapters:
            return model
        raise APIError(f"The model `{_clip(model)}` does not exist.", 404, "NotFoundError", "model")

    def _check_root(self, path: Path) -> None:
        resolved = path.resolve()
        if not any(resolved == root or root in resolved.parents for root in self.adapter_roots):
            roots = ", ".join(str(r) for r in self.adapter_roots) or "(none)"
            raise APIError(f"lora_path {path} is outside the adapter roots ({roots}); start the server with "
                           f"--adapter-root to allow it", 400, "BadRequestError", "lora_path")

    def load_adapter_now(self, name: str, path: str, *, from_api: bool) -> None:
        """Validate and load an adapter (blocking; used at start-up and by the async route)."""
        try:
            self._load_adapter(name, path, from_api=from_api)
        except APIError:
            if self.metrics is not None:
                self.metrics.load_failed(name)
            raise

    def _load_adapter(self, name: str, path: str, *, from_api: bool) -> None:
        try:
            validate_name(name)
        except AdapterError as exc:
            raise APIError(str(exc), 400, "BadRequestError", "lora_name") from None
        if name == self.served_name or name == "__base__":
            raise APIError(f"lora_name {name!r} is reserved", 400, "BadRequestError", "lora_name")
        if name in self.adapters:
            raise APIError(f"The lora adapter '{name}' has already been loaded.", 400, "BadRequestError", "lora_name")
        try:
            adapter_path = Path(path).expanduser()
            if from_api:
                self._check_root(adapter_path)
            found = adapter_path.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, symlink loop, name too long, ~nobody
            reason = getattr(exc, "strerror", None) or str(exc)
            raise APIError(f"lora_path {_clip(path)!r} cannot be used as a folder ({_clip(reason)}); send the path "
                           "of an adapter directory under the adapter roots", 400, "BadRequestError",
                           "lora_path") from None
        if not found:
            raise APIError(f"No adapter found at {adapter_path}", 404, "NotFoundError", "lora_path")
        try:
            info = inspect_adapter(adapter_path)
            check_servable(info, base_id=self.base_id, max_rank=self.max_lora_rank)
            self.engine.load_adapter(name, adapter_path, info.refusal if self.refusal_calibration else None)
        except AdapterError as exc:
            raise APIError(str(exc), 400, "BadRequestError", "lora_path") from None
        except OSError as exc:
            raise APIError(f"{adapter_path}: cannot read the adapter ({exc.strerror or exc})", 400,
                           "BadRequestError", "lora_path") from None
        if info.base_id is None:
            log.warning("adapter %s has no sovllm manifest; its base model could not be verified", name)
        refusal = info.refusal if self.refusal_calibration else None
        if refusal is not None:
            log.info("adapter %s: refusal bias %s on its first %d refusal tokens, for requests in the training "
                     "format (manifest refusal_calibration)", name, refusal.describe(), len(refusal.token_ids))
        self.adapters[name] = {"path": str(adapter_path.resolve()), "rank": info.rank, "created": int(time.time()),
                               "base_id": info.base_id, "refusal": refusal}

    @asynccontextmanager
    async def _name_lock(self, name: str):
        """The per-name lock for adapter `name`; dropped again when nobody holds or waits for it, so
        names a client makes up never accumulate."""
        entry = self._locks.setdefault(name, [asyncio.Lock(), 0])  # [lock, holders and waiters]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[name]

    async def load_adapter(self, name: str, path: str) -> str:
        if not (isinstance(name, str) and NAME_RE.match(name)):
            self.load_adapter_now(name, path, from_api=True)  # raises the 400 (and counts it) without a lock
        async with self._name_lock(name):
            await asyncio.to_thread(self.load_adapter_now, name, path, from_api=True)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, name: str) -> str:
        if name not in self.adapters:  # unknown names take no lock (a client may send any string)
            raise APIError(f"The lora adapter '{_clip(name)}' cannot be found.", 404, "NotFoundError", "lora_name")
        async with self._name_lock(name):
            if name not in self.adapters:
                raise APIError(f"The lora adapter '{name}' cannot be found.", 404, "NotFoundError", "lora_name")
            try:
                await asyncio.to_thread(self.engine.unload_adapter, name)
            except AdapterError as exc:
                raise APIError(str(exc), 409, "ConflictError", "lora_name") from None
            del self.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def watch(self, folder: Path, interval: float = 2.0) -> None:
        """Keep the adapters in `folder` loaded: a new subfolder with an adapter loads under its name,
        a removed one unloads (retried while requests still use it). A folder that fails to load (for
        example one still being copied) is retried once its files change."""
        watched: dict[str, str] = {}  # name → path loaded by this watcher
        failed: dict[str, tuple] = {}  # name → signature of the files that failed to load

        def signature(sub: Path) -> tuple:
            config, weights = (sub / "adapter_config.json").stat(), (sub / "adapter_model.safetensors").stat()
            return config.st_mtime_ns, weights.st_mtime_ns, weights.st_size

        while True:
            try:
                await self._watch_once(folder, watched, failed, signature)
            except Exception:  # noqa: BLE001 - a bad folder entry must not stop the watcher
                log.exception("adapters dir: scanning %s failed", folder)
            await asyncio.sleep(interval)

    async def _watch_once(self, folder: Path, watched: dict, failed: dict, signature) -> None:
        """One scan: load new folders, unload removed ones. A folder that fails is reported once (until its
        files change) and never stops the others."""
        present = {}
        try:
            entries = sorted(folder.iterdir()) if folder.is_dir() else []
        except OSError as exc:
            entries = []
            log.warning("adapters dir: cannot list %s: %s", folder, exc)
        for sub in entries:
            try:
                if sub.is_dir() and (sub / "adapter_config.json").is_file() \
                        and (sub / "adapter_model.safetensors").is_file():
                    present[sub.name] = (sub, signature(sub))
            except OSError:
                continue  # vanished or unreadable while we looked: the next scan sees it again
        for name, (sub, sig) in present.items():
            if name in watched or name in self.adapters or failed.get(name) == sig:
                continue
            try:
                async with self._name_lock(name):
                    await asyncio.to_thread(self.load_adapter_now, name, str(sub), from_api=True)
                watched[name] = str(sub)
                failed.pop(name, None)
                log.info("adapters dir: loaded %s from %s", name, sub)
            except Exception as exc:  # noqa: BLE001 - one bad folder must not stop the others
                failed[name] = sig
                message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
                log.warning("adapters dir: skipped %r (reported once until its files change): %s", name, message)
        for name in [n for n in watched if n not in present]:
            if name not in self.adapters:  # already unloaded through the API
                del watched[name]
                continue
            try:
                await self.unload_adapter(name)
                del watched[name]
                log.info("adapters dir: unloaded %s (its folder was removed)", name)
            except APIError as exc:
                log.info("adapters dir: %s not unloaded yet: %s", name, exc.message)
        for name in [n for n in failed if n not in present]:
            del failed[name]

    # --- generation ------------------------------------------------------------------------------

    def _params(self, req, prompt_len: int, max_tokens: int | None, logprobs: bool, top: int) -> SamplingParams:
        room = self.engine.max_model_len - prompt_len
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else max(room, 1),
            temperature=req.temperature, top_p=req.top_p, seed=req.seed, n=req.n, stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            logprobs=logprobs, top_logprobs=top)

    def _refusal_bias(self, adapter: str | None, messages) -> float | None:
        """The adapter's calibrated refusal bias for a chat request (its last user turn), or None."""
        refusal = self.adapters[adapter].get("refusal") if adapter is not None else None
        users = [m for m in messages if m.role == "user"]
        return refusal.bias_for(users[-1].text()) if refusal is not None and users else None

    async def _events(self, prompt_ids, params, adapter, grammar, request_id,
                      refusal_bias: float | None = None) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = Request(request_id, prompt_ids, params, adapter,
                          lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), grammar,
                          refusal_bias=refusal_bias)
        if self.max_queue and self.engine.waiting >= self.max_queue:
            raise APIError(f"The server is overloaded: {self.engine.waiting} requests are waiting (--max-queue "
                           f"{self.max_queue}). Retry later.", 503, "ServiceUnavailableError",
                           headers={"Retry-After": "1"})
        try:
            self.engine.submit(request)
        except EngineDeadError as exc:
            raise APIError(str(exc), 503, "ServiceUnavailableError") from None
        except (InputError, AdapterError) as exc:
            raise APIError(str(exc), 400, "BadRequestError") from None
        remaining = params.n
        try:
            while remaining:
                event = await events.get()
                if event.get("error"):
                    status = event.get("status", 500)
                    kind = {503: "ServiceUnavailableError", 404: "NotFoundError"}.get(status, "InternalServerError")
                    raise APIError(event["error"], status, kind, "model" if status == 404 else None)
                if event["finish_reason"]:
                    remaining -= 1
                yield event
        finally:
            if remaining:
                self.engine.abort(request_id)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprob(self, entry: dict) -> dict:
        def item(token_id, logprob):
            return {"token": self._token_text(token_id), "logprob": logprob,
                    "bytes": token_bytes(self.tokenizer, token_id)}  # a partial character's own bytes

        return {**item(entry["token_id"], entry["logprob"]),
                "top_logprobs": [item(t, lp) for t, lp in entry["top"]]}

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(self.tokenizer, messages, add_generation_prompt=req.add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's input problem
            raise APIError(f"messages cannot be rendered with the model's chat template: {exc}", param="messages")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def chat(self, req: ChatCompletionRequest):
        """A chat completion (dict) or, with `stream`, an async iterator of SSE chunks (dicts)."""
        req.refuse_unsupported()
        adapter = self._adapter_for(req.model)
        prompt = await asyncio.to_thread(self._chat_prompt, req)  # templating and tokenising: off the loop
        params = self._params(req, len(prompt), req.max_completion_tokens or req.max_tokens, req.logprobs,
                              req.top_logprobs or 0)
        # compiling a new schema takes a moment: keep it off the event loop
        grammar = await asyncio.to_thread(self.grammars.for_format, req.response_format)
        request_id = next_request_id("chatcmpl")
        events = self._events(prompt, params, adapter, grammar, request_id, self._refusal_bias(adapter, req.messages))
        if req.stream:
            first = await anext(events)  # surfaces submit errors before the stream starts
            return self._chat_stream(req, request_id, len(prompt), first, events)
        choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(req.n)]
        content = [[] for _ in range(req.n)]
        generated = 0
        async for event in events:
            choice = choices[event["index"]]
            if event["token"] is not None:
                generated += 1
            choice["message"]["content"] += event["text"]
            if event["logprobs"]:
                content[event["index"]].append(self._chat_logprob(event["logprobs"]))
            if event["finish_reason"]:
                choice["finish_reason"] = "stop" if event["finish_reason"] == "stop" else "length"
        if req.logprobs:
            for choice, entries in zip(choices, content):
                choice["logprobs"] = {"content": entries}
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": req.model,
                "choices": choices, "usage": _usage(len(prompt), generated), "system_fingerprint": None}

    async def _chat_stream(self, req, request_id, prompt_len, first, events):
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None):
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return body

        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        generated = 0
        try:
            event = first
            while event is not None:
                if event["token"] is not None:
                    generated += 1
                finish = event["finish_reason"]
                logprobs = {"content": [self._chat_logprob(event["logprobs"])]} if event["logprobs"] else None
                if event["text"] or logprobs or finish:
                    delta = {"content": event["text"]} if event["text"] else {}
                    yield chunk([{"index": event["index"], "delta": delta, "logprobs": logprobs,
                                  "finish_reason": None if not finish else ("stop" if finish == "stop" else "length")}])
                event = await anext(events, None)
            if include_usage:
                yield chunk([], _usage(prompt_len, generated))
        finally:
            await events.aclose()  # a client that went away aborts the request in the engine

    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError("prompt must not be empty", param="prompt")
        if len(prompts) * req.n > self.engine.max_num_seqs:
            raise APIError(f"prompt: {len(prompts)} prompts x n={req.n} exceed the server's --max-num-seqs "
                           f"{self.engine.max_num_seqs} sequences per request; send them as separate requests",
                           param="prompt")
        if all(isinstance(p, list) for p in prompts):
            return [list(p) for p in prompts]
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    async def completions(self, req: CompletionRequest):
        """A text completion (dict) or, with `stream`, an async iterator of chunks."""
        req.refuse_unsupported()
        adapter = self._adapter_for(req.model)
        prompts = await asyncio.to_thread(self._completion_prompts, req)  # tokenising: off the loop
        top = req.logprobs or 0
        request_id = next_request_id("cmpl")
        all_params = [self._params(req, len(prompt), req.max_tokens if req.max_tokens is not None else 16,
                                   req.logprobs is not None, top) for prompt in prompts]
        for prompt, params in zip(prompts, all_params):  # all or none: no prompt starts if one is invalid
            try:
                self.engine.validate(prompt, params, adapter)
            except (InputError, AdapterError) as exc:
                raise APIError(str(exc), 400, "BadRequestError", "prompt") from None
        streams = [self._events(prompt, params, adapter, None, f"{request_id}-{p}")
                   for p, (prompt, params) in enumerate(zip(prompts, all_params))]
        if req.stream:
            firsts = []
            try:
                for s in streams:
                    firsts.append(await anext(s))
            except BaseException:
                for s in streams:
                    await s.aclose()  # aborts the prompts already submitted
                raise
            return self._completion_stream(req, request_id, prompts, firsts, streams)
        tasks = [asyncio.ensure_future(self._collect(s, req.n)) for s in streams]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one prompt failed or the client left: the others stop too
                task.cancel()
            raise
        choices, generated = [], 0
        for p, (texts, logprobs, finishes, count) in enumerate(results):
            generated += count
            for i in range(req.n):
                choices.append({"index": p * req.n + i, "text": texts[i],
                                "logprobs": self._completion_logprobs(logprobs[i]) if req.logprobs is not None else None,
                                "finish_reason": finishes[i]})
        return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": req.model,
                "choices": choices, "usage": _usage(sum(len(p) for p in prompts), generated),
                "system_fingerprint": None}

    async def _collect(self, events, n):
        texts, logprobs, finishes, generated = [""] * n, [[] for _ in range(n)], [None] * n, 0
        async for event in events:
            i = event["index"]
            texts[i] += event["text"]
            if event["token"] is not None:
                generated += 1
            if event["logprobs"]:
                logprobs[i].append(event["logprobs"])
            if event["finish_reason"]:
                finishes[i] = "stop" if event["finish_reason"] == "stop" else "length"
        return texts, logprobs, finishes, generated

    def _completion_logprobs(self, entries: list[dict], offset: int = 0) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for entry in entries:
            text = self._token_text(entry["token_id"])
            tokens.append(text)
            token_logprobs.append(entry["logprob"])
            top.append({self._token_text(t): lp for t, lp in entry["top"]})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    async def _completion_stream(self, req, request_id, prompts, firsts, streams):
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        merged: asyncio.Queue = asyncio.Queue()
        generated = 0

        async def pump(p, first, stream):
            await merged.put((p, first))
            async for event in stream:
                await merged.put((p, event))
            await merged.put((p, None))

        tasks = [asyncio.create_task(pump(p, f, s)) for p, (f, s) in enumerate(zip(firsts, streams))]
        try:
            open_streams = len(tasks)
            while open_streams:
                p, event = await merged.get()
                if event is None:
                    open_streams -= 1
                    continue
                if event["token"] is not None:
                    generated += 1
                finish = event["finish_reason"]
                if event["text"] or finish or event["logprobs"]:
                    body = {"id": request_id, "object": "text_completion", "created": created, "model": req.model,
                            "choices": [{"index": p * req.n + event["index"], "text": event["text"],
                                         "logprobs": self._completion_logprobs([event["logprobs"]])
                                         if event["logprobs"] else None,
                                         "finish_reason": None if not finish else ("stop" if finish == "stop" else "length")}]}
                    if include_usage:
                        body["usage"] = None
                    yield body
            if include_usage:
                yield {"id": request_id, "object": "text_completion", "created": created, "model": req.model,
                       "choices": [], "usage": _usage(sum(len(p) for p in prompts), generated)}
        finally:
            for task in tasks:
                task.cancel()

    async def warm_up(self) -> None:
        """One short greedy generation on the base and on every loaded adapter; then healthy."""
        for model in [self.served_name, *self.adapters]:
            req = ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "Hello"}],
                                        max_tokens=4, temperature=0)
            await self.chat(req)
        self.healthy = True


def _clip(text, limit: int = 200) -> str:
    """Client input quoted in an error message, cut to `limit` characters."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
