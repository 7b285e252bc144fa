"""An adapter's refusal calibration on vLLM: the same decision sovllm's own engine takes.

sovllm train stores each adapter's refusal calibration in the adapter's `manifest.json`
(`sovllm.models.adapter.RefusalCalibration`): per request a bias, `bias - w * support`, added to the
refusal sentence's first tokens while the answer so far is that sentence's beginning. sovllm's engine
applies it itself; vLLM needs two pieces, both in this module and both enabled by flags sovllm renders
(`vllm_args`):

- `RefusalMiddleware` (`--middleware sovllm.serve.vllm_plugin.RefusalMiddleware`) runs in vLLM's API
  server. For a chat completion whose `model` is an adapter with a calibration it computes the
  request's bias from the last user turn, exactly as `sovllm serve` does, and passes it to the engine
  as `vllm_xargs` (`sovllm_refusal_bias`, `sovllm_refusal_tokens`); values a client sent under those
  keys are dropped. It finds an adapter's folder among the adapters vLLM has loaded (`--lora-modules`,
  `/v1/load_lora_adapter`) and, for a name vLLM has not loaded yet, in the filesystem resolver's folder
  (`VLLM_LORA_RESOLVER_CACHE_DIR/<name>`).
- `RefusalBias` (`--logits-processors sovllm.serve.vllm_plugin:RefusalBias`) runs in vLLM's engine
  and adds that bias to the logits, greedy decoding included.

The middleware also exports sovllm serve's per-adapter series in vLLM's Prometheus registry (vLLM
counts every LoRA request under the base model's name): `sovllm:adapter_requests_total{adapter,
finished_reason}` and `sovllm:adapter_tokens_total{adapter, kind}` from each completion's response
(a stream reports tokens only with `stream_options.include_usage`), and failed adapter loads
(`/v1/load_lora_adapter` answered with 400 or more) as `sovllm:adapter_load_failures_total{adapter}`.

The cost: one JSON parse and re-serialisation of each chat request body in the API server, the
support computation (microseconds), and a Python loop over the batch rows that carry a bias at each
decoding step (a few rows, two tokens each).

Neither piece imports vLLM at module level beyond the processor's base class, and both need sovllm
installed in vLLM's environment (`pip install --no-deps sovllm`: only the standard library is used on
this path).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sovllm.models.adapter import BASE_LABEL, RefusalCalibration, bounded_label

log = logging.getLogger("sovllm.vllm")

BIAS_KEY = "sovllm_refusal_bias"
TOKENS_KEY = "sovllm_refusal_tokens"
CHAT_PATHS = ("/v1/chat/completions",)
COUNTED_PATHS = ("/v1/chat/completions", "/v1/completions")  # counted per adapter
MAX_BODY = 64 * 1024 * 1024  # larger bodies pass through untouched (vLLM answers them itself)

MIDDLEWARE = "sovllm.serve.vllm_plugin.RefusalMiddleware"
PROCESSOR = "sovllm.serve.vllm_plugin:RefusalBias"


def vllm_args() -> list[str]:
    """The `vllm serve` flags that make vLLM apply sovllm adapters' refusal calibration."""
    return ["--middleware", MIDDLEWARE, "--logits-processors", PROCESSOR]


def _calibration(folder: Path, cache: dict) -> RefusalCalibration | None:
    """The refusal calibration in `folder/manifest.json` (None without one), cached by modification time."""
    manifest = folder / "manifest.json"
    try:
        stamp = manifest.stat().st_mtime_ns
    except OSError:
        return None
    hit = cache.get(manifest)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    refusal = None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("refusal_calibration") is not None:
            refusal = RefusalCalibration.from_dict(data["refusal_calibration"], f"{manifest}: refusal_calibration")
    except Exception as exc:  # noqa: BLE001 - a broken manifest: serve without calibration, say so once
        log.warning("%s: no refusal calibration applied (%s)", manifest, exc)
    cache[manifest] = (stamp, refusal)
    return refusal


