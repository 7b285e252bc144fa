"""Per-tenant limits: concurrency, requests per second and tokens per minute answer 429 with Retry-After,
and one tenant's limit never slows another tenant."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sovllm.config import TenantLimits
from sovllm.gateway.policy import TenantLimiter, retry_after_header
from tests.gateway import procs

KEYS = {name: f"sk-{name}-" + "d" * 24 for name in ("conc", "rate", "tokens", "free")}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    upstream = procs.upstream(tmp, adapters=["a1"], tokens=8, interval=0.05)  # 0.4 s per answer
    limits = {"conc": {"concurrency": 2}, "rate": {"requests_per_s": 5}, "tokens": {"tokens_per_min": 60},
              "free": {}}
    root = procs.project(tmp, {"upstreams": [{"url": upstream.url + "/v1"}],
                               "tenants": {name: {"keys": [procs.hashed(KEYS[name])], "models": ["a1"],
                                                  "limits": limits[name]} for name in KEYS}})
    proc = procs.gateway(root)
    yield proc
    proc.stop()
    upstream.stop()


def _burst(url: str, tenant: str, n: int, max_tokens: int = 8) -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(
                url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEYS[tenant]}"},
                json={"model": "a1", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "x"}]})
                for _ in range(n)))
    return asyncio.run(go())


def test_concurrency_limit_refuses_the_rest_with_retry_after_and_spares_other_tenants(gateway):
    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            def post(tenant):
                return client.post(gateway.url + "/v1/chat/completions",
                                   headers={"authorization": f"Bearer {KEYS[tenant]}"},
                                   json={"model": "a1", "messages": [{"role": "user", "content": "x"}]})
            return await asyncio.gather(*(post("conc") for _ in range(6)), *(post("free") for _ in range(6)))
    responses = asyncio.run(go())
    conc, free = responses[:6], responses[6:]
    assert sorted(r.status_code for r in conc) == [200, 200, 429, 429, 429, 429]
    for r in conc:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "RateLimitError" and "in flight" in r.json()["error"]["message"]
    assert [r.status_code for r in free] == [200] * 6


def test_requests_per_second_limit(gateway):
    statuses = [r.status_code for r in _burst(gateway.url, "rate", 12, max_tokens=1)]
    # a burst of one second's worth, then refused (the bucket refills while a loaded machine sends the burst)
    assert 5 <= statuses.count(200) <= 7 and statuses.count(429) == 12 - statuses.count(200)


def test_tokens_per_minute_limit(gateway):
    admitted = 0
    for _ in range(12):  # each request uses its prompt's tokens + 8 completion tokens
        response = _burst(gateway.url, "tokens", 1)[0]
        if response.status_code == 429:
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert "tokens per minute" in response.json()["error"]["message"]
            break
        admitted += 1
    assert 3 <= admitted <= 8


def test_limiter_with_a_clock():
    now = [0.0]
    limiter = TenantLimiter(TenantLimits(requests_per_s=2, tokens_per_min=100, concurrency=0), clock=lambda: now[0])
    assert [limiter.admit().ok for _ in range(3)] == [True, True, False]
    verdict = limiter.admit()
    assert not verdict.ok and verdict.retry_after == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.admit().ok  # one token back after half a second
    for _ in range(3):
        limiter.done(40)  # 120 tokens used
    now[0] = 10.0
    verdict = limiter.admit()
    assert not verdict.ok and verdict.retry_after == pytest.approx(50.5)
    now[0] = 60.6  # the first 40 tokens left the window: 80 < 100
    assert limiter.admit().ok
    assert retry_after_header(0.01) == "1" and retry_after_header(1.2) == "2"
