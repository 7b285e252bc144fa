"""A scripted OpenAI-compatible endpoint on a loopback port, for logic tests of LLM-calling stages.

`FakeEndpoint(script)` serves `/v1/chat/completions` (streaming and not) with uvicorn in a thread;
`script(body, n)` gets the request body and the request number and returns `(status, text)` or
`(status, text, headers)`. Every request body is kept in `requests`; `max_in_flight` records the
highest number of requests served at the same time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class FakeEndpoint:
    def __init__(self, script, delay: float = 0.0, model: str = "fake-model"):
        self.script = script
        self.delay = delay
        self.model = model
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self._lock:
                self.requests.append(body)
                number = len(self.requests)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
                result = self.script(body, number)
            finally:
                with self._lock:
                    self.in_flight -= 1
            status, text = result[0], result[1]
            headers = result[2] if len(result) > 2 else {}
            if status != 200:
                return JSONResponse({"error": {"message": text, "type": "ServerError", "param": None, "code": status}},
                                    status_code=status, headers=headers)
            usage = {"prompt_tokens": 10, "completion_tokens": max(1, len(text) // 4),
                     "total_tokens": 10 + max(1, len(text) // 4)}
            if not body.get("stream"):
                return {"id": "x", "object": "chat.completion", "created": 0, "model": self.model, "usage": usage,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}]}

            def chunk(choices, usage=None):
                return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                              "model": self.model, "choices": choices, "usage": usage}) + "\n\n"

            async def stream():
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}])
                yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
                yield chunk([], usage)
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