def last_user_text(messages) -> str | None:
    """The text of the last user message of an OpenAI chat request (text parts joined), or None."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            return None
    return None


def _counter(name: str, documentation: str, labels: list[str]):
    """A counter in vLLM's Prometheus registry (served on its /metrics), created once per process;
    None without prometheus_client."""
    try:
        from prometheus_client import REGISTRY, Counter
    except ImportError:
        return None
    existing = getattr(REGISTRY, "_names_to_collectors", {}).get(name)
    if existing is not None:
        return existing
    return Counter(name, documentation, labels)


class _Outcome:
    """What a completion response says: finish reasons and token usage, from a JSON body or an SSE
    stream, read as it passes (bounded: a huge body is not parsed)."""

    def __init__(self):
        self.status, self.stream, self.done = 200, False, False
        self.body, self.line = bytearray(), b""
        self.reasons: list[str] = []
        self.usage: dict = {}

    def _event(self, data: dict) -> None:
        for choice in data.get("choices") or []:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.reasons.append(str(choice["finish_reason"]))
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]

    def feed(self, message: dict) -> None:
        if message.get("type") == "http.response.start":
            self.status = message.get("status", 200)
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            self.stream = b"text/event-stream" in headers.get(b"content-type", b"")
            return
        if message.get("type") != "http.response.body":
            return
        chunk = message.get("body", b"")
        if self.stream:
            lines = (self.line + chunk).split(b"\n")
            self.line = lines.pop()[:1 << 20]
            for line in lines:
                if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                    try:
                        self._event(json.loads(line[6:]))
                    except ValueError:
                        pass
        elif len(self.body) + len(chunk) <= (4 << 20):
            self.body += chunk
        if not message.get("more_body", False):
            self.done = True
            if not self.stream and self.body:
                try:
                    self._event(json.loads(bytes(self.body)))
                except ValueError:
                    pass


class RefusalMiddleware:
    """ASGI middleware for vLLM's API server (see the module docstring)."""

    def __init__(self, app):
        self.app = app
        self.loaded: dict[str, Path] = {}  # adapters loaded through /v1/load_lora_adapter: name -> folder
        self.cache: dict = {}
        self.failure_labels: set[str] = set()
        self.adapter_labels: set[str] = set()
        # the series sovllm serve exports per adapter (vLLM counts every LoRA request under the base model)
        self.load_failures = _counter("sovllm:adapter_load_failures", "Adapter loads that failed.", ["adapter"])
        self.requests = _counter("sovllm:adapter_requests", "Finished requests per adapter.",
                                 ["adapter", "finished_reason"])
        self.tokens = _counter("sovllm:adapter_tokens", "Prompt and generated tokens per adapter.", ["adapter", "kind"])

    def _label(self, scope, model) -> str:
        state = getattr(scope.get("app"), "state", None)
        models = getattr(state, "openai_serving_models", None)
        bases = {getattr(b, "name", None) for b in (getattr(models, "base_model_paths", None) or [])}
        return BASE_LABEL if model in bases else bounded_label(model, self.adapter_labels)

    async def _counting_outcome(self, scope, receive, send, model):
        """Pass a completion request on and count its outcome per adapter, as sovllm serve does:
        finished requests by finish reason, and prompt and generated tokens when the response reports
        usage (a stream reports it only with stream_options.include_usage)."""
        outcome = _Outcome()

        async def watch(message):
            try:
                outcome.feed(message)
                if outcome.done and outcome.status < 400 and self.requests is not None:
                    label = self._label(scope, model)
                    for reason in outcome.reasons:
                        self.requests.labels(label, reason).inc()
                    for kind, key in (("prompt", "prompt_tokens"), ("generation", "completion_tokens")):
                        if isinstance(outcome.usage.get(key), int):
                            self.tokens.labels(label, kind).inc(outcome.usage[key])
                    outcome.done = False  # counted once
            except Exception as exc:  # noqa: BLE001 - counting must never break a response
                log.warning("per-adapter metrics skipped: %s", exc)
            await send(message)

        return await self.app(scope, receive, watch)

    async def _counting_failures(self, scope, receive, send, name):
        """Pass a load request on; a response of 400 or more counts as a failed load of `name`
        (`sovllm:adapter_load_failures_total{adapter}`, as `sovllm serve` exports it)."""
        async def watch(message):
            if message.get("type") == "http.response.start" and message.get("status", 200) >= 400 and \
                    self.load_failures is not None:
                self.load_failures.labels(bounded_label(name, self.failure_labels)).inc()
            await send(message)

        return await self.app(scope, receive, watch)

    def _folder(self, scope, name: str) -> Path | None:
        state = getattr(scope.get("app"), "state", None)
        models = getattr(state, "openai_serving_models", None)
        request = (getattr(models, "lora_requests", None) or {}).get(name)
        if request is not None and getattr(request, "lora_path", None):
            return Path(request.lora_path)
        if name in self.loaded:
            return self.loaded[name]
        root = os.environ.get("VLLM_LORA_RESOLVER_CACHE_DIR")
        if root and "/" not in name and name not in (".", ".."):
            folder = Path(root) / name
            if (folder / "adapter_config.json").is_file():
                return folder
        return None

    def rewrite(self, scope, body: dict) -> dict:
        """The chat request `body` with the adapter's refusal bias in `vllm_xargs` (and no client-sent one)."""
        xargs = body.get("vllm_xargs")
        if isinstance(xargs, dict):
            xargs = {k: v for k, v in xargs.items() if k not in (BIAS_KEY, TOKENS_KEY)}
            body = {**body, "vllm_xargs": xargs}
        name = body.get("model")
        folder = self._folder(scope, name) if isinstance(name, str) else None
        refusal = _calibration(folder, self.cache) if folder is not None else None
        if refusal is None:
            return body
        bias = refusal.bias_for(last_user_text(body.get("messages")))
        if bias is None:
            return body
        xargs = dict(body.get("vllm_xargs") or {})
        xargs[BIAS_KEY] = float(bias)
        xargs[TOKENS_KEY] = list(refusal.token_ids)
        return {**body, "vllm_xargs": xargs}

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path not in CHAT_PATHS and path not in COUNTED_PATHS and path != "/v1/load_lora_adapter":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message.get("type") != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY:
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": more}]
                return await self.app(scope, _replay(replay, receive), send)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if path == "/v1/load_lora_adapter":
            name = body.get("lora_name") if isinstance(body, dict) else None
            if isinstance(name, str) and isinstance(body.get("lora_path"), str):
                self.loaded[name] = Path(body["lora_path"])
            return await self._counting_failures(
                scope, _replay([{"type": "http.request", "body": raw, "more_body": False}], receive), send, name)
        if isinstance(body, dict) and path in CHAT_PATHS:
            try:
                new = self.rewrite(scope, body)
            except Exception as exc:  # noqa: BLE001 - never fail a request over the calibration
                log.warning("refusal calibration skipped: %s", exc)
                new = body
            if new is not body:
                raw = json.dumps(new).encode("utf-8")
                headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
                scope = {**scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}
        replayed = _replay([{"type": "http.request", "body": raw, "more_body": False}], receive)
        if path in COUNTED_PATHS and isinstance(body, dict) and isinstance(body.get("model"), str):
            return await self._counting_outcome(scope, replayed, send, body["model"])
        return await self.app(scope, replayed, send)


