"""The HTTP layer (FastAPI): thin routes over `Service`, OpenAI-style error JSON for every failure."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from sovllm import __version__
from sovllm.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRARequest,
    UnloadLoRARequest,
)
from sovllm.serve.service import Service, sse

log = logging.getLogger("sovllm.serve")


def _error(message: str, status: int, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(message, status, type_, param).body(), status_code=status)


async def _sse_stream(chunks):
    try:
        async for body in chunks:
            yield sse(body)
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # noqa: BLE001 - the stream has started; report in-band, never a traceback
        log.exception("stream failed")
        yield sse(APIError(f"internal error: {type(exc).__name__}", 500, "InternalServerError").body())
    yield "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed its connection before the response was ready."""


async def until_disconnected(request: Request, work):
    """Await `work`, cancelling it as soon as the client disconnects (queued or running, as vLLM does).

    A non-streaming request (and a streaming one before its first token) has no response to write
    to, so nothing else would notice the client leaving; cancelling `work` aborts its sequences in
    the engine before more compute is spent on them.
    """
    task = asyncio.ensure_future(work)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        log.info("client disconnected before its response was ready; request aborted")
        raise ClientDisconnected()
    return task.result()


class BodyLimit:
    """ASGI middleware: a request body gets 413 as soon as it passes `limit` bytes, before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.limit:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        # read the whole body first (it is parsed as one JSON document anyway), then replay it to the app
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, send):
        error = APIError(f"The request body exceeds the server's limit of {self.limit:,} bytes (--max-body-bytes).",
                         413, "RequestTooLargeError")
        await JSONResponse(error.body(), status_code=413)({"type": "http"}, None, send)


def _handler(app: FastAPI, scope: dict) -> str:
    """The route template a request matched (also when a middleware answered before routing), or
    "none": never the client's raw path, which would let clients add label values without bound."""
    from starlette.routing import Match

    route = scope.get("route")
    if route is not None:
        return route.path
    for candidate in app.router.routes:
        if candidate.matches(scope)[0] != Match.NONE:
            return getattr(candidate, "path", "none")
    return "none"


def create_app(service: Service, on_start: Callable[[Service], Awaitable[None]] | None = None,
               api_keys: list[str] = (), max_body_bytes: int = 0) -> FastAPI:
    """The FastAPI app; `on_start(service)` runs as a background task once the server accepts connections.

    With `api_keys`, every `/v1/*` route needs `Authorization: Bearer <key>` (as vLLM's `--api-key`);
    `/health` and `/metrics` stay open for probes and the Prometheus scrape.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        task = asyncio.create_task(on_start(service)) if on_start else None
        yield
        if task and not task.done():
            task.cancel()
        # the grace period is over: answer what is still queued or running while the loop can deliver it
        await asyncio.to_thread(service.engine.shutdown)

    app = FastAPI(title="sovllm", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    if max_body_bytes:
        app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    if api_keys:
        expected = [key.encode() for key in api_keys]

        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            if request.url.path.startswith("/v1"):
                given = request.headers.get("authorization", "")
                token = given[7:].strip().encode() if given[:7].lower() == "bearer " else b""
                if not any(hmac.compare_digest(token, key) for key in expected):
                    return JSONResponse(APIError("Incorrect API key provided. Send it as 'Authorization: Bearer "
                                                 "<key>'.", 401, "AuthenticationError",
                                                 code="invalid_api_key").body(), status_code=401)
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return _error("; ".join(problems), 400, "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code, "BadRequestError")
        return _error(str(exc.detail), exc.status_code, kind)

    @app.exception_handler(ClientDisconnected)
    async def disconnected(_: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("request failed")
        return _error(f"internal error: {type(exc).__name__}", 500, "InternalServerError")

    if service.metrics is not None:
        @app.middleware("http")  # added last: outermost, so refused (401, 413) and failed requests count too
        async def count_responses(request: Request, call_next):
            status = 500
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                handler = _handler(app, request.scope)
                if handler != "/metrics":
                    service.metrics.http_response(handler, request.method, status)

    @app.get("/health")
    async def health():
        if not service.healthy:
            return JSONResponse({"status": "starting"}, status_code=503)
        problem = service.engine.health()
        if problem:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        if service.metrics is None:
            return _error("metrics are not enabled", 404, "NotFoundError")
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return service.models()

    def respond(result, stream: bool):
        if stream:
            return StreamingResponse(_sse_stream(result), media_type="text/event-stream")
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return respond(await until_disconnected(request, service.chat(body)), body.stream)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return respond(await until_disconnected(request, service.completions(body)), body.stream)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRARequest):
        return PlainTextResponse(await service.load_adapter(body.lora_name, body.lora_path))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRARequest):
        return PlainTextResponse(await service.unload_adapter(body.lora_name))

    return app
