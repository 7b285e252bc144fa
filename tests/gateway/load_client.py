"""A load client in its own process: many requests through the gateway, each outcome recorded.

    python -m tests.gateway.load_client PLAN.json OUT.json

PLAN: {"url", "requests": [{"key", "model", "stream", "user"}...], "concurrency"}. OUT: one record per
request: status, whether a stream ended with [DONE], an in-band error, the usage the client saw and
any transport error (a request "lost" = a transport error: no HTTP answer at all).
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx


async def one(client: httpx.AsyncClient, url: str, spec: dict) -> dict:
    body = {"model": spec["model"], "max_tokens": spec.get("max_tokens", 8), "stream": spec["stream"],
            "messages": [{"role": "user", "content": spec.get("prompt", "Wie lange gilt die Frist?")}]}
    if spec["stream"]:
        body["stream_options"] = {"include_usage": True}
    headers = {"authorization": f"Bearer {spec['key']}"}
    if spec.get("user"):
        headers["x-sovllm-user"] = spec["user"]
    record = {"tenant": spec.get("tenant"), "model": spec["model"], "stream": spec["stream"], "status": None,
              "done": False, "error": None, "transport": None, "prompt_tokens": 0, "completion_tokens": 0,
              "target": None, "id": None}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            record["status"] = response.status_code
            record["target"] = response.headers.get("x-sovllm-model")
            text = (await response.aread()).decode()
        if not spec["stream"] or response.status_code != 200:
            data = json.loads(text)
            if response.status_code == 200:
                record["prompt_tokens"] = data["usage"]["prompt_tokens"]
                record["completion_tokens"] = data["usage"]["completion_tokens"]
                record["done"] = True
                record["id"] = data["id"]
            else:
                record["error"] = data["error"]["message"]
            return record
        for event in text.split("\n\n"):
            if not event.startswith("data: "):
                continue
            if event == "data: [DONE]":
                record["done"] = True
                continue
            data = json.loads(event[6:])
            record["id"] = record["id"] or data.get("id")
            if "error" in data:
                record["error"] = data["error"]["message"]
            if data.get("usage"):
                record["prompt_tokens"] = data["usage"]["prompt_tokens"]
                record["completion_tokens"] = data["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        record["transport"] = f"{type(exc).__name__}: {exc}"
    return record


async def run(plan: dict) -> list[dict]:
    limits = httpx.Limits(max_connections=plan["concurrency"] * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:
        gate = asyncio.Semaphore(plan["concurrency"])

        async def bounded(spec):
            async with gate:
                return await one(client, plan["url"], spec)

        return await asyncio.gather(*(bounded(spec) for spec in plan["requests"]))


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    results = asyncio.run(run(plan))
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
