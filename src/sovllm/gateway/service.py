"""The gateway's logic, without FastAPI: authenticate, authorise, limit, route, proxy, account.

A completion request is sent to one upstream after another (healthy ones first, round robin) until
one answers: a refused connection, a dropped connection before the response is complete (for a
non-streaming request) or a 502/503 moves on to the next upstream; those requests have produced
nothing the client saw, so resending is safe. A 404 for a routed adapter that the gateway knows a
path for triggers one runtime load on that upstream, then the request is resent there. Streams are
passed through event by event as they arrive; once the first byte reached the client, an upstream
failure ends the stream with an in-band OpenAI error event and `[DONE]`.

Token usage comes from the upstream's `usage`: for streams the gateway asks for it
(`stream_options.include_usage`) and drops the extra usage event again when the client did not ask.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sovllm.config import GatewaySection
from sovllm.gateway.keys import KeyRing, bearer
from sovllm.gateway.metrics import GatewayMetrics
from sovllm.gateway.policy import ADMIN, Policy, Route, TenantLimiter, retry_after_header
from sovllm.gateway.upstreams import Pool, Upstream
from sovllm.gateway.usage import UsageWriter, latest_splits, response_owner
from sovllm.serve.protocol import APIError

log = logging.getLogger("sovllm.gateway")

RECENT_RESPONSES = 100_000  # response ids kept in memory for feedback (older ones are looked up in the store)
_RETRY_STATUS = (502, 503)


class Gone(Exception):
    """The upstream failed before the client saw anything: try the next one."""


@dataclass
class Call:
    """One proxied completion request, for accounting."""

    tenant: str
    route: Route
    stream: bool
    user_hash: str | None
    start: float = field(default_factory=time.perf_counter)
    upstream: str | None = None
    status: int = 200
    response_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    ttfb: float | None = None
    error: str | None = None
    client_usage: bool = False   # the client asked for the usage event itself
    finished: bool = False


def _not_found(name) -> APIError:
    return APIError(f"The model `{name}` does not exist.", 404, "NotFoundError", "model")


class Gateway:
    def __init__(self, cfg: GatewaySection, root: Path, usage_engine, *, served_base: str | None = None):
        self.cfg = cfg
        sources = [(tenant, key) for tenant, spec in cfg.tenants.items() for key in spec.keys]
        sources += [(ADMIN, key) for key in cfg.admin_keys]
        self.keys = KeyRing(sources, Path(root))
        self.policy = Policy(cfg)
        self.limiters = {tenant: TenantLimiter(spec.limits) for tenant, spec in cfg.tenants.items()}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=5.0), limits=limits,
                                        trust_env=False)  # proxies from the environment could bypass egress
        self.pool = Pool(cfg.upstreams, Path(root), self.client)
        self.metrics = GatewayMetrics()
        self.usage_engine = usage_engine
        self.usage = UsageWriter(usage_engine)
        self.recent: OrderedDict[str, tuple[str, str | None, str]] = OrderedDict()
        self.split_adapters: dict[str, str] = {}  # paths of adapters that live splits route to
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._maintain()))

    async def refresh(self) -> None:
        """Health checks, key files and live splits (run every `health_interval_s`)."""
        await self.pool.check_all()
        if self.keys.refresh():
            log.info("gateway: key files changed; keys reloaded")
        try:
            self.policy.splits, self.split_adapters = await asyncio.to_thread(latest_splits, self.usage_engine, True)
        except Exception as exc:  # noqa: BLE001 - the store being briefly away keeps the last splits
            log.warning("gateway: cannot read alias splits (%s); keeping the last ones", exc)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the maintenance loop must never die
                log.exception("gateway maintenance failed")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.client.aclose()
        await asyncio.to_thread(self.usage.close)

    # --- authentication and authorisation ------------------------------------------------------------

    def tenant(self, authorization: str | None) -> str:
        owner = self.keys.owner(bearer(authorization))
        if owner is None:
            self.metrics.rejected.labels("", "auth").inc()
            raise APIError("Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.", 401,
                           "AuthenticationError", code="invalid_api_key")
        return owner

    def models(self, tenant: str) -> dict:
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "sovllm-gateway"} for name in self.policy.allowed(tenant)]}

    def require_admin(self, tenant: str, what: str) -> None:
        if tenant != ADMIN:
            self.metrics.rejected.labels(tenant, "forbidden").inc()
            raise APIError(f"{what} needs an admin key; tenants cannot load or unload adapters.", 403,
                           "PermissionDeniedError")

    # --- completions ---------------------------------------------------------------------------------

    def prepare(self, tenant: str, body: bytes, user_header: str | None) -> tuple[Call, dict]:
        """Parse, authorise and route one completion request (raises APIError)."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self.metrics.rejected.labels(tenant, "bad_request").inc()
            raise APIError("The request body is not valid JSON.", 400) from None
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not model:
            self.metrics.rejected.labels(tenant, "bad_request").inc()
            raise APIError("`model` is required: the name of a model you may use (GET /v1/models lists them).",
                           400, param="model")
        user = user_header or (payload.get("user") if isinstance(payload.get("user"), str) else None)
        route = self.policy.resolve(tenant, model, user)
        if route is None:
            self.metrics.rejected.labels(tenant, "not_found").inc()
            raise _not_found(model)
        stream = payload.get("stream") is True
        user_hash = hashlib.sha256(user.encode("utf-8")).hexdigest()[:32] if user else None
        payload["model"] = route.target
        call = Call(tenant, route, stream, user_hash)
        if stream:
            options = payload.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            call.client_usage = bool(options.get("include_usage"))
            options["include_usage"] = True
            payload["stream_options"] = options
        return call, payload

    def admit(self, call: Call) -> None:
        limiter = self.limiters.get(call.tenant)
        if limiter is None:  # admin keys are not limited
            return
        verdict = limiter.admit()
        if not verdict.ok:
            self.metrics.rejected.labels(call.tenant, "rate_limit").inc()
            raise APIError(f"Rate limit of tenant '{call.tenant}' reached: {verdict.reason}. Retry later.", 429,
                           "RateLimitError", headers={"Retry-After": retry_after_header(verdict.retry_after)},
                           code="rate_limit_exceeded")

    async def _send(self, upstream: Upstream, path: str, payload: dict) -> httpx.Response:
        request = self.client.build_request("POST", upstream.url + path, json=payload, headers=upstream.headers())
        try:
            return await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            self.pool.mark_down(upstream, f"{type(exc).__name__}: {exc}")
            raise Gone(str(exc)) from None

    async def _missing_adapter(self, upstream: Upstream, call: Call, response: httpx.Response,
                               seen: int | None) -> bool:
        """A 404 for a routed adapter the gateway can load: load it once on this upstream. True = loaded."""
        path = self.cfg.adapters.get(call.route.target) or self.split_adapters.get(call.route.target)
        if response.status_code != 404 or path is None:
            return False
        await response.aread()
        await response.aclose()
        problem = await self.pool.ensure_loaded(upstream, call.route.target, path, seen)
        if problem:
            self.metrics.adapter_load_failures.labels(call.route.target, call.tenant).inc()
            log.error("gateway: loading %s on %s failed: %s", call.route.target, upstream.url, problem)
            return False
        return True

    async def open(self, call: Call, path: str, payload: dict) -> tuple[Upstream, httpx.Response]:
        """The first upstream response worth passing on (its body not read yet, except for errors)."""
        last = "no upstream is configured"
        for upstream in self.pool.order():
            for _ in range(2):  # the second time after a runtime load
                seen = upstream.loaded.get(call.route.target)
                try:
                    response = await self._send(upstream, path, payload)
                except Gone as exc:
                    last = f"{upstream.url}: {exc}"
                    break
                if await self._missing_adapter(upstream, call, response, seen):
                    continue
                if response.status_code in _RETRY_STATUS:
                    await response.aclose()
                    last = f"{upstream.url}: HTTP {response.status_code}"
                    break
                return upstream, response
        raise APIError(f"No upstream could answer ({last}); retry later.", 503, "ServiceUnavailableError")

    async def complete(self, call: Call, path: str, payload: dict) -> tuple[int, bytes, dict]:
        """A non-streaming request: (status, body, extra headers)."""
        try:
            for _ in range(len(self.pool.upstreams)):
                chosen, response = await self.open(call, path, payload)
                try:
                    body = await response.aread()
                except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                    # the upstream died while generating: nothing reached the client, so resend
                    self.pool.mark_down(chosen, f"{type(exc).__name__} while reading")
                    continue
                finally:
                    await response.aclose()
                call.upstream, call.status = chosen.url, response.status_code
                call.ttfb = time.perf_counter() - call.start
                self._account_body(call, body)
                return response.status_code, body, self._headers(call)
            raise APIError("Every upstream failed while answering; retry later.", 503, "ServiceUnavailableError")
        except APIError as exc:
            call.status, call.error = exc.status, exc.message
            raise
        finally:
            self.finish(call)

    def _account_body(self, call: Call, body: bytes) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            call.error = "the upstream's answer is not JSON"
            return
        if call.status != 200:
            error = data.get("error") if isinstance(data, dict) else None
            call.error = (error or {}).get("message") if isinstance(error, dict) else str(data)[:300]
            return
        usage = data.get("usage") or {}
        call.response_id = data.get("id")
        call.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        call.completion_tokens = int(usage.get("completion_tokens") or 0)
        choices = data.get("choices") or [{}]
        call.finish_reason = choices[0].get("finish_reason")

    def _headers(self, call: Call) -> dict:
        headers = {"x-sovllm-model": call.route.target}
        if call.response_id:
            headers["x-sovllm-response-id"] = call.response_id
        return headers

    async def stream(self, call: Call, path: str, payload: dict):
        """Open the stream (errors before the first byte raise APIError), then return (headers, events)."""
        try:
            upstream, response = await self.open(call, path, payload)
        except APIError as exc:
            call.status, call.error = exc.status, exc.message
            self.finish(call)
            raise
        call.upstream, call.status = upstream.url, response.status_code
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            self._account_body(call, body)
            self.finish(call)
            return response.status_code, body, self._headers(call), None
        return 200, None, self._headers(call), self._relay(call, upstream, response)

    async def _relay(self, call: Call, upstream: Upstream, response: httpx.Response):
        buffer = b""
        first = True
        try:
            async for chunk in response.aiter_raw():
                if call.ttfb is None:
                    call.ttfb = time.perf_counter() - call.start
                buffer += chunk
                cut = buffer.rfind(b"\n\n")
                if cut < 0:
                    continue
                events, buffer = buffer[:cut + 2], buffer[cut + 2:]
                out = self._inspect(call, events, first)
                first = False
                if out:
                    yield out
            if buffer.strip():
                yield self._inspect(call, buffer, first)
        except httpx.HTTPError as exc:
            self.pool.mark_down(upstream, f"{type(exc).__name__} mid-stream")
            call.status, call.error = 502, f"upstream failed mid-stream: {type(exc).__name__}"
            error = APIError("The upstream failed while streaming; the answer is incomplete. Retry the request.",
                             502, "BadGatewayError")
            yield b"data: " + json.dumps(error.body()).encode() + b"\n\ndata: [DONE]\n\n"
        except BaseException:  # the client went away (cancelled): the upstream request is closed below
            call.finish_reason = call.finish_reason or "abort"
            raise
        finally:
            await response.aclose()
            self.finish(call)

    def _inspect(self, call: Call, events: bytes, first: bool) -> bytes:
        """Note the id, finish reason and usage from the events; drop the usage event the client did not ask for."""
        interesting = first or b'"usage"' in events or b'"finish_reason":"' in events \
            or b'"finish_reason": "' in events or b'"error"' in events
        if not interesting:
            return events
        kept = []
        for event in events.split(b"\n\n"):
            if not event.strip():
                continue
            data = event[5:].strip() if event.startswith(b"data:") else None
            if data and data != b"[DONE]":
                try:
                    message = json.loads(data)
                except ValueError:
                    message = None
                if isinstance(message, dict):
                    call.response_id = call.response_id or message.get("id")
                    for choice in message.get("choices") or []:
                        call.finish_reason = choice.get("finish_reason") or call.finish_reason
                    if isinstance(message.get("error"), dict):  # an upstream's in-band error
                        call.error = str(message["error"].get("message"))[:300]
                        code = message["error"].get("code")
                        call.status = code if isinstance(code, int) and code >= 400 else 500
                    usage = message.get("usage")
                    if isinstance(usage, dict):
                        call.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        call.completion_tokens = int(usage.get("completion_tokens") or 0)
                        if not call.client_usage and not message.get("choices"):
                            continue  # the usage event we asked for on the client's behalf
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def finish(self, call: Call) -> None:
        """Account for one request exactly once: limiter, metrics, usage row, recent responses."""
        if call.finished:
            return
        call.finished = True
        latency = time.perf_counter() - call.start
        tokens = call.prompt_tokens + call.completion_tokens
        limiter = self.limiters.get(call.tenant)
        if limiter is not None:
            limiter.done(tokens)
        reason = call.finish_reason or ("error" if call.status >= 400 else "abort")
        if call.error and call.status >= 400:
            reason = "error"
        self.metrics.finished(call.tenant, call.route.target, reason, call.prompt_tokens, call.completion_tokens)
        if call.ttfb is not None:
            self.metrics.ttfb.labels(call.tenant).observe(call.ttfb)
        if call.response_id:
            self.recent[call.response_id] = (call.tenant, call.route.alias, call.route.target)
            if len(self.recent) > RECENT_RESPONSES:
                self.recent.popitem(last=False)
        self.usage.request(time=time.time(), tenant=call.tenant, model=call.route.requested,
                           adapter=call.route.target, alias=call.route.alias, user_hash=call.user_hash,
                           response_id=call.response_id, upstream=call.upstream, status=call.status,
                           stream=int(call.stream), prompt_tokens=call.prompt_tokens,
                           completion_tokens=call.completion_tokens, latency_s=latency, ttft_s=call.ttfb,
                           finish_reason=reason, error=call.error)

    # --- feedback and admin --------------------------------------------------------------------------

    async def feedback(self, tenant: str, payload: dict) -> dict:
        response_id = payload.get("response_id")
        rating = payload.get("rating")
        comment = payload.get("comment")
        if not isinstance(response_id, str) or not response_id:
            raise APIError("`response_id` is required: the `id` of the completion you rate.", 400,
                           param="response_id")
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not 0 <= rating <= 1:
            raise APIError("`rating` must be a number from 0 (bad) to 1 (good), e.g. 1 for thumbs up.", 400,
                           param="rating")
        if comment is not None and (not isinstance(comment, str) or len(comment) > 4000):
            raise APIError("`comment` must be a string of at most 4000 characters.", 400, param="comment")
        owner = self.recent.get(response_id)
        if owner is None:
            row = await asyncio.to_thread(response_owner, self.usage_engine, response_id)
            owner = (row["tenant"], row["alias"], row["adapter"]) if row else None
        if owner is None or (owner[0] != tenant and tenant != ADMIN):
            raise APIError(f"No response `{response_id}` of yours is known to the gateway.", 404, "NotFoundError",
                           param="response_id")
        self.usage.feedback(time=time.time(), tenant=owner[0], response_id=response_id, alias=owner[1],
                            adapter=owner[2], rating=float(rating), comment=comment)
        return {"object": "feedback", "response_id": response_id, "recorded": True}

    async def admin_forward(self, path: str, payload: dict) -> tuple[int, str]:
        """Load or unload on every upstream; 200 only when all agree."""
        results = []
        for upstream in self.pool.upstreams:
            try:
                response = await self.client.post(upstream.url + path, json=payload, headers=upstream.headers(),
                                                  timeout=300.0)
                results.append((upstream.url, response.status_code, response.text[:300]))
                name = payload.get("lora_name")
                if response.status_code == 200 and isinstance(name, str):
                    if path.endswith("/load_lora_adapter"):
                        upstream.loads += 1
                        upstream.loaded[name] = upstream.loads
                    else:
                        upstream.loaded.pop(name, None)
            except httpx.HTTPError as exc:
                results.append((upstream.url, 502, f"{type(exc).__name__}: {exc}"))
        status = 200 if all(code == 200 for _, code, _ in results) else 502
        return status, "\n".join(f"{url}: {code} {text}" for url, code, text in results)
