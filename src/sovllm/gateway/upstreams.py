"""The servers behind the gateway: health checks, round-robin rotation and runtime adapter loads.

An upstream is healthy while its `/health` answers 200. Requests rotate over the healthy ones; when
none is healthy, every one is tried (a health check can lag a restart). When a routed adapter is
missing on an upstream (404 for the model), the gateway loads it there once through vLLM's
`/v1/load_lora_adapter` — one load per adapter per upstream, however many requests wait for it —
and then sends the waiting requests. An upstream that went down and came back has lost its runtime
adapters, so its record of loaded adapters is cleared.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sovllm.config import UpstreamSection
from sovllm.errors import ConfigError

log = logging.getLogger("sovllm.gateway")


@dataclass
class Upstream:
    url: str                      # base URL ending in /v1
    key: str | None = None
    healthy: bool = True
    loaded: dict[str, int] = field(default_factory=dict)  # adapter → number of the load that made it available
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    loads: int = 0                # runtime loads sent (for metrics and tests)

    @property
    def root(self) -> str:
        """The server's root (where /health lives): the base URL without its /v1."""
        return self.url[:-3] if self.url.endswith("/v1") else self.url

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"} if self.key else {}


def _key(spec: UpstreamSection, root: Path) -> str | None:
    if spec.api_key_file:
        path = Path(spec.api_key_file)
        path = path if path.is_absolute() else root / path
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the API key of upstream {spec.url} ({exc.strerror or exc})") \
                from None
    if spec.api_key_env:
        return os.environ.get(spec.api_key_env) or None
    return None


class Pool:
    """Upstreams in rotation. All methods run on the event loop."""

    def __init__(self, specs: list[UpstreamSection], root: Path, client: httpx.AsyncClient):
        self.upstreams = [Upstream(spec.url.rstrip("/"), _key(spec, root)) for spec in specs]
        self.client = client
        self._next = 0

    def order(self) -> list[Upstream]:
        """Every upstream, the healthy ones first, starting one further each call (round robin)."""
        n = len(self.upstreams)
        start, self._next = self._next, (self._next + 1) % n
        rotated = [self.upstreams[(start + i) % n] for i in range(n)]
        return [u for u in rotated if u.healthy] + [u for u in rotated if not u.healthy]

    def mark_down(self, upstream: Upstream, why: str) -> None:
        if upstream.healthy:
            log.warning("upstream %s is down: %s", upstream.url, why)
        upstream.healthy = False
        upstream.loaded.clear()

    async def check(self, upstream: Upstream) -> None:
        try:
            response = await self.client.get(upstream.root + "/health", timeout=5.0)
            ok = response.status_code == 200
        except httpx.HTTPError as exc:
            ok, response = False, exc
        if not ok:
            self.mark_down(upstream, f"/health: {getattr(response, 'status_code', response)!s}")
        elif not upstream.healthy:
            log.info("upstream %s is healthy again", upstream.url)
            upstream.healthy = True

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))

    async def ensure_loaded(self, upstream: Upstream, adapter: str, path: str, seen: int | None) -> str | None:
        """Load `adapter` on `upstream` after a 404 for it; None = available now, else why not.

        `seen` is the load the failed request was sent after (`loaded.get(adapter)` at send time). When a
        load finished since, the 404 predates it and the request is just resent; otherwise the upstream
        lost the adapter (or never had it) and it is loaded, by one request while the others wait."""
        lock = upstream.locks.setdefault(adapter, asyncio.Lock())
        async with lock:
            if upstream.loaded.get(adapter) != seen and adapter in upstream.loaded:
                return None
            upstream.loads += 1
            try:
                response = await self.client.post(upstream.url + "/load_lora_adapter", headers=upstream.headers(),
                                                  json={"lora_name": adapter, "lora_path": path}, timeout=300.0)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
            text = response.text
            if response.status_code == 200 or "already been loaded" in text:
                upstream.loaded[adapter] = upstream.loads
                log.info("loaded adapter %s on %s", adapter, upstream.url)
                return None
            return f"HTTP {response.status_code}: {text[:300]}"