def _replay(messages: list[dict], receive):
    """A `receive` that first hands out `messages`, then defers to the original one."""
    pending = list(messages)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _processor_base():
    try:
        from vllm.v1.sample.logits_processor import LogitsProcessor
    except ImportError:  # outside vLLM's environment: the class still imports, for tests and docs
        return object
    return LogitsProcessor


class RefusalBias(_processor_base()):
    """vLLM V1 logits processor: adds each request's `sovllm_refusal_bias` to the next refusal token
    while its output so far is the beginning of the refusal (`RefusalCalibration.apply`)."""

    def __init__(self, vllm_config=None, device=None, is_pin_memory: bool = False):
        self.rows: dict[int, tuple[RefusalCalibration, float, list[int]]] = {}

    @classmethod
    def validate_params(cls, params) -> None:
        xargs = getattr(params, "extra_args", None) or {}
        bias, tokens = xargs.get(BIAS_KEY), xargs.get(TOKENS_KEY)
        if bias is None and tokens is None:
            return
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not isinstance(tokens, list) \
                or not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise ValueError(f"vllm_xargs.{BIAS_KEY} must be a number and {TOKENS_KEY} a list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False  # it must change greedy decisions

    def needs_output_token_ids(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            xargs = getattr(params, "extra_args", None) or {}
            if xargs.get(BIAS_KEY) is None or not xargs.get(TOKENS_KEY):
                self.rows.pop(index, None)
                continue
            self.rows[index] = (RefusalCalibration(list(xargs[TOKENS_KEY]), 0.0), float(xargs[BIAS_KEY]), output)
        for source, target, direction in batch_update.moved:
            moving, other = self.rows.pop(source, None), self.rows.pop(target, None)
            if moving is not None:
                self.rows[target] = moving
            if other is not None and getattr(direction, "name", "") == "SWAP":
                self.rows[source] = other

    def apply(self, logits):
        for index, (refusal, bias, output) in self.rows.items():
            if index < logits.shape[0]:
                refusal.apply(logits[index], list(output), bias)
        return logits
