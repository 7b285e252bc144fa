"""The soak test's second process: a bounded burst of mixed valid and invalid requests, all at once.

Usage: python -m tests.serve.soak_client BASE_URL OUT.json. Writes, per request, its kind, HTTP
status, error type and (for valid ones) the answer text and finish reason.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx

BASE = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
             "Say hello in German.", "Which planet is closest to the sun?", "What do bees make?"]


def valid_requests() -> list[tuple[str, dict]]:
    out = []
    for i, question in enumerate(QUESTIONS * 2):
        model = BASE if i % 2 else "acme-a"
        out.append((f"valid-{i}", {"model": model, "max_tokens": 12, "temperature": 0,
                                   "messages": [{"role": "user", "content": question}]}))
    return out


def invalid_requests() -> list[tuple[str, object, int]]:
    """(kind, body — dict, or raw bytes — expected status)."""
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    return [
        ("malformed-json", b'{"model": "x", "messages": [', 400),
        ("unknown-model", {"model": "nope", **chat}, 404),
        ("max-tokens-zero", {"model": BASE, "max_tokens": 0, **chat}, 400),
        ("max-tokens-beyond-context", {"model": BASE, "max_tokens": 10**6, **chat}, 400),
        ("prompt-beyond-context", {"model": BASE, "messages": [{"role": "user", "content": "word " * 5000}]}, 400),
        ("invalid-schema", {"model": BASE, **chat,
                            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}}, 400),
        ("ten-megabytes", b'{"model": "x", "messages": [{"role": "user", "content": "' + b"y" * 10_000_000 + b'"}]}',
         413),
        ("no-messages", {"model": BASE}, 400),
    ]


async def main(base_url: str, out_path: str) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        async def send(kind, body, expected=200):
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = await client.post("/chat/completions", content=raw,
                                         headers={"content-type": "application/json"})
            record = {"kind": kind, "status": response.status_code, "expected": expected}
            try:
                data = response.json()
            except ValueError:
                data = {}
            if response.status_code == 200:
                record.update(text=data["choices"][0]["message"]["content"],
                              finish=data["choices"][0]["finish_reason"], model=body["model"],
                              question=body["messages"][0]["content"])
            else:
                record["error_type"] = (data.get("error") or {}).get("type")
            return record

        async def probe(i):  # many idle connections from one client: each answers, none breaks the server
            response = await client.get("/models")
            return {"kind": f"connection-{i}", "status": response.status_code, "expected": 200}

        tasks = [send(k, b) for k, b in valid_requests()] + [send(k, b, e) for k, b, e in invalid_requests()]
        tasks += [probe(i) for i in range(150)]
        results = await asyncio.gather(*tasks)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
