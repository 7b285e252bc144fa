"""The gateway's HTTP layer (FastAPI): thin routes over `Gateway`, OpenAI-style error JSON everywhere.

Completion bodies are not parsed into models here: the gateway reads only `model`, `stream`,
`stream_options` and `user`, and the upstream validates the rest (so vLLM's own fields pass).
Routes that are not listed answer 404: nothing else is passed through.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sovllm import __version__
from sovllm.gateway.service import Gateway
from sovllm.serve.protocol import APIError

log = logging.getLogger("sovllm.gateway")

HANDLERS = ("/health", "/metrics", "/version", "/v1/models", "/v1/chat/completions", "/v1/completions",
            "/v1/feedback", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(f"The request body exceeds the gateway's limit of {limit:,} bytes.", 413,
                       "RequestTooLargeError")
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise APIError(f"The request body exceeds the gateway's limit of {limit:,} bytes.", 413,
                           "RequestTooLargeError")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_object(request: Request, limit: int) -> dict:
    try:
        payload = json.loads(await read_body(request, limit))
    except (ValueError, UnicodeDecodeError):
        raise APIError("The request body is not valid JSON.", 400) from None
    if not isinstance(payload, dict):
        raise APIError("The request body must be a JSON object.", 400)
    return payload


class CountResponses:
    """ASGI middleware counting responses by route, method and status class (`http_requests_total`).

    Plain ASGI, not `@app.middleware("http")`: Starlette's HTTP middleware re-wraps every streamed
    body chunk in a task and a queue, which costs each proxied token."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            handler = path if path in HANDLERS else "none"  # never the raw path: label values stay bounded
            if handler != "/metrics":
                self.metrics.http_requests.labels(handler, scope.get("method", ""), f"{status // 100}xx").inc()


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await gateway.start()
        yield
        await gateway.close()

    app = FastAPI(title="sovllm gateway", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.gateway = gateway
    limit = gateway.cfg.max_body_bytes

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code, "BadRequestError")
        return _error(APIError(str(exc.detail), exc.status_code, kind))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("gateway request failed")
        return _error(APIError(f"internal error: {type(exc).__name__}", 500, "InternalServerError"))

    app.add_middleware(CountResponses, metrics=gateway.metrics)

    @app.get("/health")
    async def health():
        if any(u.healthy for u in gateway.pool.upstreams):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": "no upstream is healthy"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(gateway.metrics.render(gateway.pool), media_type=gateway.metrics.content_type)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models(request: Request):
        return gateway.models(gateway.tenant(request.headers.get("authorization")))

    async def completion(request: Request, path: str):
        tenant = gateway.tenant(request.headers.get("authorization"))
        body = await read_body(request, limit)
        call, payload = gateway.prepare(tenant, body, request.headers.get(gateway.cfg.user_header))
        gateway.admit(call)
        if not call.stream:
            status, content, headers = await gateway.complete(call, path, payload)
            return Response(content, status_code=status, media_type="application/json", headers=headers)
        status, content, headers, events = await gateway.stream(call, path, payload)
        if events is None:
            return Response(content, status_code=status, media_type="application/json", headers=headers)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await completion(request, "/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, "/completions")

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        tenant = gateway.tenant(request.headers.get("authorization"))
        return await gateway.feedback(tenant, await _json_object(request, limit))

    async def admin(request: Request, path: str, what: str):
        tenant = gateway.tenant(request.headers.get("authorization"))
        gateway.require_admin(tenant, what)
        status, text = await gateway.admin_forward(path, await _json_object(request, limit))
        if status != 200:
            raise APIError(f"{what} failed on an upstream: {text}", status, "BadGatewayError")
        return PlainTextResponse(text)

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        return await admin(request, "/load_lora_adapter", "load_lora_adapter")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        return await admin(request, "/unload_lora_adapter", "unload_lora_adapter")

    return app
