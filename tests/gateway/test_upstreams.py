"""Upstream failures through the gateway: a stream broken off mid-answer ends cleanly, all upstreams
down is a clean 503, a missing adapter is loaded once per upstream however many requests wait."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.gateway import procs

KEY = "sk-ops-" + "c" * 24


def _gateway(tmp, upstreams, **extra):
    root = procs.project(tmp, {"upstreams": [{"url": u.url + "/v1"} for u in upstreams],
                               "tenants": {"ops": {"keys": [procs.hashed(KEY)], "models": ["a1", "late"]}},
                               "adapters": {"late": "/adapters/late"}, "health_interval_s": 0.3} | extra)
    return procs.gateway(root)


def _chat(model="a1", stream=False, **extra):
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "Hallo"}], **extra}


def test_a_stream_broken_off_mid_answer_ends_with_an_error_event_and_done(tmp_path):
    upstream = procs.upstream(tmp_path, adapters=["a1"], tokens=60, interval=0.05)
    gateway = _gateway(tmp_path, [upstream])
    try:
        with httpx.Client(timeout=30) as client, client.stream(
                "POST", gateway.url + "/v1/chat/completions", json=_chat(stream=True),
                headers={"authorization": f"Bearer {KEY}"}) as response:
            assert response.status_code == 200
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        upstream.stop(kill=True)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "BadGatewayError" and "incomplete" in error["message"]
        assert all("choices" in json.loads(e) for e in events[:5])  # what came before was passed through
        response = httpx.post(gateway.url + "/v1/chat/completions", json=_chat(),
                              headers={"authorization": f"Bearer {KEY}"})
        assert response.status_code == 503  # no upstream left: a clean OpenAI error, not a hang
        assert response.json()["error"]["type"] == "ServiceUnavailableError"
        assert httpx.get(gateway.url + "/health").status_code == 503
    finally:
        gateway.stop()
        upstream.stop()


def test_a_missing_adapter_is_loaded_once_per_upstream_for_many_waiting_requests(tmp_path):
    upstreams = [procs.upstream(tmp_path, adapters=["a1"], loadable=["late"], tokens=4, name=f"up{i}")
                 for i in range(2)]
    gateway = _gateway(tmp_path, upstreams)

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(gateway.url + "/v1/chat/completions", json=_chat("late"),
                                                      headers={"authorization": f"Bearer {KEY}"})
                                          for _ in range(24)))

    try:
        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 24
        loads = [httpx.get(u.url + "/stats").json()["loads"] for u in upstreams]
        assert loads == [{"late": 1}, {"late": 1}]  # round robin reached both; each loaded it once
        served = [httpx.get(u.url + "/stats").json()["models"]["late"]["requests"] for u in upstreams]
        assert sum(served) == 24 and min(served) > 0
    finally:
        gateway.stop()
        for u in upstreams:
            u.stop()


@pytest.mark.parametrize("health_interval", [0.3, 600.0], ids=["health-check-notices", "stale-404-notices"])
def test_an_upstream_that_restarts_gets_its_runtime_adapters_again(tmp_path, health_interval):
    upstream = procs.upstream(tmp_path, adapters=["a1"], loadable=["late"], tokens=4, name="up")
    gateway = _gateway(tmp_path, [upstream], health_interval_s=health_interval)
    headers = {"authorization": f"Bearer {KEY}"}
    try:
        assert httpx.post(gateway.url + "/v1/chat/completions", json=_chat("late"), headers=headers).status_code == 200
        port = upstream.port
        upstream.stop()
        time.sleep(0.8)  # with a short interval the gateway's health check notices, else only the 404 tells
        upstream = procs.upstream(tmp_path, port=port, adapters=["a1"], loadable=["late"], tokens=4, name="up2")
        response = httpx.post(gateway.url + "/v1/chat/completions", json=_chat("late"), headers=headers)
        assert response.status_code == 200, response.text
        assert httpx.get(upstream.url + "/stats").json()["loads"] == {"late": 1}
    finally:
        gateway.stop()
        upstream.stop()
