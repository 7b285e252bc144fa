"""A scripted OpenAI-compatible upstream in its own process, for the gateway's tests and benchmark.

It answers `/v1/chat/completions` and `/v1/completions` with a fixed response of `--tokens` tokens
(`max_tokens` caps it), streamed one token every `--interval` seconds, with `usage` as vLLM reports
it (and the usage event with `stream_options.include_usage`). Models: the base name and the
`--adapters`; `--loadable` names become servable through `/v1/load_lora_adapter` (as in vLLM, a
model it does not serve is a 404). `/stats` returns what it served: requests, prompt and completion
tokens and loads per model, so a test can compare the gateway's accounting with the upstream's.

    python -m benchmarks.scripted_upstream --port 9001 --tokens 64 --interval 0.005
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


def build(base: str, adapters: list[str], loadable: list[str], tokens: int, interval: float, key: str | None):
    served = {base, *adapters}
    stats: dict[str, dict[str, int]] = {}
    loads: dict[str, int] = {}

    def count(model: str, prompt: int, completion: int) -> None:
        entry = stats.setdefault(model, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
        entry["requests"] += 1
        entry["prompt_tokens"] += prompt
        entry["completion_tokens"] += completion

    def refused(request: Request):
        if key and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": {"message": "bad key", "type": "AuthenticationError", "code": 401}}, 401)
        return None

    async def completion(request: Request, chat: bool):
        if (denied := refused(request)) is not None:
            return denied
        body = await request.json()
        model = body.get("model")
        if model not in served:
            return JSONResponse({"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                                           "param": "model", "code": 404}}, 404)
        text = json.dumps(body.get("messages") if chat else body.get("prompt"))
        prompt = max(1, len(text.split()))
        n = min(tokens, int(body.get("max_tokens") or tokens))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            await asyncio.sleep(interval * n)
            count(model, prompt, n)
            content = " ".join(f"t{i}" for i in range(n))
            choice = {"index": 0, "finish_reason": "length",
                      **({"message": {"role": "assistant", "content": content}} if chat else {"text": content})}
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice],
                                 "usage": {"prompt_tokens": prompt, "completion_tokens": n,
                                           "total_tokens": prompt + n}})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            sent = 0
            try:
                for i in range(n):
                    await asyncio.sleep(interval)
                    delta = {"content": f" t{i}"} if chat else None
                    choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None,
                              **({"delta": delta} if chat else {"text": f" t{i}"})}
                    chunk = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                             "model": model, "choices": [choice]}
                    sent += 1
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                if include_usage:
                    usage = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                             "model": model, "choices": [],
                             "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}}
                    yield f"data: {json.dumps(usage, separators=(',', ':'))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                count(model, prompt, sent)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def chat(request: Request):
        return await completion(request, True)

    async def plain(request: Request):
        return await completion(request, False)

    async def models(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in sorted(served)]})

    async def load(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        body = await request.json()
        name = body.get("lora_name")
        if name in served and name != base:
            return JSONResponse({"error": {"message": f"The lora adapter '{name}' has already been loaded.",
                                           "type": "InvalidUserInput", "code": 400}}, 400)
        if name not in loadable:
            return JSONResponse({"error": {"message": f"cannot load {name}", "type": "NotFoundError",
                                           "code": 404}}, 404)
        await asyncio.sleep(0.05)
        loads[name] = loads.get(name, 0) + 1
        served.add(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: Request):
        body = await request.json()
        served.discard(body.get("lora_name"))
        return PlainTextResponse("Success")

    async def health(_: Request):
        return PlainTextResponse("")

    async def stats_(_: Request):
        return JSONResponse({"models": stats, "loads": loads, "pid": os.getpid()})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/completions", plain, methods=["POST"]),
                             Route("/v1/models", models), Route("/v1/load_lora_adapter", load, methods=["POST"]),
                             Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
                             Route("/health", health), Route("/stats", stats_)])


def main() -> None:
    import socket

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--base", default="base-model")
    parser.add_argument("--adapters", default="", help="comma-separated adapters served from the start")
    parser.add_argument("--loadable", default="", help="comma-separated adapters /v1/load_lora_adapter accepts")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--ready-file", default=None)
    args = parser.parse_args()
    app = build(args.base, [a for a in args.adapters.split(",") if a], [a for a in args.loadable.split(",") if a],
                args.tokens, args.interval, args.api_key)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((args.host, args.port))
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": sock.getsockname()[1], "pid": os.getpid()}, f)
        os.replace(tmp, args.ready_file)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, loop="asyncio")).run(sockets=[sock])


if __name__ == "__main__":
    main()
